"""jaxeff: efficient LLM training and inference in JAX/Flax.

Submodules: `jaxeff.models` (sharded Llama-family NNX models), `jaxeff.sharding` (logical-axis rules),
`jaxeff.hf` (Hugging Face checkpoint import/export; `.gguf` files through `jaxeff.gguf`),
`jaxeff.generate` (KV-cache generation, `python -m jaxeff.generate`), `jaxeff.optim` (optax transformations),
`jaxeff.data`, `jaxeff.train`, `jaxeff.host_malloc` (CPU-host malloc settings),
`jaxeff.quantization` (`jaxeff.quantize(model, bits=8)`), `jaxeff.bench`.
"""

import os as _os

# XLA:CPU's concurrency-optimized scheduler can run a multi-device program's collectives in a
# different order on different devices and deadlock (seen with GaLore's SVD gathers on an 8-device
# CPU mesh). Turning it off costs nothing measurable here; it only affects the CPU backend and only
# takes effect if jax has not created its CPU client yet.
_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get("XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + _CPU_FLAG).strip()

from jaxeff.config import ModelConfig  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
  # `jaxeff.quantize(model, bits=...)`, imported lazily so `import jaxeff` stays light.
  if name == "quantize":
    from jaxeff.quantization import quantize
    return quantize
  raise AttributeError(f"module 'jaxeff' has no attribute {name!r}")
