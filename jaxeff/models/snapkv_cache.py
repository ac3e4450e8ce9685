"""A KV cache that keeps what the prompt's last queries attend to (SnapKV's layout).

Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation": the last `window`
prompt tokens (the observation window) already attend to what generation will need. At prefill,
per layer and kv head, their attention over the earlier prompt tokens is summed (over the window's
queries and the kv head's group of query heads), smoothed by average pooling (kernel `pool`, zero
padded: a selected token brings its neighbours), and the top `budget - window` earlier tokens
stay, with the window itself. Decoding then appends every new token to the kept entries (no
further eviction), so memory is the budget plus the generated tokens instead of the whole prompt.

Layout per layer: keys (rotated at their absolute positions) and values [B, KVH, T, D] and slot
positions [B, KVH, T] (-1: empty); kept entries sit in slots 0.. in position order, new tokens
are appended after them. T (the slots) must hold the budget plus the tokens generated after it.

A chunk of more than one token is a prompt chunk: it attends over the cache plus itself, then the
union is compressed to `budget` entries by its own observation window. A prompt read in one chunk
is the paper's selection exactly; a longer prompt read in several chunks is compressed after each
(each chunk's window votes over everything kept so far, pooled in position order). A chunk of
one token is a decode step: it is appended.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff.models.h2o_cache import SLOT_AXES, attend_cache_and_chunk
from jaxeff.models.kv_cache import CACHE_AXES, cache_dtype, layer_buffers
from jaxeff.sharding import constrain


@struct.dataclass
class SnapKVCache:
  """Prompt-selected cache: per layer keys, values and slot positions (tuples of per-layer
  arrays, or stacked with a leading layer axis)."""

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  positions: tuple[jax.Array, ...] | jax.Array
  budget: int = struct.field(pytree_node=False)
  window: int = struct.field(pytree_node=False)
  pool: int = struct.field(pytree_node=False)

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def layers(self):
    return (self.k, self.v, self.positions)


def init_snapkv_cache(cfg, batch_size: int, slots: int, *, budget: int, window: int, pool: int, dtype=None):
  if not 1 <= window < budget <= slots or pool < 1:
    raise ValueError(
      f"a SnapKV cache needs 1 <= window < budget <= slots and pool >= 1, got window={window}, "
      f"budget={budget}, slots={slots}, pool={pool}"
    )
  dtype = cache_dtype(cfg) if dtype is None else jnp.dtype(dtype)
  kv_shape = (batch_size, cfg.num_kv_heads, slots, cfg.head_dim)
  slot_shape = (batch_size, cfg.num_kv_heads, slots)

  return SnapKVCache(
    layer_buffers(cfg, kv_shape, 0, dtype, CACHE_AXES),
    layer_buffers(cfg, kv_shape, 0, dtype, CACHE_AXES),
    layer_buffers(cfg, slot_shape, -1, jnp.int32, SLOT_AXES),
    budget=budget,
    window=window,
    pool=pool,
  )


def observation_votes(probs, positions, kpos, window: int):
  """Attention the observation window (each row's last `window` positions) pays to every earlier
  key, summed over its queries and the group's heads: f32 [B, KVH, T + C], 0 for window keys."""
  newest = jnp.max(positions, axis=1)
  observing = (positions >= 0) & (positions > newest[:, None] - window)  # [B, C]
  votes = jnp.einsum("bkgct,bc->bkt", probs, observing.astype(probs.dtype))
  before = (kpos >= 0) & (kpos <= newest[:, None, None] - window)
  return jnp.where(before, votes, 0.0)


def avg_pool(x, pool: int):
  """Average over a window of `pool` entries centred on each (zero padded) along the last axis."""
  left = pool // 2
  summed = jax.lax.reduce_window(
    x,
    0.0,
    jax.lax.add,
    (1,) * (x.ndim - 1) + (pool,),
    (1,) * x.ndim,
    [(0, 0)] * (x.ndim - 1) + [(left, pool - 1 - left)],
  )
  return summed / pool


def snapkv_attention(q, k_new, v_new, positions, layer, *, budget: int, window: int, pool: int):
  """One layer's attention for a chunk through the SnapKV cache, and the cache after it.

  q [B, C, H, D], k_new/v_new [B, C, KVH, D] (rotated at their positions), positions [B, C]
  (negative: padding), layer = (k [B, KVH, T, D], v, positions [B, KVH, T]). C == 1 appends
  (decode); C > 1 compresses the cache and the chunk to `budget` entries (prefill)."""
  k_cache, v_cache, slot_pos = layer
  b, c = positions.shape
  t = k_cache.shape[2]
  out, probs, keys, values, kpos = attend_cache_and_chunk(q, k_new, v_new, positions, k_cache, v_cache, slot_pos)
  if c == 1:
    # Append at each row's first empty slot (kept entries fill slots 0.. in every head alike).
    fill = jnp.sum(slot_pos[:, 0] >= 0, axis=-1)
    k_row, v_row = (x.transpose(0, 2, 1, 3).astype(k_cache.dtype) for x in (k_new, v_new))
    pos_row = jnp.broadcast_to(positions[:, None, :], (b, slot_pos.shape[1], 1))
    for r in range(b):  # one in-place slice per row, as the dense cache's decode write
      at = (r, 0, fill[r], 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k_row[r : r + 1], at)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v_row[r : r + 1], at)
      slot_pos = jax.lax.dynamic_update_slice(slot_pos, pos_row[r : r + 1], at[:3])
    return out, (constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES), constrain(slot_pos, SLOT_AXES))
  # Pool in position order: sort the union (cached entries, then the chunk; empty ones last).
  valid = kpos >= 0
  order = jnp.argsort(jnp.where(valid, kpos, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
  sort = lambda x: jnp.take_along_axis(x, order, axis=-1)
  pooled = avg_pool(sort(observation_votes(probs, positions, kpos, window)), pool)
  newest = jnp.max(positions, axis=1)[:, None, None]
  sorted_pos = sort(kpos)
  in_window = (sorted_pos >= 0) & (sorted_pos > newest - window)
  priority = jnp.where(in_window, jnp.inf, jnp.where(sorted_pos >= 0, pooled, -jnp.inf))
  _, chosen = jax.lax.top_k(priority, budget)
  keep = jnp.take_along_axis(order, jnp.sort(chosen, axis=-1), axis=-1)  # union indices, position order
  kept_pos = jnp.take_along_axis(kpos, keep, axis=-1)
  pad = t - budget
  gather = lambda x: jnp.pad(jnp.take_along_axis(x, keep[..., None], axis=2), ((0, 0), (0, 0), (0, pad), (0, 0)))
  layer = (
    constrain(gather(keys), CACHE_AXES),
    constrain(gather(values), CACHE_AXES),
    constrain(jnp.pad(kept_pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1), SLOT_AXES),
  )
  return out, layer


def reset(cache: SnapKVCache) -> SnapKVCache:
  """Every slot free (a new request); the buffers are reused."""
  return cache.replace(positions=jax.tree.map(lambda x: jnp.full_like(x, -1), cache.positions))
