"""Text generation with a static KV cache: `Generator`, `generate`, and `python -m jaxeff.generate`."""

from jaxeff.generate.engine import GenerationError, GenerationStats, Generator, generate, prefill_bucket
from jaxeff.generate.sampling import SamplingParams
