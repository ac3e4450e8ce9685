"""A fixed-size KV cache that keeps heavy hitters and recent tokens (H2O's layout).

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models": a few tokens collect most of the attention; keep the `heavy` tokens with the largest
accumulated attention score plus the `recent` newest ones, evict the rest. Every (layer, kv head)
keeps its own set, so each holds a slot -> position map and a score per slot.

Layout per layer: keys (rotated at their absolute positions, as the dense cache) and values
[B, KVH, heavy + recent, D], `positions` [B, KVH, heavy + recent] (-1: empty) and `scores`
[B, KVH, heavy + recent] f32: the attention each cached token received so far, summed over the
query heads of its group and over the queries that saw it.

A chunk of new tokens attends over the cache plus itself (causal); its attention is added to the
scores (the new tokens start with what the chunk gave them); then heavy + recent entries of the
union stay: the `recent` newest positions, and the `heavy` best-scored among the rest. For one new
token (decode) that is H2O's rule exactly: the cached token with the lowest score outside the
recent window is evicted. For a longer chunk (prefill), selection happens once per chunk, so
within a chunk queries see tokens a step-by-step decode would already have dropped. With
heavy = 0 a query sees the `recent` cached tokens plus itself: a window of recent + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff.models.attention import _MASKED
from jaxeff.models.kv_cache import CACHE_AXES, cache_dtype, layer_buffers
from jaxeff.sharding import BATCH, KV_HEADS, SEQ, constrain

SLOT_AXES = (BATCH, KV_HEADS, SEQ)


@struct.dataclass
class H2OCache:
  """Heavy-hitter + recent cache: per layer keys, values, slot positions and scores (tuples of
  per-layer arrays, or stacked with a leading layer axis)."""

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  positions: tuple[jax.Array, ...] | jax.Array
  scores: tuple[jax.Array, ...] | jax.Array
  heavy: int = struct.field(pytree_node=False)
  recent: int = struct.field(pytree_node=False)

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def size(self) -> int:
    return self.heavy + self.recent

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def layers(self):
    """(k, v, positions, scores) per layer, or the stacked arrays."""
    return (self.k, self.v, self.positions, self.scores)


def init_h2o_cache(cfg, batch_size: int, *, heavy: int, recent: int, dtype=None) -> H2OCache:
  if heavy < 0 or recent < 1:
    raise ValueError(f"an H2O cache needs heavy >= 0 and recent >= 1, got {heavy}, {recent}")
  dtype = cache_dtype(cfg) if dtype is None else jnp.dtype(dtype)
  t = heavy + recent
  kv_shape = (batch_size, cfg.num_kv_heads, t, cfg.head_dim)
  slot_shape = (batch_size, cfg.num_kv_heads, t)

  return H2OCache(
    layer_buffers(cfg, kv_shape, 0, dtype, CACHE_AXES),
    layer_buffers(cfg, kv_shape, 0, dtype, CACHE_AXES),
    layer_buffers(cfg, slot_shape, -1, jnp.int32, SLOT_AXES),
    layer_buffers(cfg, slot_shape, 0, jnp.float32, SLOT_AXES),
    heavy=heavy,
    recent=recent,
  )


def attend_cache_and_chunk(q, k_new, v_new, positions, k_cache, v_cache, slot_pos):
  """A chunk's attention over per-head cached entries plus itself (causal by position).

  q [B, C, H, D], k_new/v_new [B, C, KVH, D], positions [B, C] (negative: padding, neither seeing
  nor seen), k_cache/v_cache [B, KVH, T, D] with slot positions [B, KVH, T] (-1: empty). Returns
  (out [B, C, H, D], probs f32 [B, KVH, G, C, T + C], keys, values [B, KVH, T + C, D], key positions
  [B, KVH, T + C]): the union the caller selects from."""
  b, c, h, d = q.shape
  kvh = k_cache.shape[1]
  g = h // kvh
  keys = jnp.concatenate([k_cache, k_new.transpose(0, 2, 1, 3).astype(k_cache.dtype)], axis=2)
  values = jnp.concatenate([v_cache, v_new.transpose(0, 2, 1, 3).astype(v_cache.dtype)], axis=2)
  kpos = jnp.concatenate([slot_pos, jnp.broadcast_to(positions[:, None], (b, kvh, c))], axis=2)
  qg = q.reshape(b, c, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, C, D]
  s = jnp.einsum("bkgsd,bktd->bkgst", qg, keys, preferred_element_type=jnp.float32) / jnp.sqrt(d)
  qp = positions[:, None, None, :, None]
  kp = kpos[:, :, None, None, :]
  visible = (kp >= 0) & (kp <= qp) & (qp >= 0)
  probs = jnp.where(visible, jax.nn.softmax(jnp.where(visible, s, _MASKED), axis=-1), 0.0)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(values.dtype), values)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, c, h, d).astype(q.dtype), probs, keys, values, kpos


def h2o_attention(q, k_new, v_new, positions, layer, *, heavy: int, recent: int):
  """One layer's attention for a chunk through the H2O cache, and the cache after selection.

  q [B, C, H, D], k_new/v_new [B, C, KVH, D] (rotated at their positions), positions [B, C]
  (negative: padding, neither kept nor seen), layer = (k [B, KVH, T, D], v, positions
  [B, KVH, T], scores [B, KVH, T]). Returns (out [B, C, H, D], layer)."""
  k_cache, v_cache, slot_pos, scores = layer
  b, c = positions.shape
  kvh, t = k_cache.shape[1], k_cache.shape[2]
  out, probs, keys, values, kpos = attend_cache_and_chunk(q, k_new, v_new, positions, k_cache, v_cache, slot_pos)
  acc = jnp.concatenate([scores, jnp.zeros((b, kvh, c), jnp.float32)], axis=2) + probs.sum(axis=(2, 3))
  # Keep the `recent` newest positions, then the best-scored of the rest; empty slots last.
  newest = jnp.max(positions, axis=1)[:, None, None]
  valid = kpos >= 0
  is_recent = valid & (kpos > newest - recent)
  priority = jnp.where(is_recent, jnp.inf, jnp.where(valid, acc, -jnp.inf))
  _, keep = jax.lax.top_k(priority, t)  # [B, KVH, T]
  take = lambda x: jnp.take_along_axis(x, keep, axis=2)
  kept_pos = jnp.where(take(valid), take(kpos), -1)
  layer = (
    constrain(jnp.take_along_axis(keys, keep[..., None], axis=2), CACHE_AXES),
    constrain(jnp.take_along_axis(values, keep[..., None], axis=2), CACHE_AXES),
    constrain(kept_pos, SLOT_AXES),
    constrain(jnp.where(kept_pos >= 0, take(acc), 0.0), SLOT_AXES),
  )
  return out, layer


def reset(cache: H2OCache) -> H2OCache:
  """Every slot free (a new request); the buffers are reused."""
  empty = lambda xs: jax.tree.map(lambda x: jnp.full_like(x, -1), xs)
  zero = lambda xs: jax.tree.map(jnp.zeros_like, xs)
  return cache.replace(positions=empty(cache.positions), scores=zero(cache.scores))
