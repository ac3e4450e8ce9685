"""What a request does to its logits before sampling, inside the compiled step, and the logprobs of
what it sampled: logit bias, penalties, min_tokens, grammar masks.

The rules (each row with its own values, neutral values leaving a row alone), applied in this order:
- `logit_bias` (OpenAI): a value in [-100, 100] added to a token's logit.
- `repetition_penalty` theta (CTRL, Keskar et al. 2019, as Hugging Face applies it): a token seen in
  the prompt or the output so far has its logit l divided by theta when l > 0, multiplied by theta
  otherwise (theta > 1 discourages repeats).
- `frequency_penalty` f and `presence_penalty` p (OpenAI, in [-2, 2]): l -= f * c + p * (c > 0), c
  the times the token was generated so far (the output only, as OpenAI and vLLM count).
- `min_tokens` m: the row's stop ids are masked (-inf) while it has generated fewer than m tokens.
- a grammar's bitmask (`jaxeff.serve.grammar`; int32 words, bit j of word i allows id 32 i + j):
  tokens it does not allow are -inf. Where min_tokens would leave a row nothing its grammar allows,
  the grammar wins (min_tokens gives way).

The counts live on the device (`TokenState`: per cache row, the output's token counts, the
prompt's tokens and the row's bias), set once when a request takes its row (`reset_row`) and
counted up in each step (`record`), so a step needs no per-token input from the host and a mix of
requests never recompiles.

Logprobs are those of the distribution the token was drawn from: the processed logits at the row's
temperature after its top-k/top-p/min-p filters (log-softmax; temperature 0: the processed logits
themselves), each row's sampled token and its `MAX_LOGPROBS` most likely ones.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import GenerationError

MAX_LOGPROBS = 20  # top logprobs a step returns per token (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (a fixed-size array in the reset program)


@dataclasses.dataclass(frozen=True)
class Penalties:
  """One request's logits processing (defaults: none). See the module docstring for the rules.

  Args:
    presence: OpenAI's presence_penalty, in [-2, 2].
    frequency: OpenAI's frequency_penalty, in [-2, 2].
    repetition: the CTRL/Hugging Face repetition_penalty, > 0 (1: off).
    min_tokens: the row's stop ids cannot end it before this many new tokens.
    logit_bias: (token id, bias in [-100, 100]) pairs.
  """

  presence: float = 0.0
  frequency: float = 0.0
  repetition: float = 1.0
  min_tokens: int = 0
  logit_bias: tuple[tuple[int, float], ...] = ()

  def __post_init__(self):
    for name in ("presence", "frequency"):
      if not -2 <= getattr(self, name) <= 2:
        raise GenerationError(f"{name}_penalty must be in [-2, 2], got {getattr(self, name)}")
    if not self.repetition > 0:
      raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition}")
    if self.min_tokens < 0:
      raise GenerationError(f"min_tokens must be >= 0, got {self.min_tokens}")
    if len(self.logit_bias) > MAX_LOGIT_BIAS:
      raise GenerationError(f"logit_bias has {len(self.logit_bias)} entries, at most {MAX_LOGIT_BIAS}")
    for token, bias in self.logit_bias:
      if not -100 <= bias <= 100:
        raise GenerationError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

  def check_vocab(self, vocab: int) -> None:
    bad = [t for t, _ in self.logit_bias if not 0 <= t < vocab]
    if bad:
      raise GenerationError(f"logit_bias token ids must lie in [0, {vocab}), got {bad[0]}")


NEUTRAL = Penalties()


class TokenState(NamedTuple):
  """Per cache row, on the device: what the penalties read."""

  counts: jax.Array  # [R, V] int32: times each token was generated (output only)
  prompt: jax.Array  # [R, V] bool: tokens of the prompt
  bias: jax.Array  # [R, V] float32: the row's logit bias


def init_state(rows: int, vocab: int) -> TokenState:
  return TokenState(
    jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), bool), jnp.zeros((rows, vocab), jnp.float32)
  )


def reset_row(state: TokenState, row, tokens, outputs, bias_ids, bias_values) -> TokenState:
  """Row `row` for a new request: `tokens` [L] its context (-1 pads), `outputs` [L] which of them
  it generated (after a preemption the tokens it had sent count as output), `bias_ids` [K] (-1
  pads) and `bias_values` [K]."""
  vocab = state.counts.shape[1]
  real = tokens >= 0
  at = jnp.where(real, tokens, vocab)  # padding: out of range, dropped
  counts = jnp.zeros(vocab, jnp.int32).at[jnp.where(outputs, at, vocab)].add(1, mode="drop")
  prompt = jnp.zeros(vocab, bool).at[jnp.where(outputs, vocab, at)].set(True, mode="drop")
  bias = jnp.zeros(vocab, jnp.float32).at[jnp.where(bias_ids >= 0, bias_ids, vocab)].add(bias_values, mode="drop")
  return TokenState(state.counts.at[row].set(counts), state.prompt.at[row].set(prompt), state.bias.at[row].set(bias))


def record(state: TokenState, rows, tokens, take) -> TokenState:
  """Counts `tokens` [S] into rows `rows` [S] where `take` [S] (a token sampled and kept)."""
  rows = jnp.where(take & (rows >= 0) & (tokens >= 0), rows, state.counts.shape[0])
  return state._replace(counts=state.counts.at[rows, jnp.maximum(tokens, 0)].add(1, mode="drop"))


def row_values(penalties: list[Penalties | None]) -> dict[str, np.ndarray]:
  """Per-row arrays [len(penalties)] of the penalties' values (None: neutral)."""
  p = [NEUTRAL if x is None else x for x in penalties]
  return {
    "presence": np.array([x.presence for x in p], np.float32),
    "frequency": np.array([x.frequency for x in p], np.float32),
    "repetition": np.array([x.repetition for x in p], np.float32),
    "min_tokens": np.array([x.min_tokens for x in p], np.int32),
    "biased": np.array([bool(x.logit_bias) for x in p], bool),
  }


def unpack_mask(words, vocab: int):
  """Bitmask words [S, W] int32 -> allowed [S, vocab] bool."""
  bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
  return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def process(logits, state: TokenState | None, state_rows, values: dict, stops, masks, more_counts=None):
  """logits [S, V] with each row's processing applied (module docstring): `state` the device
  counts (None: no penalties), `state_rows` [S] each row's row in it (-1: none), `values` per-row
  arrays (`row_values`), `stops` [S, K] the rows' stop ids (-1 pads), `masks` [S, W] grammar
  bitmasks (all ones: unconstrained) or None; `more_counts()`: [S, V] tokens generated beyond the
  state's (a speculation tree's path to each node). Skipped at run time when no row asks for any."""
  s, vocab = logits.shape
  x = logits.astype(jnp.float32)
  if state is not None:
    safe = jnp.maximum(state_rows, 0)
    rep, pres, freq = (values[k][:, None] for k in ("repetition", "presence", "frequency"))
    active = (values["repetition"] != 1) | (values["presence"] != 0) | (values["frequency"] != 0) | values["biased"]
    active |= values["min_tokens"] > 0

    def penalize(x):
      counts = state.counts[safe] if more_counts is None else state.counts[safe] + more_counts()
      x = x + state.bias[safe]
      seen = (counts > 0) | state.prompt[safe]
      x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
      x = x - freq * counts - pres * (counts > 0)
      generated = jnp.sum(counts, axis=1)
      early = (generated < values["min_tokens"])[:, None]
      rows = jnp.broadcast_to(jnp.arange(s)[:, None], stops.shape)
      is_stop = jnp.zeros((s, vocab), bool).at[rows, jnp.where(stops >= 0, stops, vocab)].set(True, mode="drop")
      held = jnp.where(early & is_stop, -jnp.inf, x)
      if masks is not None:  # min_tokens gives way where it would leave the grammar nothing
        allowed = unpack_mask(masks, vocab)
        held = jnp.where(jnp.any(allowed & (held > -jnp.inf), axis=1, keepdims=True), held, x)
      return jnp.where(active[:, None], held, logits.astype(jnp.float32))

    x = jax.lax.cond(jnp.any(active & (state_rows >= 0)), penalize, lambda x: x, x)
  if masks is not None:
    x = jax.lax.cond(jnp.any(masks != -1), lambda x: jnp.where(unpack_mask(masks, vocab), x, -jnp.inf), lambda x: x, x)
  return x


class Logprobs(NamedTuple):
  """Logprobs of sampled (or scored) tokens: the token's, and the most likely ones'."""

  token: jax.Array  # [...] float32
  top_ids: jax.Array  # [..., MAX_LOGPROBS] int32
  top: jax.Array  # [..., MAX_LOGPROBS] float32


def logprobs_of(logits, tokens) -> Logprobs:
  """Log-softmax of logits [..., V] at `tokens` [...] (-1: 0) and its top MAX_LOGPROBS."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(lp, jnp.maximum(tokens, 0)[..., None], axis=-1)[..., 0]
  top, top_ids = jax.lax.top_k(lp, min(MAX_LOGPROBS, lp.shape[-1]))
  return Logprobs(token, top_ids.astype(jnp.int32), top)


def empty_logprobs(shape, vocab: int) -> Logprobs:
  k = min(MAX_LOGPROBS, vocab)
  return Logprobs(jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, k), jnp.int32), jnp.zeros((*shape, k), jnp.float32))
