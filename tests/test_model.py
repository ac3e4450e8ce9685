"""Model semantics: shapes, causality, scan/remat equivalence, GQA, dtype policy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import ConfigError, ModelConfig
from jaxeff.models import Llama
from jaxeff.models.attention import blocked_attention, dense_attention

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)


def _tokens(b=2, s=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, CFG.vocab_size, dtype=jnp.int32)


def _stacked_copy(model, cfg):
  """The same weights in a scan_layers=True model (layers stacked on a leading axis)."""
  scanned = Llama(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(1))
  per_layer = [nnx.to_pure_dict(nnx.state(block, nnx.Param)) for block in model.layers]
  stacked = nnx.state(scanned.layers, nnx.Param)
  nnx.replace_by_pure_dict(stacked, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
  nnx.update(scanned.layers, stacked)
  for name in ("embed_tokens", "norm", "lm_head"):
    nnx.update(getattr(scanned, name), nnx.state(getattr(model, name)))
  return scanned


def test_logits_shape_and_dtype():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  logits = model(_tokens())
  assert logits.shape == (2, 10, 64) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_causal():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  a, b = _tokens(), _tokens().at[:, 6:].set(0)
  la, lb = model(a), model(b)
  np.testing.assert_allclose(la[:, :6], lb[:, :6], atol=1e-6)
  assert np.abs(np.asarray(la[:, 6:] - lb[:, 6:])).max() > 1e-3


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_match_unrolled(remat):
  model = Llama(CFG, rngs=nnx.Rngs(0))
  cfg = dataclasses.replace(CFG, remat=remat)
  scanned = _stacked_copy(model, cfg)
  toks = _tokens()
  np.testing.assert_allclose(scanned(toks), model(toks), atol=2e-5)
  loss = lambda m: jnp.mean(m(toks) ** 2)
  g_ref = nnx.grad(loss)(model)
  g = nnx.grad(loss)(scanned)
  np.testing.assert_allclose(
    g.layers.mlp.down_proj.kernel[...][1], g_ref.layers[1].mlp.down_proj.kernel[...], atol=1e-6
  )
  np.testing.assert_allclose(g.embed_tokens.embedding[...], g_ref.embed_tokens.embedding[...], atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv():
  q = jax.random.normal(jax.random.key(0), (2, 7, 6, 8))
  k = jax.random.normal(jax.random.key(1), (2, 7, 2, 8))
  v = jax.random.normal(jax.random.key(2), (2, 7, 2, 8))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  gqa = dense_attention(q, k, v, q_positions=pos, kv_positions=pos)
  mha = dense_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), q_positions=pos, kv_positions=pos)
  np.testing.assert_allclose(gqa, mha, atol=1e-6)
  # Against a direct NumPy softmax attention for head 4 (kv head 1).
  s = np.einsum("sd,td->st", q[0, :, 4], k[0, :, 1]) / np.sqrt(8)
  s = np.where(np.tril(np.ones((7, 7), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(gqa[0, :, 4], p @ np.asarray(v[0, :, 1]), atol=1e-5)


def test_bf16_compute_close_to_f32():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  bf16 = Llama(dataclasses.replace(CFG, dtype="bfloat16"), rngs=nnx.Rngs(0))
  assert bf16.lm_head.kernel[...].dtype == jnp.float32  # parameters stay f32
  toks = _tokens()
  err = np.abs(np.asarray(bf16(toks) - model(toks))).max()
  assert 0 < err < 0.05


def test_tied_embeddings_have_no_head():
  model = Llama(dataclasses.replace(CFG, tie_embeddings=True), rngs=nnx.Rngs(0))
  assert model.lm_head is None
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == dataclasses.replace(CFG, tie_embeddings=True).num_params


def test_param_count_matches_config():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == CFG.num_params


def test_bad_config():
  with pytest.raises(ConfigError, match="multiple of"):
    ModelConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ConfigError, match="remat"):
    ModelConfig(remat="sometimes")


def _qkv(b, s, t, h, kvh, d, seed):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(keys[0], (b, s, h, d)),
    jax.random.normal(keys[1], (b, t, kvh, d)),
    jax.random.normal(keys[2], (b, t, kvh, d)),
  )


@pytest.mark.parametrize("positions", ["index", "sequential", "offset", "shuffled", "different_kv"])
@pytest.mark.parametrize("window", [None, 20])
def test_blocked_attention_matches_dense_values_and_grads(positions, window):
  # Blocks are skipped only for index positions (None, known statically); any given positions
  # must be masked by value, so the result never differs from dense.
  b, s = 2, 128  # 4 query blocks
  q, k, v = _qkv(b, s, s, 6, 2, 8, seed=len(positions) + (window or 0))
  rng = np.random.default_rng(0)
  seq = np.broadcast_to(np.arange(s), (b, s))
  q_pos = {
    "index": seq,
    "sequential": seq,
    "offset": seq + 5,
    "shuffled": np.stack([rng.permutation(s) for _ in range(b)]),
    "different_kv": seq,
  }[positions]
  kv_pos = q_pos if positions != "different_kv" else seq + np.array([[0], [3]])
  q_pos, kv_pos = jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32)
  given = {} if positions == "index" else dict(q_positions=q_pos, kv_positions=kv_pos)
  cot = jax.random.normal(jax.random.key(7), q.shape)

  def loss(fn, pos):
    return lambda q, k, v: jnp.sum(cot * fn(q, k, v, sliding_window=window, **pos))

  want, want_grads = jax.jit(
    jax.value_and_grad(loss(dense_attention, dict(q_positions=q_pos, kv_positions=kv_pos)), argnums=(0, 1, 2))
  )(q, k, v)
  got, got_grads = jax.jit(jax.value_and_grad(loss(blocked_attention, given), argnums=(0, 1, 2)))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5)
  out = blocked_attention(q, k, v, sliding_window=window, **given)
  ref = dense_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, sliding_window=window)
  np.testing.assert_allclose(out, ref, atol=2e-6)
  # The static fact decides the path, with no run-time check: only index positions take the
  # blocked custom-VJP path (and no lax.cond is left in either).
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: blocked_attention(q, k, v, sliding_window=window, **given))(q, k, v))
  assert ("custom_vjp_call" in jaxpr) == (positions == "index")
  assert "cond[" not in jaxpr


def test_blocked_attention_decode_shapes_fall_back_to_dense():
  q, k, v = _qkv(1, 1, 40, 4, 2, 8, seed=3)  # one new token against a 40-entry cache
  q_pos, kv_pos = jnp.full((1, 1), 39, jnp.int32), jnp.arange(40, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(
    blocked_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos),
    dense_attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos),
  )


def test_attention_positions_none_only_for_self_attention():
  q, k, v = _qkv(1, 4, 8, 4, 2, 8, seed=4)
  with pytest.raises(ValueError, match="None only on both sides"):
    dense_attention(q, k, v)


def test_blocked_attention_model_matches_dense_model():
  cfg = dataclasses.replace(CFG, attention="dense", num_layers=2)
  dense = Llama(cfg, rngs=nnx.Rngs(0))
  blocked = Llama(dataclasses.replace(cfg, attention="blocked"), rngs=nnx.Rngs(0))
  toks = _tokens(s=128)

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])

  logits = nnx.jit(lambda model: model(toks))
  np.testing.assert_allclose(logits(blocked), logits(dense), atol=1e-5)
  grad = nnx.jit(nnx.grad(loss))
  g_dense, g_blocked = grad(dense), grad(blocked)
  for a, b in zip(jax.tree.leaves(g_blocked), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(a, b, atol=1e-6)
