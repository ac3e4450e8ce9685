"""jaxeff: efficient LLM training and inference in JAX/Flax.

Submodules: `jaxeff.models` (sharded Llama-family NNX models), `jaxeff.sharding` (logical-axis rules),
`jaxeff.hf` (Hugging Face checkpoint import/export), `jaxeff.optim` (optax transformations),
`jaxeff.data`, `jaxeff.train`, `jaxeff.bench`.
"""

from jaxeff.config import ModelConfig

__version__ = "0.1.0"
