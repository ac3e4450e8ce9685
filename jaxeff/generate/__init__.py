"""Text generation with a static KV cache: `Generator`, `generate`, and `python -m jaxeff.generate`."""

from jaxeff.generate.engine import GenerationError, GenerationStats, Generator, generate, generator_for, prefill_bucket
from jaxeff.generate.kv_cache import perplexity
from jaxeff.generate.sampling import SamplingParams

__all__ = [
  "GenerationError",
  "GenerationStats",
  "Generator",
  "generate",
  "generator_for",
  "perplexity",
  "prefill_bucket",
  "SamplingParams",
]
