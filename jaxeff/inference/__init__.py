"""The inference core: one model runner and one KV-cache policy interface under every driver.

- `runner.ModelRunner`: a model's weights, mesh, KV cache and compiled programs (prefill of a
  chunk for a set of rows, decode, an on-device decode loop, speculative draft and verification).
  `jaxeff.generate.Generator` (static batches), `jaxeff.serve.Engine` (continuous batching) and the
  speculative loop in both are drivers of it; none builds a model program of its own.
- `cache`: the policies (`Dense`, `StreamingLLM`, `H2O`, `SnapKV`, `KIVI`), each one file of one
  interface that the model's attention calls.
- `sampling`: one sampler for one row or many (per-row arrays, static program shape).
- `speculation`, `verify`, `tree`: the speculator interface, the verification rules and token trees.
- `perplexity`: a long text through a cache policy, chunk by chunk.
- `blocks`: the paged cache's block manager (reference counts, LRU free queue, prefix cache), which
  the serving engine's scheduler drives.
"""

from jaxeff.inference.blocks import BlockManager
from jaxeff.inference.cache import H2O, KIVI, Cache, CachePolicy, Dense, Paged, SnapKV, StreamingLLM
from jaxeff.inference.perplexity import perplexity, token_nll
from jaxeff.inference.runner import MAX_STOP_TOKENS, ModelRunner, RowArrays, RowSettings, row_arrays, shape_of
from jaxeff.inference.sampling import SamplingParams, SamplingShape

__all__ = [
  "BlockManager",
  "Cache",
  "CachePolicy",
  "Dense",
  "H2O",
  "KIVI",
  "MAX_STOP_TOKENS",
  "ModelRunner",
  "Paged",
  "RowArrays",
  "RowSettings",
  "SamplingParams",
  "SamplingShape",
  "SnapKV",
  "StreamingLLM",
  "perplexity",
  "row_arrays",
  "shape_of",
  "token_nll",
]
