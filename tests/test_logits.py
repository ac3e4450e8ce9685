"""Per-row logits processing and logprobs (jaxeff.inference.logits) against NumPy written from each
rule's definition, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.errors import GenerationError
from jaxeff.inference import logits as L
from jaxeff.inference.sampling import SamplingParams, SamplingShape, row_values, sample_scored

V, S = 40, 6


def _reference(logits, counts, prompt, bias, p, stops, allowed):
  """One row, NumPy: bias, repetition (prompt + output), frequency/presence (output), min_tokens, mask."""
  x = logits.astype(np.float64) + bias
  seen = (counts > 0) | prompt
  x = np.where(seen, np.where(x > 0, x / p.repetition, x * p.repetition), x)
  x = x - p.frequency * counts - p.presence * (counts > 0)
  held = x.copy()
  if counts.sum() < p.min_tokens:
    held[[s for s in stops if s >= 0]] = -np.inf
  if allowed is not None:
    if not np.any(allowed & np.isfinite(held)):
      held = x  # min_tokens gives way to the grammar
    held = np.where(allowed, held, -np.inf)
  return held


def _mask_words(allowed):
  words = np.zeros((allowed.shape[0], -(-allowed.shape[1] // 32)), np.uint32)
  for r, c in zip(*np.nonzero(allowed)):
    words[r, c // 32] |= np.uint32(1) << np.uint32(c % 32)
  return words.view(np.int32)


def test_processing_matches_each_rule_row_by_row():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(S, V)).astype(np.float32) * 3
  counts = rng.integers(0, 3, size=(S, V)) * (rng.random((S, V)) < 0.2)
  prompt = rng.random((S, V)) < 0.15
  bias = np.zeros((S, V), np.float32)
  bias[:, 3] = 5.0
  bias[1, 7] = -100.0
  penalties = [
    L.Penalties(),  # neutral: untouched
    L.Penalties(presence=0.7, frequency=0.3, logit_bias=((7, -100.0),)),
    L.Penalties(repetition=1.3),
    L.Penalties(repetition=0.8, frequency=-0.5),
    L.Penalties(min_tokens=10_000),  # its stop ids masked
    L.Penalties(min_tokens=10_000),  # ... unless the grammar allows nothing else
  ]
  stops = np.full((S, 4), -1, np.int32)
  stops[:, 0], stops[:, 1] = 5, 9
  allowed = np.ones((S, V), bool)
  allowed[2, ::2] = False
  allowed[5] = False
  allowed[5, 9] = True  # only a stop id
  state = L.TokenState(jnp.asarray(counts, jnp.int32), jnp.asarray(prompt), jnp.asarray(bias))
  values = L.row_values(penalties)
  values["biased"][:] = True  # every row's bias applies (zeros for most)
  masks = jnp.asarray(_mask_words(allowed))
  out = L.process(jnp.asarray(logits), state, jnp.arange(S), values, jnp.asarray(stops), masks)
  for r in range(S):
    want = _reference(logits[r], counts[r], prompt[r], bias[r], penalties[r], stops[r], allowed[r])
    np.testing.assert_allclose(np.asarray(out[r]), want, rtol=1e-5, atol=1e-5, err_msg=f"row {r}")
  assert np.isneginf(np.asarray(out[4])[[5, 9]]).all() and np.asarray(out[5])[9] > -np.inf


def test_state_reset_and_record_count_the_output_only():
  state = L.init_state(3, V)
  context = np.array([4, 4, 6, 11, 11, 11], np.int32)  # the last 2 were generated before a preemption
  tokens = np.full(10, -1, np.int32)
  tokens[:6] = context
  outputs = np.arange(10) >= 4
  ids, vals = np.full(5, -1, np.int32), np.zeros(5, np.float32)
  ids[:2], vals[:2] = [2, 2], [1.5, 2.0]
  state = L.reset_row(state, 1, tokens, outputs, ids, vals)
  state = L.record(state, jnp.array([1, -1, 1]), jnp.array([6, 6, 0]), jnp.array([True, True, False]))
  counts, prompt, bias = (np.asarray(x) for x in state)
  assert counts[1, 11] == 2 and counts[1, 6] == 1 and counts.sum() == 3
  assert prompt[1, [4, 6, 11]].all() and prompt.sum() == 3  # 11 is also in the prompt (index 3)
  assert bias[1, 2] == 3.5 and bias.sum() == 3.5


def test_sampled_logprobs_are_the_filtered_distributions():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(4, V)).astype(np.float32) * 2)
  params = [SamplingParams(), SamplingParams(0.7), SamplingParams(1.3, top_k=5), SamplingParams(0.9, top_p=0.8)]
  values = row_values(params)
  keys = jax.random.split(jax.random.key(3), 4)
  tokens, lp = sample_scored(logits, keys, SamplingShape.any(), values, jnp.ones(4, bool))
  tokens, x = np.asarray(tokens), np.asarray(logits, np.float64)
  for r, p in enumerate(params):
    z = x[r] / (p.temperature or 1.0)
    if p.top_k:
      z = np.where(z < np.sort(z)[::-1][p.top_k - 1], -np.inf, z)
    if p.top_p:
      order = np.argsort(-z)
      probs = np.exp(z[order] - z.max())
      probs /= probs.sum()
      keep = (np.cumsum(probs) - probs) < p.top_p
      z = np.where(z < z[order][keep].min(), -np.inf, z)
    ref = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
    assert ref[tokens[r]] > -np.inf  # the drawn token is inside the filtered set
    np.testing.assert_allclose(float(lp.token[r]), ref[tokens[r]], rtol=1e-5, atol=1e-5)
    top_ids = np.asarray(lp.top_ids[r])
    np.testing.assert_allclose(np.asarray(lp.top[r]), ref[top_ids], rtol=1e-5, atol=1e-5)
    top = np.asarray(lp.top[r])
    assert np.all(top[:-1] >= top[1:]) and ref[top_ids[0]] == ref.max()
  assert tokens[0] == int(np.argmax(x[0]))  # greedy row


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(presence=2.5), "presence_penalty must be in"),
    (dict(repetition=0), "repetition_penalty must be > 0"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(logit_bias=((1, 101.0),)), "logit_bias values"),
  ],
)
def test_bad_penalties_are_one_clear_error(kwargs, message):
  with pytest.raises(GenerationError, match=message):
    L.Penalties(**kwargs)
