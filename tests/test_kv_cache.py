"""The dense KV cache: prefill + token-by-token decode == one full forward (f32, 1e-5)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.inference.cache import Dense
from jaxeff.models import Llama

# GQA (4 query heads on 2 kv heads); prefill 7 tokens then decode 6, one at a time.
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
PREFILL, TOTAL, MAX_LEN = 7, 13, 16


def cached_logits(model, tokens, positions, cache):
  """(logits, cache) of a forward through the KV cache."""
  out = model.forward_with_cache(tokens, positions, cache)
  return model.logits(out.hidden), out.cache


def _tokens(b=2, s=TOTAL, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, CFG.vocab_size, dtype=jnp.int32)


def init_cache(cfg, batch, length):
  return Dense().init(cfg, batch, length)


def _prefill_then_decode(model, tokens, positions, max_len=MAX_LEN):
  cache = init_cache(model.cfg, tokens.shape[0], max_len)
  step = nnx.jit(cached_logits)
  logits, cache = step(model, tokens[:, :PREFILL], positions[:, :PREFILL], cache)
  out = [logits]
  for t in range(PREFILL, tokens.shape[1]):
    logits, cache = step(model, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("scan_layers,window", [(False, None), (False, 4), (True, 4)])
def test_cached_decode_equals_full_forward(scan_layers, window):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers, sliding_window=window)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens()
  positions = jnp.broadcast_to(jnp.arange(TOTAL, dtype=jnp.int32), tokens.shape)
  full = model(tokens)
  cached, cache = _prefill_then_decode(model, tokens, positions)
  assert cached.shape == full.shape
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  assert cache.stacked == scan_layers
  k0 = cache.layer(0)[0]  # layer 0's keys (stacked or per layer)
  assert k0.shape == (2, cfg.num_kv_heads, MAX_LEN, cfg.head_dim)
  # Slots past the last position were never written.
  assert not np.asarray(k0[:, :, TOTAL:]).any() and np.asarray(k0[:, :, :TOTAL]).all(axis=-1).all()
  if window is not None:  # the window actually changes the result (so it was applied)
    assert (
      np.abs(np.asarray(Llama(dataclasses.replace(cfg, sliding_window=None), rngs=nnx.Rngs(0))(tokens) - full)).max()
      > 1e-4
    )


def test_rows_at_their_own_positions():
  # Row 1 is row 0's sequence shifted by 3 slots: each row writes and attends at its own positions,
  # so row 1's logits equal a full forward of its own (shorter) sequence, whatever row 0 does.
  # Row 1's first 3 tokens are padding at the cache's last slots, after every real position.
  model = Llama(CFG, rngs=nnx.Rngs(1))
  tokens = _tokens(b=2)
  positions = jnp.stack([jnp.arange(TOTAL), jnp.arange(TOTAL) - 3]).astype(jnp.int32)
  positions = positions.at[1, :3].set(jnp.arange(MAX_LEN - 3, MAX_LEN))
  tokens = tokens.at[1, 3:].set(tokens[0, : TOTAL - 3])
  cached, _ = _prefill_then_decode(model, tokens, positions)
  own = model(tokens[1:, 3:])  # positions 0..TOTAL-4
  np.testing.assert_allclose(cached[1, 3:], own[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached[0], model(tokens[:1])[0], rtol=1e-5, atol=1e-5)


def test_stale_slots_are_masked():
  # A cache holding garbage (an earlier, longer sequence) gives the same logits as a fresh one.
  model = Llama(CFG, rngs=nnx.Rngs(2))
  tokens = _tokens()
  positions = jnp.broadcast_to(jnp.arange(TOTAL, dtype=jnp.int32), tokens.shape)
  garbage = init_cache(CFG, 2, MAX_LEN)
  leaves, treedef = jax.tree.flatten(garbage)
  garbage = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
  step = nnx.jit(cached_logits)
  fresh, _ = step(model, tokens, positions, init_cache(CFG, 2, MAX_LEN))
  reused, _ = step(model, tokens, positions, garbage)
  np.testing.assert_allclose(reused, fresh, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fresh, model(tokens), rtol=1e-5, atol=1e-5)


def test_bf16_cache_dtype_and_bytes():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  cache = init_cache(cfg, 3, 10)
  assert cache.layer(0)[0].dtype == jnp.bfloat16
  assert cache.nbytes == Dense().cache_bytes(cfg, 3, 10) == 2 * 3 * 3 * 10 * 2 * 8 * 2


def test_cache_errors():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  tokens = _tokens(s=3)
  with pytest.raises(ValueError, match="explicit positions"):
    model.forward_with_cache(tokens, None, init_cache(CFG, 2, 8))
  with pytest.raises(ValueError, match="does not match"):
    model.forward_with_cache(
      tokens, jnp.zeros_like(tokens), init_cache(dataclasses.replace(CFG, scan_layers=True), 2, 8)
    )
  with pytest.raises(ValueError, match="length >= 1"):
    init_cache(CFG, 2, 0)


def test_cache_is_sharded_by_logical_axes():
  # batch over data, kv heads over tensor: like the activations.
  cfg = dataclasses.replace(CFG, num_heads=8, num_kv_heads=4, hidden_size=64, scan_layers=True)
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  model = sharding.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh)
  tokens = _tokens(b=2, s=5)
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), tokens.shape)
  with jax.set_mesh(mesh):
    cache = jax.jit(lambda: init_cache(cfg, 2, 8))()
    logits, cache = nnx.jit(cached_logits)(model, tokens, positions, cache)
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", "tensor", None, None))
  k, v = cache.layers
  assert k.sharding.is_equivalent_to(want, 5) and v.sharding.is_equivalent_to(want, 5)
  np.testing.assert_allclose(logits, model(tokens), rtol=1e-5, atol=1e-5)
