"""`attention: nsa` (Native Sparse Attention, arXiv 2502.11089): each branch against NumPy written
from the paper's equations, the selection's forced blocks, causality, gradients into every branch,
and training through the CLI. Lengths span eight CPU kernel blocks (64 tokens each)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import TINY

from jaxeff import train as train_lib
from jaxeff.config import ConfigError, ModelConfig
from jaxeff.hf import HFError, config_to_hf
from jaxeff.models import Llama
from jaxeff.models.nsa import NativeSparseAttention

CFG = ModelConfig(
  vocab_size=64,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  attention="nsa",
  nsa_compress_block=16,
  nsa_compress_stride=8,
  nsa_select_blocks=4,
  nsa_window=48,
)
S, BLOCK = 512, 64  # eight CPU kernel blocks (selection block = query block = 64 tokens)


def _inputs(seed=0, b=2):
  ks = jax.random.split(jax.random.key(seed), 4)
  d = CFG.head_dim
  return (
    jax.random.normal(ks[0], (b, S, CFG.hidden_size)),
    jax.random.normal(ks[1], (b, S, 4, d)),
    jax.random.normal(ks[2], (b, S, 2, d)),
    jax.random.normal(ks[3], (b, S, 2, d)),
  )


def _softmax_attention(q, k, v, visible):
  """NumPy: q [S, D], k/v [T, D], visible [S, T] bool; rows with nothing visible give zeros."""
  scores = q @ k.T / np.sqrt(q.shape[-1])
  scores = np.where(visible, scores, -np.inf)
  peak = np.max(np.where(visible, scores, -1e30), axis=-1, keepdims=True)
  w = np.where(visible, np.exp(scores - peak), 0.0)
  total = w.sum(-1, keepdims=True)
  return np.where(total > 0, (w / np.where(total > 0, total, 1)) @ v, 0.0), w / np.where(total > 0, total, 1)


@pytest.fixture(scope="module")
def layer_and_branches():
  layer = NativeSparseAttention(CFG, rngs=nnx.Rngs(3))
  # Non-zero position embeddings, so a wrong intra-block order would show.
  layer.key_position[...] = 0.3 * jax.random.normal(jax.random.key(9), layer.key_position[...].shape)
  x, q, k, v = _inputs()
  return layer, (x, q, k, v), [np.asarray(t) for t in layer.branches(x, q, k, v)]


def test_branches_match_numpy_from_the_paper(layer_and_branches):
  layer, (x, q, k, v), (o_cmp, o_slc, o_win, gates, chosen) = layer_and_branches
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  l, stride = CFG.nsa_compress_block, CFG.nsa_compress_stride
  wk, wv = (np.asarray(m.kernel[...], np.float64) for m in (layer.compress_keys, layer.compress_values))
  pos = np.asarray(layer.key_position[...], np.float64)
  starts = list(range(0, S - l + 1, stride))
  t = np.arange(S)
  for b in range(2):
    for h in range(4):
      kvh = h // 2
      # Compressed tokens: phi(k_{id+1 .. id+l} + positions), one linear map of the flattened block.
      kc = np.stack([(k[b, s0 : s0 + l, kvh] + pos).reshape(-1) @ wk for s0 in starts])
      vc = np.stack([v[b, s0 : s0 + l, kvh].reshape(-1) @ wv for s0 in starts])
      seen = np.array(starts)[None, :] + l - 1 <= t[:, None]
      want_cmp, _ = _softmax_attention(q[b, :, h], kc, vc, seen)
      np.testing.assert_allclose(o_cmp[b, h], want_cmp, rtol=2e-4, atol=2e-5)
      causal = t[None, :] <= t[:, None]
      want_win, _ = _softmax_attention(
        q[b, :, h], k[b, :, kvh], v[b, :, kvh], causal & (t[:, None] - t[None, :] < CFG.nsa_window)
      )
      np.testing.assert_allclose(o_win[b, h], want_win, rtol=2e-4, atol=2e-5)
      # Selected: exactly the keys of the chosen blocks of each query's block (causal).
      in_chosen = np.zeros((S, S), bool)
      for qb in range(S // BLOCK):
        for kb in chosen[b, kvh, qb]:
          if kb >= 0:
            in_chosen[qb * BLOCK : (qb + 1) * BLOCK, kb * BLOCK : (kb + 1) * BLOCK] = True
      want_slc, _ = _softmax_attention(q[b, :, h], k[b, :, kvh], v[b, :, kvh], causal & in_chosen)
      np.testing.assert_allclose(o_slc[b, h], want_slc, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(
    gates, jax.nn.sigmoid(layer.gate(x)).reshape(2, S, 3, 4).transpose(2, 0, 3, 1)[..., None], rtol=1e-6
  )


def test_selection_follows_compressed_scores_with_forced_blocks(layer_and_branches):
  layer, (x, q, k, v), (*_, chosen) = layer_and_branches
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  l, stride = CFG.nsa_compress_block, CFG.nsa_compress_stride
  wk = np.asarray(layer.compress_keys.kernel[...], np.float64)
  pos = np.asarray(layer.key_position[...], np.float64)
  starts = np.arange(0, S - l + 1, stride)
  t = np.arange(S)
  nb = S // BLOCK
  for b in range(2):
    for kvh in range(2):
      kc = np.stack([(k[b, s0 : s0 + l, kvh] + pos).reshape(-1) @ wk for s0 in starts])
      seen = starts[None, :] + l - 1 <= t[:, None]
      probs = sum(_softmax_attention(q[b, :, h], kc, kc, seen)[1] for h in (2 * kvh, 2 * kvh + 1))  # group sum
      # Each compressed block credits the selection blocks it overlaps (paper eq. 9).
      credit = np.zeros((S, nb))
      for i, s0 in enumerate(starts):
        for j in range(s0 // BLOCK, (s0 + l - 1) // BLOCK + 1):
          credit[:, j] += probs[:, i]
      for qb in range(nb):
        got = set(int(c) for c in chosen[b, kvh, qb] if c >= 0)
        forced = {0, qb, max(qb - 1, 0)}
        assert forced <= got
        if qb + 1 > len(forced):  # a free slot and a candidate beyond the forced blocks
          score = credit[qb * BLOCK][: qb + 1]  # the block's first query scores it (causal)
          rest = [j for j in np.argsort(-score) if j not in forced]
          assert rest[0] in got


def test_causal_and_gradients_reach_every_branch():
  model = Llama(dataclasses.replace(CFG, num_layers=1), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, S), 0, CFG.vocab_size)
  changed = tokens.at[:, 400].set((tokens[:, 400] + 1) % CFG.vocab_size)
  a, b = np.asarray(model(tokens)), np.asarray(model(changed))
  np.testing.assert_array_equal(a[:, :400], b[:, :400])
  assert not np.allclose(a[:, 400:], b[:, 400:])

  def loss(m):
    logits = m(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grads = nnx.grad(loss)(model).layers[0].self_attn
  for name, g in [
    ("compress_keys", grads.method.compress_keys.kernel),
    ("compress_values", grads.method.compress_values.kernel),
    ("key_position", grads.method.key_position),
    ("gate", grads.method.gate.kernel),
    ("q_proj", grads.q_proj.kernel),
    ("k_proj", grads.k_proj.kernel),
  ]:
    assert float(jnp.abs(g[...]).max()) > 0, name


def test_config_and_decode_errors():
  with pytest.raises(ConfigError, match="nsa_compress_stride=32 must be <="):
    dataclasses.replace(CFG, nsa_compress_stride=32)
  with pytest.raises(ConfigError, match="leave model.sliding_window null"):
    Llama(dataclasses.replace(CFG, sliding_window=64), rngs=nnx.Rngs(0))
  with pytest.raises(HFError, match="no Hugging Face equivalent"):
    config_to_hf(CFG)
  model = Llama(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="KV-cache decode and explicit positions are not implemented"):
    model(jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None])


def test_trains_through_the_cli(tmp_path):
  out = tmp_path / "run"
  code = train_lib.main(
    [
      *TINY,
      "model.num_layers=1",
      "model.attention=nsa",
      "model.nsa_compress_block=16",
      "model.nsa_compress_stride=8",
      "model.nsa_select_blocks=2",
      "model.nsa_window=32",
      "seq_len=128",
      "steps=3",
      f"output_dir={out}",
      "checkpoint_every=3",
    ]
  )
  assert code == 0
  _, cfg = train_lib.load_checkpoint(out)
  assert cfg.model.attention == "nsa"
