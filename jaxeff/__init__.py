"""jaxeff: efficient LLM training and inference in JAX/Flax.

Submodules: `jaxeff.models` (sharded Llama-family NNX models), `jaxeff.sharding` (logical-axis rules),
`jaxeff.hf` (Hugging Face checkpoint import/export; `.gguf` files through `jaxeff.gguf`),
`jaxeff.generate` (KV-cache generation, `python -m jaxeff.generate`), `jaxeff.optim` (optax transformations),
`jaxeff.data`, `jaxeff.training` (the engine; `python -m jaxeff.train` is its CLI),
`jaxeff.host_malloc` (CPU-host settings the CLIs apply),
`jaxeff.quantization` (`jaxeff.quantize(model, bits=8)`), `jaxeff.bench`.
"""

from jaxeff.config import ModelConfig

__version__ = "0.1.0"


def __getattr__(name):
  # `jaxeff.quantize(model, bits=...)`, imported lazily so `import jaxeff` stays light.
  if name == "quantize":
    from jaxeff.quantization import quantize
    return quantize
  raise AttributeError(f"module 'jaxeff' has no attribute {name!r}")
