"""H2O's heavy-hitter cache: the eviction rule against a NumPy replay of the paper's algorithm,
dense attention when the budget covers the text, a pure window when heavy = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.generate import GenerationError, Generator
from jaxeff.inference import H2O, StreamingLLM, perplexity
from jaxeff.models import Llama
from jaxeff.models.attention import BoundAttention, get_attention
from jaxeff.models.layers import Rope


def h2o_attention(q, k, v, positions, layer, *, heavy, recent):
  """The policy's attend for random q/k/v as given (an identity rotary embedding), dense attention."""
  rope = Rope.make(positions, jnp.zeros(q.shape[-1] // 2))
  return H2O(heavy=heavy, recent=recent).attend(
    positions, q, k, v, rope, layer, BoundAttention("dense", get_attention("dense"))
  )


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


def test_decode_eviction_matches_a_numpy_replay():
  """Single-token steps with random q, k, v (2 kv heads of 2 query heads): outputs, kept
  positions and accumulated scores == H2O's rule replayed in NumPy (softmax over the kept tokens
  plus the new one, scores accumulated, the lowest-scored token outside the recent window evicted)."""
  heavy, recent, steps, d = 3, 2, 24, 8
  rng = np.random.default_rng(1)
  q = rng.normal(size=(steps, 4, d)).astype(np.float32)
  k = rng.normal(size=(steps, 2, d)).astype(np.float32)
  v = rng.normal(size=(steps, 2, d)).astype(np.float32)
  t = heavy + recent
  layer = (jnp.zeros((1, 2, t, d)), jnp.zeros((1, 2, t, d)), jnp.full((1, 2, t), -1, jnp.int32), jnp.zeros((1, 2, t)))
  step = jax.jit(lambda *a: h2o_attention(*a, heavy=heavy, recent=recent))
  kept = [dict() for _ in range(2)]  # per kv head: position -> accumulated score
  for p in range(steps):
    out, layer = step(q[p][None, None], k[p][None, None], v[p][None, None], jnp.asarray([[p]]), layer)
    for head in range(2):
      cand = sorted(kept[head]) + [p]
      scores = {c: kept[head].get(c, 0.0) for c in cand}
      for g in range(2):
        logits = np.asarray([q[p, 2 * head + g] @ k[c, head] for c in cand]) / np.sqrt(d)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        np.testing.assert_allclose(np.asarray(out)[0, 0, 2 * head + g], probs @ v[cand, head], atol=1e-5)
        for c, w in zip(cand, probs):
          scores[c] += w
      if len(cand) > t:
        old = [c for c in cand if c <= p - recent]
        del scores[min(old, key=lambda c: (scores[c], c))]
      kept[head] = scores
      got_pos = np.asarray(layer[2])[0, head]
      got = {int(pos): float(s) for pos, s in zip(got_pos, np.asarray(layer[3])[0, head]) if pos >= 0}
      assert set(got) == set(scores), (p, head)
      np.testing.assert_allclose([got[c] for c in sorted(got)], [scores[c] for c in sorted(got)], atol=1e-5)


def test_covering_budget_is_dense_and_heavy_zero_is_a_window(model):
  dense = perplexity(model, TOKENS, chunk=16)
  assert perplexity(model, TOKENS, kv_cache=H2O(heavy=60, recent=60), chunk=16) == pytest.approx(dense, rel=1e-4)
  # Decode-style (chunks of one): the recent cached tokens plus the new one.
  window = perplexity(model, TOKENS[:60], kv_cache=StreamingLLM(sinks=0, window=9), chunk=1)
  assert perplexity(model, TOKENS[:60], kv_cache=H2O(heavy=0, recent=8), chunk=1) == pytest.approx(window, rel=1e-4)
  # Heavy hitters keep more of what matters than the same budget of recent tokens alone.
  both = perplexity(model, TOKENS, kv_cache=H2O(heavy=12, recent=12), chunk=1)
  recent_only = perplexity(model, TOKENS, kv_cache=H2O(heavy=0, recent=24), chunk=1)
  assert abs(both - dense) < abs(recent_only - dense)


def test_generator_with_h2o(model):
  prompts = [TOKENS[:9].tolist(), TOKENS[20:41].tolist()]
  dense = Generator(model, max_batch=2, max_seq_len=64).generate(prompts, max_new_tokens=30)
  covering = Generator(model, max_batch=2, max_seq_len=64, kv_cache=H2O(heavy=32, recent=32))
  assert covering.generate(prompts, max_new_tokens=30) == dense
  small = Generator(model, max_batch=2, max_seq_len=64, kv_cache=H2O(heavy=4, recent=4))
  out = small.generate(prompts, max_new_tokens=40)  # past max_seq_len in 8 slots
  assert [len(o) for o in out] == [40, 40] and small.cache_bytes == H2O(4, 4).cache_bytes(CFG, 2)
  with pytest.raises(GenerationError, match="heavy >= 0"):
    H2O(heavy=-1)


def test_h2o_is_bounded_by_the_trained_context(model):
  """Defect: H2O took any length although its positions stay absolute (no model was trained past
  its max_seq_len). A request must now fit the model's context; the cache's size does not matter."""
  short = ModelConfig(**{**CFG.__dict__, "max_seq_len": 40})
  gen = Generator(Llama(short, rngs=nnx.Rngs(0)), max_batch=1, max_seq_len=64, kv_cache=H2O(heavy=4, recent=4))
  assert len(gen.generate([TOKENS[:10].tolist()], max_new_tokens=30)[0]) == 30  # 40 positions: fits
  with pytest.raises(GenerationError, match="at most 30 new tokens fit"):
    gen.generate([TOKENS[:10].tolist()], max_new_tokens=31)
