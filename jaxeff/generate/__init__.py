"""Text generation with a static KV cache: `Generator`, `generate`, and `python -m jaxeff.generate`."""

from jaxeff.generate.engine import GenerationError, GenerationStats, Generator, generate, generator_for, prefill_bucket
from jaxeff.generate.sampling import SamplingParams

__all__ = [
  "GenerationError",
  "GenerationStats",
  "Generator",
  "generate",
  "generator_for",
  "prefill_bucket",
  "SamplingParams",
]
