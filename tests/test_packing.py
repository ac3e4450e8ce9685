"""Packed chat rows: several conversations in one row, kept apart by segment ids, train exactly as
the conversations would one by one (logits, masked loss and its gradients), for every attention
that masks by segment, at a length where the blocked attention really skips blocks."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxeff import ModelConfig
from jaxeff.data.chat import build_rows
from jaxeff.models import Llama
from jaxeff.models import attention as attention_lib
from jaxeff.training.step import next_token_loss

VOCAB = 64
ROW = 129  # seq_len 128 + the last target


def _conversations(rng, lengths):
  return [(rng.integers(0, VOCAB, n).astype(np.int32), rng.random(n) < 0.6) for n in lengths]


def test_next_fit_packing_keeps_order_segments_and_positions():
  rng = np.random.default_rng()
  convs = _conversations(rng, rng.integers(1, ROW + 1, 60))
  rows = build_rows(convs, ROW, pack=True)
  found, prev_used = [], None
  for r in range(len(rows)):
    segments = rows.segments[r]
    count = segments.max()
    used = int((segments > 0).sum())
    assert used <= ROW and (segments[used:] == 0).all()
    for seg in range(1, count + 1):
      at = np.flatnonzero(segments == seg)
      assert (np.diff(at) == 1).all()  # contiguous, in order
      np.testing.assert_array_equal(rows.positions[r, at], np.arange(len(at)))
      found.append((rows.tokens[r, at], rows.loss_mask[r, at]))
    if prev_used is not None:  # next-fit: the row's first conversation did not fit in the previous one
      assert prev_used + (segments == 1).sum() > ROW
    prev_used = used
  assert len(found) == len(convs)
  for (ids, mask), (want_ids, want_mask) in zip(found, convs):
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
  padded = build_rows(convs, ROW, pack=False)
  assert len(padded) == len(convs) and "segment_ids" not in padded.batch(np.arange(2))
  batch = rows.batch(np.arange(len(rows)))
  # No target crosses from one conversation into the next.
  seg = rows.segments
  assert not (batch["loss_mask"] & (seg[:, 1:] != seg[:, :-1])).any()


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_packed_row_trains_as_its_conversations_alone(attention):
  assert attention_lib._num_query_blocks(ROW - 1) == 4  # the blocked path skips blocks at this length
  cfg = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    attention=attention,
  )
  model = Llama(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng()
  lengths = [30, 9, 41, 25, 22]  # 127 tokens: one row, two padding slots
  convs = _conversations(rng, lengths)
  rows = build_rows(convs, ROW, pack=True)
  assert len(rows) == 1
  batch = rows.batch(np.array([0]))
  forward = nnx.jit(lambda m, *args: m(*args))  # one compile per shape, not op by op
  logits = forward(model, batch["inputs"], batch["positions"], batch["segment_ids"])
  at = 0
  for ids, _ in convs:
    alone = forward(model, ids[None])
    np.testing.assert_allclose(logits[0, at : at + len(ids)], alone[0], atol=2e-5, rtol=2e-5)
    at += len(ids)

  def alone_loss(m):
    losses, counts = [], []
    for ids, mask in convs:
      one = {"inputs": ids[None, :-1], "targets": ids[None, 1:], "loss_mask": mask[None, 1:]}
      counts.append(mask[1:].sum())
      losses.append(next_token_loss(m, one) * counts[-1])
    return sum(losses) / sum(counts)

  packed, packed_grads = nnx.jit(nnx.value_and_grad(lambda m: next_token_loss(m, batch)))(model)
  want, want_grads = nnx.jit(nnx.value_and_grad(alone_loss))(model)
  np.testing.assert_allclose(packed, want, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
  # Without the segment ids the same row is a different computation (the check can fail).
  mixed = forward(model, batch["inputs"], batch["positions"])
  assert np.abs(np.asarray(mixed[0, 30:39]) - np.asarray(logits[0, 30:39])).max() > 1e-3


def test_an_attention_without_segments_is_refused():
  sizes = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
  cfg = ModelConfig(vocab_size=VOCAB, attention="sparse", **sizes)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = np.zeros((1, 8), np.int32)
  with pytest.raises(ValueError, match=r"masks by segment \(blocked, dense\), not 'sparse'"):
    model(tokens, np.zeros_like(tokens), np.ones_like(tokens))
