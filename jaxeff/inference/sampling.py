"""One sampler for one row or many, inside the compiled step: greedy, temperature, top-k, top-p, min-p.

>>> import jax, jax.numpy as jnp
>>> from jaxeff.inference.sampling import SamplingParams, sample
>>> params = SamplingParams(temperature=0.8, top_p=0.95)
>>> logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))  # [B, V]
>>> keys = jax.random.split(jax.random.key(0), 2)                     # one key per row
>>> sample(logits, keys, params.static, params.rows(2)).shape
(2,)
>>> sample(logits, keys, SamplingParams().static, SamplingParams().rows(2)).tolist()   # greedy: the argmax
[0, 2]

The filters apply in the order Hugging Face's `generate` applies them: temperature, then top-k
(keep the k largest logits), top-p (nucleus, Holtzman et al. 2020: keep the most probable tokens
until their probability mass reaches p) and min-p (Nguyen et al. 2024: keep tokens whose
probability is at least min_p times the largest). Ties at a filter's threshold are kept, so the kept
set never depends on the order of equal logits. temperature=0 is greedy (argmax, first index on a tie).

Settings travel in two parts. What shapes the compiled program (greedy or not, which filters may
run) is static: a hashable `SamplingShape`. The values are per-row arrays (`SamplingParams.rows`,
or `row_values` for rows with different settings, as continuous batching has): temperature, top_k,
top_p, min_p, each [B], with neutral values (top_k 0, top_p 1, min_p 0) turning a row's filter
off and temperature 0 making a row greedy. New values never recompile.

Each row draws from its own key, so a row's tokens depend only on its logits, its settings and its
key: the same seed gives the same tokens whether a prompt runs alone or in a batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import GenerationError
from jaxeff.inference import logits as logits_lib

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingShape:
  """The part of the sampling settings that shapes the compiled program (a jit static argument):
  greedy (argmax only), or sampling with the filters that may be on in some row."""

  greedy: bool = True
  top_k: bool = False
  top_p: bool = False
  min_p: bool = False

  @classmethod
  def any(cls) -> SamplingShape:
    """Every filter may be on: one program for any mix of rows (continuous batching)."""
    return cls(False, True, True, True)


NEUTRAL = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
_DTYPES = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32}


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
    if self.top_k is not None and (
      not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < 1
    ):
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
    return SamplingShape(False, self.top_k is not None, self.top_p is not None, self.min_p is not None)

  def value(self) -> dict[str, float]:
    """This request's values, neutral where a filter is off."""
    if self.greedy:
      return dict(NEUTRAL)
    return {
      "temperature": float(self.temperature),
      "top_k": int(self.top_k or 0),
      "top_p": 1.0 if self.top_p is None else float(self.top_p),
      "min_p": 0.0 if self.min_p is None else float(self.min_p),
    }

  def rows(self, n: int) -> dict[str, np.ndarray]:
    """The values as per-row arrays for `n` rows alike."""
    return row_values([self] * n)


def row_values(params: list[SamplingParams | None]) -> dict[str, np.ndarray]:
  """Per-row value arrays [len(params)]: row i with `params[i]`'s values (None: greedy)."""
  out = {name: np.full(len(params), value, _DTYPES[name]) for name, value in NEUTRAL.items()}
  for i, p in enumerate(params):
    if p is not None:
      for name, value in p.value().items():
        out[name][i] = value
  return out


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
  """Temperature-scaled logits [B, V] with the filters of `static` applied, each row with its own
  values ([B] arrays; neutral values leave a row alone): -inf outside what is kept."""
  b, vocab = logits.shape
  row = lambda name: jnp.broadcast_to(jnp.asarray(values[name]), (b,))[:, None]
  temperature = row("temperature")
  x = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  # A filter no row uses is skipped at run time: its sort over the vocabulary is most of a
  # sampled step's cost on a CPU (a continuous-batching program allows every filter).
  if static.top_k:
    top_k = row("top_k")

    def keep_top_k(x):
      k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
      kth = jnp.take_along_axis(jnp.sort(x, axis=-1)[:, ::-1], k - 1, axis=-1)
      return jnp.where(x < kth, _NEG_INF, x)

    x = jax.lax.cond(jnp.any(top_k > 0), keep_top_k, lambda x: x, x)
  if static.top_p:
    top_p = row("top_p")
    x = jax.lax.cond(jnp.any(top_p < 1), lambda x: top_p_filter(x, top_p), lambda x: x, x)
  if static.min_p:
    min_p = row("min_p")
    x = jax.lax.cond(jnp.any(min_p > 0), lambda x: min_p_filter(x, min_p), lambda x: x, x)
  return x


def sample(logits: jax.Array, keys: jax.Array, static: SamplingShape, values: dict) -> jax.Array:
  """int32 tokens [B] from logits [B, V]: one typed PRNG key per row (`keys` [B]), the program's
  `SamplingShape` and per-row `values` (`SamplingParams.rows` / `row_values`). Rows with
  temperature 0 take the argmax; when no row samples, the filters are skipped at run time."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if static.greedy:
    return greedy
  temperature = jnp.broadcast_to(jnp.asarray(values["temperature"]), greedy.shape)

  def sampled():
    drawn = jax.vmap(jax.random.categorical)(keys, filtered_logits(logits, static, values)).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def sample_scored(logits, keys, static: SamplingShape, values: dict, want):
  """`sample`, and the logprobs of what each row drew (`jaxeff.inference.logits.Logprobs`: from
  the distribution it was drawn from, after temperature and filters) where `want` [B]; the
  filters and the log-softmax run only when some row samples or wants logprobs."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature = jnp.broadcast_to(jnp.asarray(values["temperature"]), greedy.shape)
  b, vocab = logits.shape

  def full():
    x = filtered_logits(logits, static, values)
    tokens = greedy
    if not static.greedy:
      drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
      tokens = jnp.where(temperature > 0, drawn, greedy)
    return tokens, logits_lib.logprobs_of(x, tokens)

  busy = jnp.any(want) if static.greedy else jnp.any(want) | jnp.any(temperature > 0)
  return jax.lax.cond(busy, full, lambda: (greedy, logits_lib.empty_logprobs((b,), vocab)))
