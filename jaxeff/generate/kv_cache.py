"""KV-cache policies: what a decoder keeps of its past, in a fixed-size buffer, and `perplexity`.

>>> import numpy as np
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.generate.kv_cache import StreamingLLM, perplexity
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> tokens = np.random.default_rng(0).integers(0, 64, 200)
>>> dense = perplexity(model, tokens, chunk=64)
>>> covered = perplexity(model, tokens, kv_cache=StreamingLLM(sinks=4, window=196), chunk=64)
>>> bool(abs(dense - covered) < 1e-3 * dense)        # a budget that covers the text: dense attention
True
>>> StreamingLLM(sinks=4, window=28).cache_bytes(cfg, batch_size=1)   # flat: 32 slots, however long
4224

Policies (each a fixed-shape buffer sharded by the cache's logical axes):
- `Dense()`: the static cache, one slot per position (`jaxeff.models.kv_cache`), the default.
- `StreamingLLM(sinks=4, window=W)` (Xiao et al. 2024): the first `sinks` tokens plus the last
  `window`, positions cache-relative as in the paper (`jaxeff.models.ring_cache`), so text may run
  on past the trained context with flat memory.
- `H2O(heavy=HH, recent=R)` (Zhang et al. 2023): per layer and kv head, the HH tokens with the
  most accumulated attention plus the R newest (`jaxeff.models.h2o_cache`); scores are updated
  inside the compiled step.
- `SnapKV(budget=C, window=32, pool=7)` (Li et al. 2024): at prefill, per layer and kv head, what
  the prompt's last `window` tokens attend to (`jaxeff.models.snapkv_cache`); decoding appends.
- `KIVI(bits=2|4, group=32, residual=128)` (Liu et al. 2024): every token, keys quantized per
  channel and values per token, the newest in full precision (`jaxeff.models.kivi_cache`).

`perplexity(model, tokens, kv_cache=policy, chunk=256)` is next-token perplexity of a long
sequence as a decoder with that cache sees it: the text goes through the cache in chunks (each
token attends to what the policy kept of the past, plus the chunk up to itself), the measurement
every paper of this family reports.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.errors import GenerationError
from jaxeff.models import h2o_cache, kivi_cache, ring_cache, snapkv_cache
from jaxeff.models import kv_cache as dense_cache


class CachePolicy:
  """What every policy answers; the defaults are the dense cache's (one slot per position)."""

  def init(self, cfg, batch_size: int, length: int):
    raise NotImplementedError

  def cache_bytes(self, cfg, batch_size: int, length: int | None = None) -> int:
    """Bytes `init` would allocate (every buffer, bookkeeping included)."""
    shapes = jax.eval_shape(lambda: self.init(cfg, batch_size, length))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  def max_chunk(self, length: int) -> int:
    """Most tokens one forward may bring (prefill reads longer prompts in chunks of this)."""
    return length

  def slots_needed(self, prompt: int, new_tokens: int) -> int:
    """Cache slots a request of `prompt` tokens plus `new_tokens` needs (0: any fits)."""
    return prompt + new_tokens

  def reading_length(self, length: int, chunk: int) -> int:
    """The `length` to `init` a cache with for reading a text of `length` tokens in chunks."""
    return length


@dataclasses.dataclass(frozen=True)
class Dense(CachePolicy):
  """One slot per position: exact attention, memory grows with the text."""

  def init(self, cfg, batch_size: int, length: int):
    return dense_cache.init_cache(cfg, batch_size, length)


@dataclasses.dataclass(frozen=True)
class StreamingLLM(CachePolicy):
  """Attention sinks plus a window of recent tokens (StreamingLLM): `sinks + window` slots.

  Args:
    sinks: the first tokens, kept forever (the paper: 4).
    window: recent tokens kept; a chunk of new tokens holds at most this many.
  """

  sinks: int = 4
  window: int = 1020

  def __post_init__(self):
    if self.sinks < 0 or self.window < 1:
      raise GenerationError(f"StreamingLLM needs sinks >= 0 and window >= 1, got {self.sinks}, {self.window}")

  def init(self, cfg, batch_size: int, length: int | None = None):
    return ring_cache.init_ring_cache(cfg, batch_size, sinks=self.sinks, window=self.window)

  def reset(self, cache):
    return ring_cache.reset(cache)

  def max_chunk(self, length: int) -> int:
    return self.window

  def slots_needed(self, prompt: int, new_tokens: int) -> int:
    return 0  # bounded: any request fits


@dataclasses.dataclass(frozen=True)
class H2O(CachePolicy):
  """Heavy-hitter oracle (H2O): the `heavy` tokens with the most accumulated attention plus the
  `recent` newest, per layer and kv head: `heavy + recent` slots. Positions stay absolute (as the
  paper's), so text is bounded by the model's trained context, memory is not.

  Args:
    heavy: heavy hitters kept (the paper: 20% of the budget works as well as the full cache).
    recent: newest tokens kept; a chunk of new tokens holds at most heavy + recent.
  """

  heavy: int = 64
  recent: int = 64

  def __post_init__(self):
    if self.heavy < 0 or self.recent < 1:
      raise GenerationError(f"H2O needs heavy >= 0 and recent >= 1, got {self.heavy}, {self.recent}")

  def init(self, cfg, batch_size: int, length: int | None = None):
    return h2o_cache.init_h2o_cache(cfg, batch_size, heavy=self.heavy, recent=self.recent)

  def reset(self, cache):
    return h2o_cache.reset(cache)

  def max_chunk(self, length: int) -> int:
    return self.heavy + self.recent

  def slots_needed(self, prompt: int, new_tokens: int) -> int:
    return 0  # bounded: any request fits


@dataclasses.dataclass(frozen=True)
class SnapKV(CachePolicy):
  """Prompt-time selection (SnapKV): at prefill, per layer and kv head, the `budget - window`
  earlier tokens the last `window` prompt tokens attend to most (votes average-pooled over `pool`
  neighbours) plus that window stay; decoding appends to them. Memory: the budget plus the new
  tokens, however long the prompt. Positions stay absolute (text bounded by the trained context).

  With a `Generator`, `max_seq_len` is the cache's slots: min(prompt, budget) plus the new tokens
  must fit, and a prompt is prefilled in one chunk (the paper's selection). `perplexity` reads a
  text in chunks and compresses after each (chunk 1: no compression, plain dense attention).

  Args:
    budget: prompt entries kept per layer and kv head, the observation window included.
    window: the observation window (the paper: 32); each chunk holds at least one of its queries.
    pool: average-pooling kernel over the votes (the paper: 7; odd).
  """

  budget: int = 1024
  window: int = 32
  pool: int = 7

  def __post_init__(self):
    if not 1 <= self.window < self.budget or self.pool < 1:
      raise GenerationError(
        f"SnapKV needs 1 <= window < budget and pool >= 1, got budget={self.budget}, window={self.window}, "
        f"pool={self.pool}"
      )

  def init(self, cfg, batch_size: int, length: int):
    if length < self.budget:
      raise GenerationError(f"SnapKV(budget={self.budget}) needs at least {self.budget} cache slots, got {length}")
    return snapkv_cache.init_snapkv_cache(
      cfg, batch_size, length, budget=self.budget, window=self.window, pool=self.pool
    )

  def reset(self, cache):
    return snapkv_cache.reset(cache)

  def max_chunk(self, length: int) -> int:
    return 1 << 30  # no limit: a prompt is selected from in one chunk

  def slots_needed(self, prompt: int, new_tokens: int) -> int:
    # The cache holds the whole budget after a selection, whatever the request.
    return max(self.budget, min(prompt, self.budget) + new_tokens)

  def reading_length(self, length: int, chunk: int) -> int:
    return length if chunk == 1 else self.budget


@dataclasses.dataclass(frozen=True)
class KIVI(CachePolicy):
  """Low-bit cache (KIVI): keys quantized per channel over groups of `group` tokens, values per
  token, to `bits` bits; the newest `residual` tokens (at least residual - group + 1) stay in full
  precision. Every token is kept, in about bits/16 of a 16-bit cache's bytes plus scales.

  With a `Generator`, `max_seq_len` is the positions per row, as with the dense cache; a prompt of
  up to `prefill_chunk` tokens is prefilled in one chunk in full precision, then quantized (the
  paper's prefill).

  Args:
    bits: 2 or 4 (8 also works).
    group: tokens per key scale, channels per value scale (the paper: 32).
    residual: full-precision tokens, a multiple of `group` (the paper: 128).
    prefill_chunk: a `Generator` reads longer prompts in chunks of this many tokens (each attends
      in full precision to itself and the residual, to the older tokens quantized), which bounds
      prefill's attention memory.
    impl, interpret: the quantized-attention op's implementation
      (`pallas_kernels.kivi_attention.quantized_attention`; default: the Pallas kernel on TPU and
      GPU, the XLA path on CPU).
  """

  bits: int = 2
  group: int = 32
  residual: int = 128
  prefill_chunk: int = 2048
  impl: str | None = None
  interpret: bool = False

  def __post_init__(self):
    if self.prefill_chunk < 1:
      raise GenerationError(f"KIVI's prefill_chunk must be >= 1, got {self.prefill_chunk}")
    if self.bits not in (2, 4, 8) or self.group < 1 or self.residual < self.group or self.residual % self.group:
      raise GenerationError(
        f"KIVI needs bits in (2, 4, 8), group >= 1 and residual a positive multiple of group, got "
        f"bits={self.bits}, group={self.group}, residual={self.residual}"
      )

  def init(self, cfg, batch_size: int, length: int):
    try:
      kivi_cache.check_settings(cfg, self.bits, self.group, self.residual)
    except ValueError as e:
      raise GenerationError(str(e)) from None
    return kivi_cache.init_kivi_cache(
      cfg,
      batch_size,
      length,
      bits=self.bits,
      group=self.group,
      residual=self.residual,
      impl=self.impl,
      interpret=self.interpret,
    )

  def reset(self, cache):
    return kivi_cache.reset(cache)

  def max_chunk(self, length: int) -> int:
    return self.prefill_chunk


def _forward_program(graphdef):
  @functools.partial(jax.jit, donate_argnums=1)
  def forward(state, cache, tokens, positions, targets):
    model = nnx.merge(graphdef, state)
    x, cache = model.forward_with_cache(tokens, positions, cache)
    logp = jax.nn.log_softmax(model.logits(x), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], cache

  return forward


def token_nll(model, tokens, *, kv_cache=None, chunk: int = 256) -> np.ndarray:
  """Next-token negative log-likelihoods [B, N-1] of `tokens` (int [N] or [B, N]) read in chunks
  through the cache policy `kv_cache` (None: `Dense()`), as a decoder with that cache sees it.

  Every chunk compiles once (a shorter last chunk is padded, its tail dropped), so the cost is one
  program per call whatever the length. Raises GenerationError for bad input."""
  policy = Dense() if kv_cache is None else kv_cache
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise GenerationError(f"perplexity needs at least 2 tokens per row, got shape {tokens.shape}")
  if tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size:
    raise GenerationError(f"token ids must lie in [0, {model.cfg.vocab_size})")
  b, n = tokens.shape
  if chunk < 1:
    raise GenerationError(f"chunk must be >= 1, got {chunk}")
  chunk = min(chunk, policy.max_chunk(n), n - 1)
  steps = math.ceil((n - 1) / chunk)
  length = steps * chunk  # the dense cache holds the padded text
  graphdef, state = nnx.split(model)
  forward = _forward_program(graphdef)
  cache = jax.jit(lambda: policy.init(model.cfg, b, policy.reading_length(length, chunk)))()
  # Committed like the cache each chunk returns, so the second chunk reuses the first's program.
  cache = jax.device_put(cache, jax.tree.leaves(state)[0].sharding)
  padded = np.zeros((b, length + 1), np.int32)
  padded[:, :n] = tokens
  nll = []
  for i in range(steps):
    start = i * chunk
    positions = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (b, chunk))
    out, cache = forward(
      state, cache, padded[:, start : start + chunk], positions, padded[:, start + 1 : start + chunk + 1]
    )
    nll.append(np.asarray(out, np.float64))
  return np.concatenate(nll, axis=1)[:, : n - 1]  # the padded tail predicts nothing


def perplexity(model, tokens, *, kv_cache=None, chunk: int = 256) -> float:
  """exp(mean next-token negative log-likelihood) of `tokens` (int [N] or [B, N]) read in chunks
  through the cache policy `kv_cache` (None: `Dense()`); see `token_nll`."""
  return math.exp(float(token_nll(model, tokens, kv_cache=kv_cache, chunk=chunk).mean()))
