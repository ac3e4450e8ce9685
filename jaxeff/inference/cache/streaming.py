"""StreamingLLM: attention sinks plus a ring of recent tokens, in `sinks + window` slots.

Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks": keep the first
`sinks` tokens (the "attention sinks" every head leans on) and the last `window` tokens; evict the
rest. Memory stays flat however long the text runs.

Layout per layer: keys and values [B, KVH, sinks + window, D] like the dense cache's, but keys are
stored BEFORE rotary embedding, because positions are cache-relative (the paper's scheme; rotating
at absolute positions breaks past the trained context): token t lives in slot t while t < sinks,
else in slot sinks + (t - sinks) mod window. Per row, `slot_positions` [B, sinks + window] holds
the absolute index of each slot's token (-1: empty).

Attention of a query at absolute index q: it sees the sinks and the keys at q - window < t <= q.
Inside the cache their positions run 0 .. sinks + window - 1 with q last, i.e. q sits at
P_q = min(q, sinks + window - 1); a window key t sits at P_q - (q - t) and a sink j at j. Scores
depend only on the difference of the rotary positions, so window keys are rotated at t - base and
the query at q - base (base: the chunk's first position minus the window, keeping angles small),
and sinks against the query rotated at P_q. Those are two attentions of the model's registry
implementation (sinks; window), merged by their log-sum-exps. A chunk of new tokens attends over
the cache as it was plus itself, then is written into the ring; with `sinks + window` at least the
text's length nothing is ever evicted and this is dense attention at absolute positions exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.errors import GenerationError
from jaxeff.inference.cache.base import (
  CACHE_AXES,
  ROW_AXES,
  Buffer,
  Cache,
  CachePolicy,
  cache_dtype,
  hide_empty,
  merge_attention,
)
from jaxeff.sharding import BATCH, SEQ, constrain


def ring_slots(positions: jax.Array, sinks: int, window: int) -> jax.Array:
  """The slot each absolute position goes to; padding (negative) to one past the end (dropped)."""
  slots = jnp.where(positions < sinks, positions, sinks + (positions - sinks) % window)
  return jnp.where(positions >= 0, slots, sinks + window)


@dataclasses.dataclass(frozen=True)
class StreamingLLM(CachePolicy):
  """Attention sinks plus a window of recent tokens (StreamingLLM): `sinks + window` slots.

  Args:
    sinks: the first tokens, kept forever (the paper: 4).
    window: recent tokens kept; a chunk of new tokens holds at most this many.
  """

  sinks: int = 4
  window: int = 1020

  name = "StreamingLLM"
  layer_resets = (None, None)
  row_resets = (-1,)

  def __post_init__(self):
    if self.sinks < 0 or self.window < 1:
      raise GenerationError(f"StreamingLLM needs sinks >= 0 and window >= 1, got {self.sinks}, {self.window}")

  @property
  def size(self) -> int:
    return self.sinks + self.window

  def layer_buffers(self, cfg, batch_size, length):
    shape = (batch_size, cfg.num_kv_heads, self.size, cfg.head_dim)
    return (Buffer(shape, 0, cache_dtype(cfg), CACHE_AXES),) * 2

  def row_buffers(self, cfg, batch_size, length):
    return (Buffer((batch_size, self.size), -1, jnp.int32, (BATCH, SEQ)),)

  def begin(self, cache: Cache, positions, *, tree=None, partial=False):
    super().begin(cache, positions, tree=tree, partial=partial)
    if positions.shape[1] > self.window:
      raise GenerationError(
        f"a chunk through a ring cache holds at most {self.window} tokens, got {positions.shape[1]}"
      )
    return positions, cache.rows[0]

  def attend(self, step, q, k, v, rope, layer, attention):
    positions, slot_positions = step
    purpose = "the StreamingLLM cache (two key sets merged)"
    attention.require("lse", purpose)
    attention.require("mask", purpose)
    k_cache, v_cache = layer
    keys = jnp.concatenate([k_cache.transpose(0, 2, 1, 3), k.astype(k_cache.dtype)], axis=1)  # [B, T+C, KVH, D]
    values = jnp.concatenate([v_cache.transpose(0, 2, 1, 3), v.astype(v_cache.dtype)], axis=1)
    kpos = jnp.concatenate([slot_positions, positions], axis=1)  # [B, T+C], -1: empty or padding
    base = positions[:, :1] - self.window  # keeps the rotary angles small however long the text
    is_sink = (kpos >= 0) & (kpos < self.sinks)
    c = positions.shape[1]
    visible_kpos = hide_empty(kpos)
    # Both parts mask causally by absolute position; the window part also by the ring's window.
    sink_part = attention(
      rope.at(jnp.minimum(positions, self.size - 1)).apply(q),
      rope.at(kpos).apply(keys),
      values,
      q_positions=positions,
      kv_positions=visible_kpos,
      mask=jnp.broadcast_to(is_sink[:, None, :], (kpos.shape[0], c, kpos.shape[1])),
      sliding_window=None,
      return_lse=True,
    )
    window_part = attention(
      rope.at(positions - base).apply(q),
      rope.at(kpos - base).apply(keys),  # empty slots rotate somewhere harmless: they are masked
      values,
      q_positions=positions,
      kv_positions=visible_kpos,
      mask=jnp.broadcast_to(~is_sink[:, None, :], (kpos.shape[0], c, kpos.shape[1])),
      sliding_window=self.window,
      return_lse=True,
    )
    out, _ = merge_attention(sink_part.out, sink_part.lse, window_part.out, window_part.lse)
    slots = ring_slots(positions, self.sinks, self.window)
    rows = jnp.arange(positions.shape[0])[:, None]
    k_cache = k_cache.at[rows, :, slots].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, :, slots].set(v.astype(v_cache.dtype), mode="drop")
    return out.astype(q.dtype), (constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES))

  def finish(self, cache, layers, step):
    positions, slot_positions = step
    slots = ring_slots(positions, self.sinks, self.window)
    rows = jnp.arange(positions.shape[0])[:, None]
    slot_positions = slot_positions.at[rows, slots].set(positions, mode="drop")
    return cache.replace(layers=layers, rows=(constrain(slot_positions, (*ROW_AXES, SEQ)),))

  def room(self, cfg, length, prompt):
    return None  # bounded: text may run on past any length

  def length_for(self, prompt, new_tokens):
    return self.size  # unused: the ring has its own size

  def max_chunk(self, length):
    return self.window

  def describe(self, batch_size, length):
    return f"{batch_size} x {self.sinks} sinks + {self.window} recent tokens, StreamingLLM"

  def as_filled(self, cache, context):
    slot = jnp.arange(self.size)
    recent = context - self.window + (slot - self.sinks - (context - self.window - self.sinks)) % self.window
    pos = jnp.where(slot < self.sinks, slot, recent).astype(jnp.int32)
    return cache.replace(rows=(jnp.broadcast_to(pos, cache.rows[0].shape),))
