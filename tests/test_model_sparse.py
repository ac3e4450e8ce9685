"""`attention: sparse` in the model: the Pallas block-sparse kernel's dispatcher behind the
attention registry, against dense attention under the same mask (causal, sliding window,
StreamingLLM sinks), in training, in KV-cache decode and on a mesh.

Lengths are a few CPU blocks (64 tokens each), so the kernel's block lists really skip blocks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import REPO, TINY

from jaxeff import sharding
from jaxeff import train as train_lib
from jaxeff.config import ConfigError, ModelConfig, load_yaml
from jaxeff.generate import Generator
from jaxeff.models import Llama
from jaxeff.models.attention import dense_attention, sparse_attention
from jaxeff.training.config import config_from_dict

CFG = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
SEQ = 256  # four 64-token key blocks on CPU
STREAMING = dict(sliding_window=80, attention_sinks=4)


def _qkv(seed=0, b=2, s=SEQ, h=4, kvh=2, d=16):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(ks[0], (b, s, h, d)),
    jax.random.normal(ks[1], (b, s, kvh, d)),
    jax.random.normal(ks[2], (b, s, kvh, d)),
  )


@pytest.mark.parametrize(
  "mask", [dict(), dict(sliding_window=80), dict(sliding_window=80, sinks=4)], ids=["causal", "window", "window+sinks"]
)
def test_sparse_equals_dense_values_and_grads(mask):
  q, k, v = _qkv()
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **mask)))
  want, want_grads = jax.value_and_grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
  got, got_grads = jax.value_and_grad(loss(sparse_attention), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-3)
  # The mask matters at this length: sinks change the result against the window alone.
  if mask.get("sinks"):
    alone = dense_attention(q, k, v, sliding_window=80)
    assert not np.allclose(dense_attention(q, k, v, **mask), alone, atol=1e-3)


def test_sparse_with_cache_positions_masks_by_value():
  q, k, v = _qkv(seed=1)
  # A decode-like call: 3 queries at positions 200..202 against 256 cache slots (slot t = position t).
  qd = q[:, :3]
  q_pos = jnp.broadcast_to(jnp.arange(200, 203), (2, 3))
  kv_pos = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
  kw = dict(q_positions=q_pos, kv_positions=kv_pos, sliding_window=80, sinks=4)
  np.testing.assert_allclose(sparse_attention(qd, k, v, **kw), dense_attention(qd, k, v, **kw), rtol=1e-4, atol=1e-6)


def _pair(**fields):
  dense = Llama(dataclasses.replace(CFG, **fields), rngs=nnx.Rngs(0))
  sparse = Llama(dataclasses.replace(CFG, attention="sparse", **fields), rngs=nnx.Rngs(0))
  return dense, sparse


def _tokens(b=2, s=SEQ, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, CFG.vocab_size, dtype=jnp.int32)


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def _assert_same_loss_and_grads(model, reference, tokens):
  """`model`'s next-token loss and gradients equal `reference`'s; returns the reference loss."""
  want, want_g = nnx.value_and_grad(_loss)(reference, tokens)
  got, got_g = nnx.value_and_grad(_loss)(model, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(nnx.to_pure_dict(got_g)), jax.tree.leaves(nnx.to_pure_dict(want_g))):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-3)
  return want


@pytest.mark.parametrize("fields", [dict(), STREAMING], ids=["causal", "streaming"])
def test_model_loss_and_grads_equal_dense(fields):
  dense, sparse = _pair(**fields)
  _assert_same_loss_and_grads(sparse, dense, _tokens())


def test_streaming_decode_matches_full_forward_and_dense():
  """Prefill + one-token decodes through the KV cache with the kernel (window + sinks) give the
  full forward's greedy tokens, and the dense model's under the same mask."""
  dense, sparse = _pair(**STREAMING)
  prompts = [[i % CFG.vocab_size for i in range(1, 150)], list(range(7, 40))]
  want = Generator(dense, max_batch=2, max_seq_len=SEQ).generate(prompts, max_new_tokens=12)
  got = Generator(sparse, max_batch=2, max_seq_len=SEQ).generate(prompts, max_new_tokens=12)
  assert got == want
  # The first row against a full forward over its prompt + the generated tokens.
  seq = jnp.asarray([prompts[0] + got[0][:-1]])
  full = np.asarray(jnp.argmax(sparse(seq), -1))[0, len(prompts[0]) - 1 :]
  assert full.tolist() == got[0]


@pytest.mark.parametrize(
  "fields,seq", [(STREAMING, 128), (dict(attention_topk_blocks=1), SEQ)], ids=["streaming", "topk"]
)
def test_sparse_model_on_a_mesh_equals_one_device(fields, seq):
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  cfg = dataclasses.replace(CFG, attention="sparse", **fields)
  tokens = _tokens(b=4, s=seq)
  want = Llama(cfg, rngs=nnx.Rngs(0))(tokens)
  sharded = sharding.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  with jax.set_mesh(mesh):
    got = nnx.jit(lambda m, t: m(t))(sharded, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_config_checks_and_accelerator_configs():
  with pytest.raises(ConfigError, match="attention_sinks needs model.sliding_window"):
    ModelConfig(attention="sparse", attention_sinks=4)
  with pytest.raises(ConfigError, match="not 'blocked'"):  # checked by the attention registry
    Llama(ModelConfig(attention="blocked", sliding_window=64, attention_sinks=4), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="sliding_window must be >= 1"):
    ModelConfig(sliding_window=0)
  for name in ("125m", "1b"):
    cfg = config_from_dict(load_yaml(REPO / "configs" / f"{name}.yaml"))
    assert cfg.model.attention == "sparse", name
  assert train_lib.load_config(None, []).model.attention == "blocked"  # the CPU default


def test_trains_through_the_cli(tmp_path):
  out = tmp_path / "run"
  code = train_lib.main(
    [
      *TINY,
      "model.num_layers=1",
      "model.attention=sparse",
      "model.sliding_window=16",
      "model.attention_sinks=2",
      "seq_len=128",
      "steps=3",
      f"output_dir={out}",
      "checkpoint_every=3",
    ]
  )
  assert code == 0
  model, cfg = train_lib.load_checkpoint(out)
  assert (cfg.model.attention, cfg.model.sliding_window, cfg.model.attention_sinks) == ("sparse", 16, 2)


# ---------------------------------------------------------------- top-k blocks (attention_topk_blocks)
BLOCK = 64  # the CPU path's block_q = block_kv


def _numpy_selection(q, k, topk):
  """The selection written from its definition with loops: per (batch, kv head, query block i) the
  blocks entirely at or before the block's first query, scored by the group's first queries against
  each block's mean key; the top `topk` of them, plus every block the query block overlaps."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, s, h, _ = q.shape
  kvh = k.shape[2]
  g = h // kvh
  nq = nk = -(-s // BLOCK)
  chosen = np.zeros((b, kvh, nq, nk), bool)
  for bi in range(b):
    for kh in range(kvh):
      for i in range(nq):
        p0, p1 = i * BLOCK, min((i + 1) * BLOCK, s) - 1
        q0 = q[bi, p0, kh * g : (kh + 1) * g].sum(0)
        scored = {}
        for j in range(nk):
          keys = range(j * BLOCK, min((j + 1) * BLOCK, s))
          if max(keys) <= p0:
            scored[j] = q0 @ k[bi, list(keys), kh].mean(0)
          elif min(keys) <= p1:
            chosen[bi, kh, i, j] = True
        for j in sorted(scored, key=scored.get, reverse=True)[:topk]:
          chosen[bi, kh, i, j] = True
  return chosen


def _masked_dense(q, k, v, chosen):
  """Softmax attention with the causal mask intersected with the chosen key blocks, in NumPy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      scores = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d)
      rows, cols = np.arange(s)[:, None], np.arange(s)[None, :]
      visible = (cols <= rows) & chosen[bi, hi // g][rows // BLOCK, cols // BLOCK]
      scores = np.where(visible, scores, -np.inf)
      p = np.exp(scores - scores.max(1, keepdims=True))
      out[bi, :, hi] = (p / p.sum(1, keepdims=True)) @ v[bi, :, hi // g]
  return out


@pytest.mark.parametrize("seq", [SEQ, 230], ids=["4-blocks", "ragged"])
def test_topk_selection_matches_numpy_and_attention_follows_it(seq):
  from jaxeff.models.attention import index_positions, mean_key_block_selection

  q, k, v = (x[:, :seq] for x in _qkv(seed=3))
  pos = index_positions(2, seq)
  ids = np.asarray(
    mean_key_block_selection(q, k, q_positions=pos, kv_positions=pos, topk=1, block_q=BLOCK, block_kv=BLOCK)
  )
  got = np.zeros((2, 2, ids.shape[2], ids.shape[2]), bool)
  for index in np.ndindex(ids.shape):
    if ids[index] >= 0:
      got[index[:3] + (ids[index],)] = True
  want = _numpy_selection(q, k, topk=1)
  np.testing.assert_array_equal(got, want)
  # The mask really skips: the last query block reads 1 chosen + its own block, not all 4.
  assert got[..., -1, :].sum(-1).max() == 2
  np.testing.assert_allclose(
    sparse_attention(q, k, v, topk_blocks=1), _masked_dense(q, k, v, want), rtol=1e-4, atol=1e-5
  )


def test_topk_attention_is_causal():
  """What a position sees never depends on later tokens: changing q, k, v after position 100 (in
  the middle of the second query block) leaves outputs 0..100 unchanged (a selection scored with
  the block's later queries, or with blocks holding later keys, would change them)."""
  q, k, v = _qkv(seed=4)
  q2, k2, v2 = _qkv(seed=5)
  after = (jnp.arange(SEQ) > 100)[None, :, None, None]
  mixed = [jnp.where(after, b, a) for a, b in zip((q, k, v), (q2, k2, v2))]
  base = sparse_attention(q, k, v, topk_blocks=1)
  changed = sparse_attention(*mixed, topk_blocks=1)
  np.testing.assert_array_equal(np.asarray(base)[:, :101], np.asarray(changed)[:, :101])
  assert not np.allclose(np.asarray(base)[:, 101:], np.asarray(changed)[:, 101:])


def test_topk_model_covering_everything_equals_dense_and_trains():
  dense, _ = _pair()
  everything = Llama(dataclasses.replace(CFG, attention="sparse", attention_topk_blocks=4), rngs=nnx.Rngs(0))
  one = Llama(dataclasses.replace(CFG, attention="sparse", attention_topk_blocks=1), rngs=nnx.Rngs(0))
  tokens = _tokens()
  want = _assert_same_loss_and_grads(everything, dense, tokens)
  assert abs(float(_loss(one, tokens)) - float(want)) > 1e-6  # one block of four: a different mask
  with pytest.raises(ValueError, match="KV-cache decode with model.attention_topk_blocks"):
    Generator(one, max_batch=1, max_seq_len=SEQ).generate([[1, 2, 3]], max_new_tokens=2)


def test_topk_config_checks_and_cli(tmp_path):
  with pytest.raises(ConfigError, match="attention_topk_blocks is implemented by attention sparse"):
    Llama(ModelConfig(attention="dense", attention_topk_blocks=2), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="attention_topk_blocks must be >= 0"):
    ModelConfig(attention="sparse", attention_topk_blocks=-1)
  ModelConfig(attention="sparse", attention_topk_blocks=2, attention_sinks=4)  # sinks need a restriction: top-k is one
  out = tmp_path / "run"
  code = train_lib.main(
    [
      *TINY,
      "model.num_layers=1",
      "model.attention=sparse",
      "model.attention_topk_blocks=1",
      "seq_len=128",
      "steps=2",
      f"output_dir={out}",
      "checkpoint_every=2",
    ]
  )
  assert code == 0
  _, cfg = train_lib.load_checkpoint(out)
  assert cfg.model.attention_topk_blocks == 1
