"""Text generation: `Generator` (static batches on the inference core's model runner), `generate`,
speculative decoding (`jaxeff.generate.speculative`), and `python -m jaxeff.generate`."""

from jaxeff.errors import GenerationError
from jaxeff.generate.generator import GenerationStats, Generator, generate, generator_for, prefill_bucket
from jaxeff.inference.perplexity import perplexity
from jaxeff.inference.sampling import SamplingParams

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
