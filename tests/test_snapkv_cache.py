"""SnapKV: the kept entries against a NumPy re-computation of the paper's selection, appending at
decode, dense attention when the budget covers the text, and the Generator with long prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.generate import GenerationError, Generator
from jaxeff.inference import SnapKV, perplexity
from jaxeff.models import Llama
from jaxeff.models.attention import BoundAttention, get_attention
from jaxeff.models.layers import Rope


def snapkv_attention(q, k, v, positions, layer, **settings):
  """The policy's attend for random q/k/v as given (an identity rotary embedding), dense attention."""
  rope = Rope.make(positions, jnp.zeros(q.shape[-1] // 2))
  return SnapKV(**settings).attend(positions, q, k, v, rope, layer, BoundAttention("dense", get_attention("dense")))


CFG = ModelConfig(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  initializer_range=0.3,
)
TOKENS = np.random.default_rng(0).integers(0, 64, 120)


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(0))


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _numpy_snapkv(q, k, length, *, budget, window, pool):
  """The paper's selection for one row and kv head group: q [L, G, D], k [L, D] -> kept positions."""
  q, k = q[:length], k[:length]
  if length <= budget:
    return set(range(length))
  d = q.shape[-1]
  obs = q[length - window :]  # [W, G, D]
  logits = np.einsum("wgd,td->wgt", obs, k) / np.sqrt(d)
  query_pos = np.arange(length - window, length)[:, None, None]
  logits = np.where(np.arange(length)[None, None, :] <= query_pos, logits, -np.inf)
  votes = _softmax(logits).sum(axis=(0, 1))[: length - window]
  padded = np.pad(votes, (pool // 2, pool - 1 - pool // 2))
  pooled = np.array([padded[i : i + pool].sum() / pool for i in range(length - window)])
  top = np.argsort(-pooled, kind="stable")[: budget - window]
  return set(top.tolist()) | set(range(length - window, length))


def test_prefill_selection_and_decode_append_match_numpy():
  """Random q/k/v over a ragged batch (prompts of 40 and 29 tokens, one chunk of 48): the kept
  positions per kv head == the NumPy selection (observation-window votes summed over the group,
  zero-padded average pooling, top budget - window plus the window); kept keys are the right
  rows; outputs are causal attention; then one decode step attends over kept + new and appends."""
  budget, window, pool, d, chunk = 16, 6, 5, 8, 48
  lengths = [40, 29]
  rng = np.random.default_rng(3)
  q = rng.normal(size=(2, chunk, 4, d)).astype(np.float32)
  k = rng.normal(size=(2, chunk, 2, d)).astype(np.float32)
  v = rng.normal(size=(2, chunk, 2, d)).astype(np.float32)
  positions = np.array([[p if p < n else -1 for p in range(chunk)] for n in lengths], np.int32)
  slots = 20
  layer = (jnp.zeros((2, 2, slots, d)), jnp.zeros((2, 2, slots, d)), jnp.full((2, 2, slots), -1, jnp.int32))
  step = jax.jit(lambda *a: snapkv_attention(*a, budget=budget, window=window, pool=pool))
  out, layer = step(q, k, v, positions, layer)
  k_cache, v_cache, slot_pos = (np.asarray(x) for x in layer)
  for row, n in enumerate(lengths):
    for head in range(2):
      want = _numpy_snapkv(
        q[row, :, 2 * head : 2 * head + 2], k[row, :, head], n, budget=budget, window=window, pool=pool
      )
      got = slot_pos[row, head]
      assert list(got[: len(want)]) == sorted(want), (row, head)  # position order, slots 0..
      assert (got[len(want) :] == -1).all()
      np.testing.assert_array_equal(k_cache[row, head, : len(want)], k[row, sorted(want), head])
      np.testing.assert_array_equal(v_cache[row, head, : len(want)], v[row, sorted(want), head])
      for g in range(2):
        logits = q[row, :n, 2 * head + g] @ k[row, :n, head].T / np.sqrt(d)
        probs = _softmax(np.where(np.tri(n, dtype=bool), logits, -np.inf))
        np.testing.assert_allclose(np.asarray(out)[row, :n, 2 * head + g], probs @ v[row, :n, head], atol=1e-5)
  assert len(_numpy_snapkv(q[1, :, :2], k[1, :, 0], 29, budget=budget, window=window, pool=pool)) == budget

  # Decode: one token per row at its next position sees the kept entries plus itself, then is appended.
  q1, k1, v1 = (rng.normal(size=(2, 1, h, d)).astype(np.float32) for h in (4, 2, 2))
  pos1 = np.array([[n] for n in lengths], np.int32)
  out1, after = step(q1, k1, v1, pos1, layer)
  for row, n in enumerate(lengths):
    for head in range(2):
      kept = slot_pos[row, head] >= 0
      keys = np.concatenate([k_cache[row, head, kept], k1[row, :, head]])
      values = np.concatenate([v_cache[row, head, kept], v1[row, :, head]])
      for g in range(2):
        probs = _softmax(keys @ q1[row, 0, 2 * head + g] / np.sqrt(d))
        np.testing.assert_allclose(np.asarray(out1)[row, 0, 2 * head + g], probs @ values, atol=1e-5)
      pos_after = np.asarray(after[2])[row, head]
      assert list(pos_after[: kept.sum() + 1]) == list(slot_pos[row, head, kept]) + [n]
      np.testing.assert_array_equal(np.asarray(after[0])[row, head, kept.sum()], k1[row, 0, head])


def test_covering_budget_is_dense_and_compression_costs_a_little(model):
  dense = perplexity(model, TOKENS, chunk=16)
  assert perplexity(model, TOKENS, kv_cache=SnapKV(budget=120, window=8), chunk=16) == pytest.approx(dense, rel=1e-4)
  squeezed = perplexity(model, TOKENS, kv_cache=SnapKV(budget=24, window=8), chunk=16)
  assert squeezed != pytest.approx(dense, rel=1e-4)
  # chunk 1 never compresses (selection happens on prompt chunks): dense attention.
  assert perplexity(model, TOKENS[:40], kv_cache=SnapKV(budget=24, window=8), chunk=1) == pytest.approx(
    perplexity(model, TOKENS[:40], chunk=1), rel=1e-4
  )


def test_generator_with_snapkv(model):
  prompts = [list(TOKENS[:30]), list(TOKENS[:17])]
  dense = Generator(model, max_batch=2, max_seq_len=64).generate(prompts, max_new_tokens=12)
  covering = Generator(model, max_batch=2, max_seq_len=64, kv_cache=SnapKV(budget=40, window=8))
  assert covering.generate(prompts, max_new_tokens=12) == dense
  # A prompt longer than the cache: compressed to the budget at prefill, then 20 tokens appended.
  long_prompt = list(TOKENS[:100])
  full = Generator(model, max_batch=2, max_seq_len=128).generate([long_prompt], max_new_tokens=20)[0]
  out = covering.generate([long_prompt], max_new_tokens=20)[0]
  assert len(out) == 20 and out[0] == full[0]  # the first token comes from the full prompt
  assert covering.cache_bytes == SnapKV(budget=40).cache_bytes(CFG, 2, 64)
  # One prefill per prompt bucket (32, 128), one decode loop per output bucket (16, 32).
  counts = {(key[0], key[2]) if key[0] == "prefill" else key[0]: n for key, n in covering.traces.items()}
  assert counts == {("prefill", 32): 1, ("prefill", 128): 1, "decode_loop": 2}
  with pytest.raises(GenerationError, match="at most 24 new tokens fit"):
    covering.generate([long_prompt], max_new_tokens=25)  # 40 kept + 25 > 64 slots


def test_long_prompt_memory_is_linear():
  """Defect: a prompt was prefilled as one chunk with [B, KVH, G, C, T + C] f32 scores: 17 GB for
  this 32k-token prompt on this small model, past the suite machine's memory. Prompts now come in
  `prefill_chunk`s and the votes read only the observation window's rows."""
  import psutil

  cfg = ModelConfig(**{**CFG.__dict__, "num_layers": 1, "max_seq_len": 1 << 16})
  model = Llama(cfg, rngs=nnx.Rngs(0))
  prompt = np.random.default_rng(1).integers(0, 64, 1 << 15).tolist()
  gen = Generator(model, max_batch=1, max_seq_len=72, kv_cache=SnapKV(budget=64, window=8, prefill_chunk=1024))
  before = psutil.Process().memory_info().rss
  assert len(gen.generate([prompt], max_new_tokens=8)[0]) == 8
  assert psutil.Process().memory_info().rss - before < 2 << 30
  assert {key[2] for key in gen.traces if key[0] == "prefill"} == {1024}  # 32 chunks, one program


def test_bad_settings():
  with pytest.raises(GenerationError, match="window < budget"):
    SnapKV(budget=32, window=32)
  with pytest.raises(GenerationError, match="at least 64 cache slots"):
    SnapKV(budget=64).init(CFG, 1, 32)
