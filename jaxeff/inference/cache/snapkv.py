"""SnapKV: at prefill, keep what the prompt's last queries attend to; decoding appends.

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
union is compressed to `budget` entries by its own observation window. Both go through the
model's registry implementation once per kv head: the chunk's output, and the votes from the
window's rows alone (`key_weights`), so the votes cost window x keys, not chunk x keys. Prompts are
read in chunks of at most `prefill_chunk` tokens, so memory grows linearly with the prompt. A prompt
read in one chunk is the paper's selection exactly; a longer one is compressed after each chunk
(each chunk's window votes over everything kept so far, pooled in position order). A chunk of one
token is a decode step: it is appended.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.errors import GenerationError
from jaxeff.inference.cache.base import CACHE_AXES, SLOT_AXES, Buffer, CachePolicy, cache_dtype, per_kv_head
from jaxeff.inference.cache.h2o import union
from jaxeff.sharding import constrain


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


def observation_rows(positions: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
  """(index [B, w], weight [B, w]) of each row's observation window inside the chunk: its last
  `window` real tokens (padding comes after them); weight 0 where the chunk holds fewer."""
  real = jnp.sum(positions >= 0, axis=1)  # tokens before the padding
  index = real[:, None] - window + jnp.arange(window)[None]
  return jnp.maximum(index, 0), (index >= 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SnapKV(CachePolicy):
  """SnapKV: per layer and kv head, the `budget` prompt tokens the observation window attends to
  most (votes average-pooled over `pool` neighbours, the window itself included); decoding appends
  to them. Memory: the budget plus the new tokens, however long the prompt. Positions stay
  absolute (a request is bounded by the model's trained context).

  With a driver, its `max_seq_len` is the cache's slots: min(prompt, budget) plus the new tokens
  must fit.

  Args:
    budget: prompt entries kept per layer and kv head, the observation window included.
    window: the observation window (the paper: 32); each chunk holds at least one of its queries.
    pool: average-pooling kernel over the votes (the paper: 7; odd).
    prefill_chunk: prompts are read in chunks of at most this many tokens (compressed after each).
  """

  budget: int = 1024
  window: int = 32
  pool: int = 7
  prefill_chunk: int = 2048

  name = "SnapKV"
  layer_resets = (None, None, -1)

  def __post_init__(self):
    if not 1 <= self.window < self.budget or self.pool < 1 or self.prefill_chunk < 2:
      raise GenerationError(
        f"SnapKV needs 1 <= window < budget, pool >= 1 and prefill_chunk >= 2, got budget={self.budget}, "
        f"window={self.window}, pool={self.pool}, prefill_chunk={self.prefill_chunk}"
      )

  def layer_buffers(self, cfg, batch_size, length):
    if length is None or length < self.budget:
      raise GenerationError(f"SnapKV(budget={self.budget}) needs at least {self.budget} cache slots, got {length}")
    kv = (batch_size, cfg.num_kv_heads, length, cfg.head_dim)
    return (
      Buffer(kv, 0, cache_dtype(cfg), CACHE_AXES),
      Buffer(kv, 0, cache_dtype(cfg), CACHE_AXES),
      Buffer((batch_size, cfg.num_kv_heads, length), -1, jnp.int32, SLOT_AXES),
    )

  def attend(self, positions, q, k, v, rope, layer, attention):
    k_cache, v_cache, slot_pos = layer
    b, c = positions.shape
    t = k_cache.shape[2]
    q, k = rope.apply(q), rope.apply(k)
    if c == 1:
      keys, values, kpos = union(k, v, positions, k_cache, v_cache, slot_pos)
      out = per_kv_head(attention, q, keys, values, positions, kpos).out
      # Append at each row's first empty slot (kept entries fill slots 0.. in every head alike).
      fill = jnp.sum(slot_pos[:, 0] >= 0, axis=-1)
      k_row, v_row = (x.transpose(0, 2, 1, 3).astype(k_cache.dtype) for x in (k, v))
      pos_row = jnp.broadcast_to(positions[:, None, :], (b, slot_pos.shape[1], 1))
      for r in range(b):  # one in-place slice per row, as the dense cache's decode write
        at = (r, 0, fill[r], 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_row[r : r + 1], at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_row[r : r + 1], at)
        slot_pos = jax.lax.dynamic_update_slice(slot_pos, pos_row[r : r + 1], at[:3])
      layer = (constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES), constrain(slot_pos, SLOT_AXES))
      return out.astype(q.dtype), layer
    attention.require("key_weights", "the SnapKV cache (the observation window's votes)")
    keys, values, kpos = union(k, v, positions, k_cache, v_cache, slot_pos)
    out = per_kv_head(attention, q, keys, values, positions, kpos).out
    # The votes: only the observation window's queries, weighted in when they are real tokens.
    index, weight = observation_rows(positions, self.window)
    q_obs = jnp.take_along_axis(q, index[:, :, None, None], axis=1)
    obs_positions = jnp.take_along_axis(positions, index, axis=1)
    votes = per_kv_head(attention, q_obs, keys, values, obs_positions, kpos, query_weights=weight).key_weights
    newest = jnp.max(positions, axis=1)[:, None, None]
    before = (kpos >= 0) & (kpos <= newest - self.window)
    votes = jnp.where(before, votes, 0.0)
    # Pool in position order: sort the union (cached entries, then the chunk; empty ones last).
    valid = kpos >= 0
    order = jnp.argsort(jnp.where(valid, kpos, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
    sort = lambda x: jnp.take_along_axis(x, order, axis=-1)
    pooled = avg_pool(sort(votes), self.pool)
    sorted_pos = sort(kpos)
    in_window = (sorted_pos >= 0) & (sorted_pos > newest - self.window)
    priority = jnp.where(in_window, jnp.inf, jnp.where(sorted_pos >= 0, pooled, -jnp.inf))
    _, chosen = jax.lax.top_k(priority, self.budget)
    keep = jnp.take_along_axis(order, jnp.sort(chosen, axis=-1), axis=-1)  # union indices, position order
    kept_pos = jnp.take_along_axis(kpos, keep, axis=-1)
    kept_pos = jnp.where(kept_pos >= 0, kept_pos, -1)
    pad = t - self.budget
    gather = lambda x: jnp.pad(jnp.take_along_axis(x, keep[..., None], axis=2), ((0, 0), (0, 0), (0, pad), (0, 0)))
    layer = (
      constrain(gather(keys), CACHE_AXES),
      constrain(gather(values), CACHE_AXES),
      constrain(jnp.pad(kept_pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1), SLOT_AXES),
    )
    return out.astype(q.dtype), layer

  def room(self, cfg, length, prompt):
    # The cache holds what was kept of the prompt plus the new tokens; positions stay absolute.
    return min(length - min(prompt, self.budget), cfg.max_seq_len - prompt)

  def length_for(self, prompt, new_tokens):
    return max(self.budget, min(prompt, self.budget) + new_tokens)

  def max_chunk(self, length):
    return self.prefill_chunk

  def reading_length(self, length, chunk):
    return length if chunk == 1 else self.budget

  def describe(self, batch_size, length):
    return f"{batch_size} x {length} positions, prompt kept to {self.budget}, SnapKV"

  def as_filled(self, cache, context):
    def fill(layer):
      k, v, pos = layer
      slots = pos.shape[-1]
      kept = jnp.where(jnp.arange(slots) < self.budget, context - self.budget + jnp.arange(slots), -1)
      return k, v, jnp.broadcast_to(kept.astype(jnp.int32), pos.shape)

    layers = fill(cache.layers) if cache.stacked else tuple(fill(x) for x in cache.layers)
    return cache.replace(layers=layers)
