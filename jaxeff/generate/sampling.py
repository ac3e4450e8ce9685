"""Next-token sampling inside the compiled step: greedy, temperature, top-k, top-p, min-p.

>>> import jax, jax.numpy as jnp
>>> from jaxeff.generate.sampling import SamplingParams, sample
>>> params = SamplingParams(temperature=0.8, top_p=0.95)
>>> logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))  # [B, V]
>>> keys = jax.random.split(jax.random.key(0), 2)                     # one key per row
>>> sample(logits, keys, params.static, params.values()).shape
(2,)
>>> sample(logits, keys, SamplingParams().static, {}).tolist()         # greedy: the argmax
[0, 2]

The filters apply in the order Hugging Face's `generate` applies them: temperature, then top-k
(keep the k largest logits), top-p (nucleus, Holtzman et al. 2020: keep the most probable tokens
until their probability mass reaches p) and min-p (Nguyen et al. 2024: keep tokens whose
probability is at least min_p times the largest). Ties at a filter's threshold are kept, so the kept
set never depends on the order of equal logits. temperature=0 is greedy (argmax, first index on a tie).

Each row draws from its own key, so a row's tokens depend only on its logits and its key: the same
seed gives the same tokens whether a prompt runs alone or in a batch.

What decides the compiled program's structure (greedy or not, top-k's k, whether top-p and min-p
apply) is static (`SamplingParams.static`, a hashable `SamplingShape`); the temperature, p and
min-p values are arrays, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.errors import GenerationError

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingShape:
  """The part of the sampling settings that shapes the compiled program (a jit static argument)."""

  greedy: bool = True
  top_k: int | None = None
  top_p: bool = False  # a nucleus filter runs (its p is an array)
  min_p: bool = False  # a min-p filter runs (its ratio is an array)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the next token. Defaults: greedy.

  Args:
    temperature: 0 for greedy; > 0 divides the logits before sampling.
    top_k: keep the k most likely tokens (None: all).
    top_p: keep the smallest most-likely set with probability mass >= top_p, in (0, 1] (None: all).
    min_p: keep tokens with probability >= min_p * the top probability, in [0, 1] (None: all).
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  min_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
      raise GenerationError(f"top_k must be a positive integer or None, got {self.top_k!r}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.min_p is not None and not 0 <= self.min_p <= 1:
      raise GenerationError(f"min_p must be in [0, 1], got {self.min_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def static(self) -> SamplingShape:
    """The part that shapes the compiled program (a jit static argument)."""
    if self.greedy:
      return SamplingShape()
    return SamplingShape(False, self.top_k, self.top_p is not None, self.min_p is not None)

  def values(self) -> dict[str, jax.Array]:
    """The part passed as arrays (changing it does not recompile)."""
    return {
      "temperature": jnp.float32(self.temperature or 1.0),
      "top_p": jnp.float32(self.top_p or 1.0),
      "min_p": jnp.float32(self.min_p or 0.0),
    }


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """logits [..., V] with everything below the k-th largest value set to -inf."""
  if k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, _NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Nucleus filter: keeps the most probable tokens until their mass reaches `top_p`."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  # top_p >= 1 keeps everything, even a tail whose rounded cumulative mass reaches 1 early.
  keep = (mass_before < top_p) | (top_p >= 1)
  keep = keep.at[..., 0].set(True)  # the most likely token always stays
  # The smallest kept logit is the threshold; everything at or above it stays (ties included).
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, _NEG_INF, logits)


def min_p_filter(logits: jax.Array, min_p: jax.Array) -> jax.Array:
  """Keeps tokens with probability >= min_p * max probability (a ratio, so no softmax needed)."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  # p_i / p_max = exp(l_i - l_max) >= min_p  <=>  l_i >= l_max + log(min_p)
  return jnp.where(logits < top + jnp.log(min_p), _NEG_INF, logits)


def filtered_logits(logits: jax.Array, static: SamplingShape, values: dict) -> jax.Array:
  """Temperature-scaled logits [B, V] with the configured filters applied (-inf outside)."""
  logits = logits.astype(jnp.float32) / values["temperature"]
  if static.top_k is not None:
    logits = top_k_filter(logits, static.top_k)
  if static.top_p:
    logits = top_p_filter(logits, values["top_p"])
  if static.min_p:
    logits = min_p_filter(logits, values["min_p"])
  return logits


def sample(logits: jax.Array, keys: jax.Array, static: SamplingShape, values: dict) -> jax.Array:
  """int32 tokens [B] from logits [B, V], one typed PRNG key per row (`keys` [B]); `static` and
  `values` are a `SamplingParams`' `.static` and `.values()`."""
  if static.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filtered_logits(logits, static, values)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def sample_rows(
  logits: jax.Array,
  keys: jax.Array,
  temperature: jax.Array,
  top_k: jax.Array,
  top_p: jax.Array,
  min_p: jax.Array,
) -> jax.Array:
  """int32 tokens [B] from logits [B, V], every row with its own settings (arrays [B]).

  What continuous batching needs: requests with different settings share one compiled step.
  temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 turn their filter off. A row gets exactly
  what `sample` gives it with the same settings and key (same filters, same order, same draw).
  When no row samples, the sort behind top-k/top-p is skipped at run time (`lax.cond`).
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled():
    x = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    vocab = x.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(jnp.sort(x, axis=-1)[:, ::-1], (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, _NEG_INF, x)
    x = top_p_filter(x, top_p[:, None])
    x = min_p_filter(x, min_p[:, None])
    drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
