"""KIVI's cache: a chunk's attention and the cache's contents against a NumPy replay of the paper's
scheme (keys per channel, values per token, the newest tokens in full precision), dense attention
when the residual covers the text, and the Generator."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.generate import GenerationError, Generator
from jaxeff.inference import KIVI, perplexity
from jaxeff.models import Llama
from jaxeff.models.attention import BoundAttention, get_attention
from jaxeff.models.layers import Rope

CFG = ModelConfig(
  vocab_size=64,
  hidden_size=64,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  initializer_range=0.3,
)
TOKENS = np.random.default_rng(0).integers(0, 64, 160)


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(0))


def _np_quantize(x, bits, axis):
  """The paper's asymmetric quantization, dequantized: min + round((x - min) / scale) * scale."""
  lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
  scale = (hi - lo) / (2**bits - 1)
  codes = np.where(scale > 0, np.round((x - lo) / np.where(scale > 0, scale, 1)), 0)
  return (codes * scale + lo).astype(np.float32)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("bits", [2, 4])
def test_chunks_and_decode_match_a_numpy_replay(bits):
  """A prompt chunk (rows of 13 and 9 tokens, padded) then 30 one-token steps, random q/k/v:
  each output == attention over the dequantized old tokens plus the full-precision newest ones
  (NumPy: keys quantized per channel per group of 4 tokens, values per token; whole groups leave
  the residual of 8 while more than 8 are full precision)."""
  group, residual, d, steps = 4, 8, 8, 30
  lengths = [13, 9]
  rng = np.random.default_rng(bits)
  cfg = dataclasses.replace(CFG, hidden_size=32, head_dim=8, num_layers=1)
  policy = KIVI(bits=bits, group=group, residual=residual)
  cache = policy.init(cfg, 2, 64)
  attention = BoundAttention("dense", get_attention("dense"))

  @jax.jit
  def step(q, k, v, positions, cache):  # one layer through the policy, random q/k/v as given
    begun = policy.begin(cache, positions)
    rope = Rope.make(positions, jnp.zeros(d // 2))  # the identity
    out, layer = policy.attend(begun, q, k, v, rope, cache.layer(0), attention)
    return out, policy.finish(cache, (layer,), begun)

  old = [[np.zeros((0, 2, d), np.float32)] * 2 for _ in range(2)]  # per row: dequantized (keys, values)
  fresh = [[np.zeros((0, 2, d), np.float32)] * 2 for _ in range(2)]  # per row: full precision
  chunks = [np.array([[p if p < n else -1 for p in range(16)] for n in lengths], np.int32)]
  chunks += [np.array([[n + s] for n in lengths], np.int32) for s in range(steps)]
  for positions in chunks:
    c = positions.shape[1]
    q = rng.normal(size=(2, c, 4, d)).astype(np.float32)
    k, v = (rng.normal(size=(2, c, 2, d)).astype(np.float32) for _ in range(2))
    out, cache = step(q, k, v, positions, cache)
    quantized, end = (np.asarray(x) for x in cache.rows)
    for row in range(2):
      n = int((positions[row] >= 0).sum())
      ok, ov = old[row]
      fk, fv = fresh[row]
      for j in range(n):
        keys = np.concatenate([ok, fk, k[row, : j + 1]])
        values = np.concatenate([ov, fv, v[row, : j + 1]])
        for h in range(4):
          probs = _softmax(keys[:, h // 2] @ q[row, j, h] / np.sqrt(d))
          np.testing.assert_allclose(np.asarray(out)[row, j, h], probs @ values[:, h // 2], atol=2e-5)
      fk, fv = np.concatenate([fk, k[row, :n]]), np.concatenate([fv, v[row, :n]])
      while len(fk) > residual:  # the oldest whole group leaves
        gk, gv = fk[:group], fv[:group]
        ok = np.concatenate([ok, _np_quantize(gk, bits, axis=0)])  # per channel over the group's tokens
        per_token = _np_quantize(gv.reshape(group, 2, d // group, group), bits, axis=-1)  # channels in groups of 4
        ov = np.concatenate([ov, per_token.reshape(group, 2, d)])
        fk, fv = fk[group:], fv[group:]
      old[row], fresh[row] = [ok, ov], [fk, fv]
      assert int(quantized[row]) == len(ok) and int(end[row]) == len(ok) + len(fk)
  assert all(len(o[0]) > 20 for o in old)  # most tokens went through quantization


def test_covering_residual_is_dense_and_bits_cost_accuracy(model):
  dense = perplexity(model, TOKENS, chunk=16)
  assert perplexity(model, TOKENS, kv_cache=KIVI(bits=2, group=8, residual=160), chunk=16) == pytest.approx(
    dense, rel=1e-5
  )
  errors = {
    b: abs(perplexity(model, TOKENS, kv_cache=KIVI(bits=b, group=8, residual=16), chunk=16) / dense - 1)
    for b in (8, 4, 2)
  }
  assert 0 < errors[8] < errors[4] < errors[2], errors


def test_generator_with_kivi(model):
  prompts = [list(TOKENS[:30]), list(TOKENS[:17])]
  dense = Generator(model, max_batch=2, max_seq_len=64)
  want = dense.generate(prompts, max_new_tokens=12)
  covering = Generator(model, max_batch=2, max_seq_len=64, kv_cache=KIVI(bits=2, group=8, residual=64))
  assert covering.generate(prompts, max_new_tokens=12) == want
  quantized = Generator(model, max_batch=2, max_seq_len=64, kv_cache=KIVI(bits=4, group=8, residual=8))
  out = quantized.generate(prompts, max_new_tokens=12)
  assert [o[0] for o in out] == [w[0] for w in want]  # the prompt is attended in full precision
  assert quantized.generate(prompts, max_new_tokens=12) == out  # a second request starts clean
  assert set(quantized.traces.values()) == {1}
  # 4-bit codes plus f32 scales and minimums per 8 (3 bytes per f32 element), the residual ring.
  assert quantized.cache_bytes == KIVI(bits=4, group=8, residual=8).cache_bytes(CFG, 2, 64) < 0.55 * dense.cache_bytes
  with pytest.raises(GenerationError, match="at most 4 new tokens fit"):
    quantized.generate([list(TOKENS[:60])], max_new_tokens=8)


def test_bad_settings():
  with pytest.raises(GenerationError, match="multiple of group"):
    KIVI(bits=4, group=32, residual=48)
  with pytest.raises(GenerationError, match="bits"):
    KIVI(bits=3)
  with pytest.raises(GenerationError, match="head_dim"):
    KIVI(bits=2, group=8, residual=8).init(dataclasses.replace(CFG, head_dim=6), 1, 16)
