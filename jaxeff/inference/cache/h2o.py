"""H2O: per layer and kv head, the heavy hitters (most attended tokens) plus the recent ones.

Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models": a few tokens collect most of the attention; keep the `heavy` tokens with the largest
accumulated attention score plus the `recent` newest ones, evict the rest. Every (layer, kv head)
keeps its own set, so each holds a slot -> position map and a score per slot.

Layout per layer: keys (rotated at their absolute positions, as the dense cache) and values
[B, KVH, heavy + recent, D], `positions` [B, KVH, heavy + recent] (-1: empty) and `scores`
[B, KVH, heavy + recent] f32: the attention each cached token received so far, summed over the
query heads of its group and over the queries that saw it.

A chunk of new tokens attends over the cache plus itself (causal), through the model's registry
implementation once per kv head (its `key_weights` give the attention each key received, added to
the scores; the new tokens start with what the chunk gave them); then heavy + recent entries of the
union stay: the `recent` newest positions, and the `heavy` best-scored among the rest. For one new
token (decode) that is H2O's rule exactly: the cached token with the lowest score outside the
recent window is evicted. For a longer chunk (prefill), selection happens once per chunk, so
within a chunk queries see tokens a step-by-step decode would already have dropped. With
heavy = 0 a query sees the `recent` cached tokens plus itself: a window of recent + 1.

Positions stay absolute (as the paper's), so a request is bounded by the model's trained context
(`max_seq_len`), memory is not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.errors import GenerationError
from jaxeff.inference.cache.base import CACHE_AXES, SLOT_AXES, Buffer, CachePolicy, cache_dtype, per_kv_head
from jaxeff.sharding import constrain


def union(k, v, positions, k_cache, v_cache, slot_pos):
  """The cache's entries and the chunk's, per kv head: keys, values [B, KVH, T + C, D] and their
  positions [B, KVH, T + C] (-1: empty or padding)."""
  b, c, kvh = k.shape[:3]
  keys = jnp.concatenate([k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype)], axis=2)
  values = jnp.concatenate([v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype)], axis=2)
  kpos = jnp.concatenate([slot_pos, jnp.broadcast_to(positions[:, None], (b, kvh, c))], axis=2)
  return keys, values, kpos


@dataclasses.dataclass(frozen=True)
class H2O(CachePolicy):
  """Heavy-hitter oracle (H2O): the `heavy` tokens with the most accumulated attention plus the
  `recent` newest, per layer and kv head: `heavy + recent` slots.

  Args:
    heavy: heavy hitters kept (the paper: 20% of the budget works as well as the full cache).
    recent: newest tokens kept; a chunk of new tokens holds at most heavy + recent.
  """

  heavy: int = 64
  recent: int = 64

  name = "H2O"
  layer_resets = (None, None, -1, 0.0)

  def __post_init__(self):
    if self.heavy < 0 or self.recent < 1:
      raise GenerationError(f"H2O needs heavy >= 0 and recent >= 1, got {self.heavy}, {self.recent}")

  @property
  def size(self) -> int:
    return self.heavy + self.recent

  def layer_buffers(self, cfg, batch_size, length):
    kv = (batch_size, cfg.num_kv_heads, self.size, cfg.head_dim)
    slots = (batch_size, cfg.num_kv_heads, self.size)
    return (
      Buffer(kv, 0, cache_dtype(cfg), CACHE_AXES),
      Buffer(kv, 0, cache_dtype(cfg), CACHE_AXES),
      Buffer(slots, -1, jnp.int32, SLOT_AXES),
      Buffer(slots, 0, jnp.float32, SLOT_AXES),
    )

  def attend(self, positions, q, k, v, rope, layer, attention):
    attention.require("key_weights", "the H2O cache (accumulated attention per key)")
    k_cache, v_cache, slot_pos, scores = layer
    b, c = positions.shape
    t = k_cache.shape[2]
    keys, values, kpos = union(rope.apply(k), v, positions, k_cache, v_cache, slot_pos)
    res = per_kv_head(attention, rope.apply(q), keys, values, positions, kpos, query_weights=positions >= 0)
    acc = jnp.concatenate([scores, jnp.zeros((b, kpos.shape[1], c), jnp.float32)], axis=2) + res.key_weights
    # Keep the `recent` newest positions, then the best-scored of the rest; empty slots last.
    newest = jnp.max(positions, axis=1)[:, None, None]
    valid = kpos >= 0
    is_recent = valid & (kpos > newest - self.recent)
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
    return res.out.astype(q.dtype), layer

  def room(self, cfg, length, prompt):
    return cfg.max_seq_len - prompt  # absolute positions: within the trained context

  def length_for(self, prompt, new_tokens):
    return self.size  # unused: the cache has its own size; positions are bounded by the model's context

  def max_chunk(self, length):
    return self.size

  def describe(self, batch_size, length):
    return f"{batch_size} x {self.heavy} heavy hitters + {self.recent} recent tokens, H2O"

  def as_filled(self, cache, context):
    def fill(layer):
      k, v, pos, scores = layer
      kept = jnp.broadcast_to(context - self.size + jnp.arange(self.size), pos.shape[-3:]).astype(jnp.int32)
      return k, v, jnp.broadcast_to(kept, pos.shape), jnp.abs(scores)

    layers = fill(cache.layers) if cache.stacked else tuple(fill(x) for x in cache.layers)
    return cache.replace(layers=layers)
