"""A fixed-size KV cache of attention sinks plus a ring of recent tokens (StreamingLLM's layout).

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks": keep the first
`sinks` tokens (the "attention sinks" every head leans on) and the last `window` tokens; evict the
rest. Memory stays flat however long the text runs.

Layout: per layer [B, KVH, sinks + window, D] like `KVCache`, but keys are stored BEFORE rotary
embedding, because positions are cache-relative (the paper's scheme; rotating at absolute
positions breaks past the trained context): token t lives in slot t while t < sinks, else in slot
sinks + (t - sinks) mod window; `slot_positions` [B, sinks + window] holds the absolute index of
each slot's token (-1: empty).

Attention of a query at absolute index q: it sees the sinks and the keys at q - window < t <= q.
Inside the cache their positions run 0 .. sinks + window - 1 with q last, i.e. q sits at
P_q = min(q, sinks + window - 1); a window key t sits at P_q - (q - t) and a sink j at j. Scores
depend only on the difference of the rotary positions, so window keys are rotated at t - base and
the query at q - base (base: the chunk's first position minus the window, keeping angles small),
and sinks against the query rotated at P_q: two score matrices, one per kind of key. A chunk of
new tokens attends over the cache as it was plus itself, then is written into the ring; with
`sinks + window` at least the text's length nothing is ever evicted and this is dense attention
at absolute positions exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff.models.attention import _MASKED
from jaxeff.models.kv_cache import CACHE_AXES, cache_dtype, layer_buffers
from jaxeff.models.layers import apply_rope, rope_cos_sin
from jaxeff.sharding import BATCH, SEQ, constrain


@struct.dataclass
class RingCache:
  """Sinks + recent-window cache: keys (pre-rotary) and values as `KVCache`'s layouts, plus the
  absolute position of each slot's token."""

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array
  slot_positions: jax.Array  # [B, sinks + window] int32, -1 where empty
  sinks: int = struct.field(pytree_node=False)
  window: int = struct.field(pytree_node=False)

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def size(self) -> int:
    return self.sinks + self.window

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))


def init_ring_cache(cfg, batch_size: int, *, sinks: int, window: int, dtype=None) -> RingCache:
  """An empty ring cache of `sinks + window` slots per row (sharded by the cache's logical axes)."""
  if sinks < 0 or window < 1:
    raise ValueError(f"a ring cache needs sinks >= 0 and window >= 1, got {sinks}, {window}")
  dtype = cache_dtype(cfg) if dtype is None else jnp.dtype(dtype)
  shape = (batch_size, cfg.num_kv_heads, sinks + window, cfg.head_dim)
  k, v = (layer_buffers(cfg, shape, 0, dtype, CACHE_AXES) for _ in range(2))
  slots = constrain(jnp.full((batch_size, sinks + window), -1, jnp.int32), (BATCH, SEQ))
  return RingCache(k, v, slots, sinks=sinks, window=window)


def ring_slots(positions: jax.Array, sinks: int, window: int) -> jax.Array:
  """The slot each absolute position goes to."""
  return jnp.where(positions < sinks, positions, sinks + (positions - sinks) % window)


def ring_attention(q, k_new, v_new, positions, k_cache, v_cache, slot_positions, *, sinks, window, inv_freq):
  """One layer's attention for a chunk through the ring, and the ring with the chunk written.

  q [B, C, H, D], k_new/v_new [B, C, KVH, D] (all before rotary embedding), positions [B, C]
  (consecutive per row, C <= window; negative: padding, neither written nor seen),
  k_cache/v_cache [B, KVH, T, D], slot_positions [B, T].
  Returns (out [B, C, H, D], k_cache, v_cache)."""
  b, c, h, d = q.shape
  kvh = k_new.shape[2]
  keys = jnp.concatenate([k_cache.transpose(0, 2, 1, 3), k_new.astype(k_cache.dtype)], axis=1)  # [B, T+C, KVH, D]
  values = jnp.concatenate([v_cache.transpose(0, 2, 1, 3), v_new.astype(v_cache.dtype)], axis=1)
  kpos = jnp.concatenate([slot_positions, positions], axis=1)  # [B, T+C]
  base = positions[:, :1] - window  # keeps the rotary angles small however long the text
  rotate = lambda x, pos: apply_rope(x, *rope_cos_sin(pos, inv_freq))
  q_window = rotate(q, positions - base)
  q_sink = rotate(q, jnp.minimum(positions, sinks + window - 1))
  k_window = rotate(keys, kpos - base)  # empty slots (-1) rotate somewhere harmless: they are masked
  k_sink = rotate(keys, kpos)

  def scores(qr, kr):  # [B, KVH, G, C, T+C] in f32
    qg = qr.reshape(b, c, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    return jnp.einsum("bkgsd,btkd->bkgst", qg, kr, preferred_element_type=jnp.float32) / jnp.sqrt(d)

  is_sink = (kpos >= 0) & (kpos < sinks)
  s = jnp.where(is_sink[:, None, None, None, :], scores(q_sink, k_sink), scores(q_window, k_window))
  qp, kp = positions[:, None, None, :, None], kpos[:, None, None, None, :]
  visible = (kp >= 0) & (kp <= qp) & ((kp < sinks) | (qp - kp < window))
  probs = jax.nn.softmax(jnp.where(visible, s, _MASKED), axis=-1).astype(values.dtype)
  out = jnp.einsum("bkgst,btkd->bkgsd", probs, values).transpose(0, 3, 1, 2, 4).reshape(b, c, h, d)
  slots = _write_slots(positions, sinks, window)
  rows = jnp.arange(b)[:, None]
  k_cache = k_cache.at[rows, :, slots].set(k_new.astype(k_cache.dtype), mode="drop")
  v_cache = v_cache.at[rows, :, slots].set(v_new.astype(v_cache.dtype), mode="drop")
  return out.astype(q.dtype), constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES)


def _write_slots(positions, sinks, window):
  # Padding (position < 0) goes to an index past the end, which the scatter drops.
  return jnp.where(positions >= 0, ring_slots(positions, sinks, window), sinks + window)


def advance(cache: RingCache, positions: jax.Array) -> jax.Array:
  """slot_positions after writing `positions` [B, C] (negative ones are padding: not written)."""
  slots = _write_slots(positions, cache.sinks, cache.window)
  return cache.slot_positions.at[jnp.arange(positions.shape[0])[:, None], slots].set(positions, mode="drop")


def reset(cache: RingCache) -> RingCache:
  """The cache emptied (every slot free) for a new request; the buffers are reused as they are."""
  return cache.replace(slot_positions=jnp.full_like(cache.slot_positions, -1))
