"""jaxeff: efficient LLM training and inference in JAX/Flax.

Submodules, lower layers first: `jaxeff.errors` (`JaxeffError` and its kinds), `jaxeff.config`
(`ModelConfig`), `jaxeff.sharding` (logical axis names and the rules table), `jaxeff.optim` (optax
transformations), `jaxeff.data`; `jaxeff.models` (sharded Llama-family NNX models, the attention
registry, the KV cache); `jaxeff.checkpoint` (the one orbax idiom), `jaxeff.hf` and `jaxeff.gguf`
(checkpoints in and out), `jaxeff.quantization` (`jaxeff.quantize(model, bits=8)`), `jaxeff.hlo`;
`jaxeff.loader` (`jaxeff.load(path)`: a Hugging Face directory, a GGUF file or a training run ->
model and tokenizer); `jaxeff.training` (the engine; `python -m jaxeff.train`) and
`jaxeff.generate` (`python -m jaxeff.generate`); `jaxeff.bench` (`python -m jaxeff.bench NAME`),
`jaxeff.host_malloc` (CPU-host settings the command lines apply).
"""

from jaxeff.config import ModelConfig

__all__ = ["ModelConfig", "load", "quantize"]

__version__ = "0.1.0"


def __getattr__(name):
  # `jaxeff.load(path)` and `jaxeff.quantize(model, bits=...)`, imported on first use so that
  # `import jaxeff` stays light (no jax, flax or model code).
  if name == "load":
    from jaxeff.loader import load

    return load
  if name == "quantize":
    from jaxeff.quantization import quantize

    return quantize
  raise AttributeError(f"module 'jaxeff' has no attribute {name!r}")
