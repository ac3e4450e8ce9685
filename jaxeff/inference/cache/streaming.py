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
from typing import NamedTuple

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
from jaxeff.models.layers import Rope
from jaxeff.sharding import BATCH, SEQ, constrain


class RingSet(NamedTuple):
  """One of the ring's two key sets for a chunk: the rotary embeddings of the queries and of the
  set's keys, and the keys' positions for the causal mask (hidden: not in this set, or empty)."""

  q_rope: Rope
  k_rope: Rope
  kv_positions: jax.Array


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

  def begin(self, cache: Cache, positions, *, rope=None, tree=None, partial=False):
    super().begin(cache, positions, tree=tree, partial=partial)
    if positions.shape[1] > self.window:
      raise GenerationError(
        f"a chunk through a ring cache holds at most {self.window} tokens, got {positions.shape[1]}"
      )
    slot_positions = cache.rows[0]
    base = positions[:, :1] - self.window  # keeps the rotary angles small however long the text
    hide = lambda pos, keep: hide_empty(jnp.where(keep, pos, -1))
    if positions.shape[1] == 1:
      # Decode: the new token is written first (it replaces the position `window` back, which no
      # query at or after it sees), then each set is read in place, without copying the cache.
      written = self._advance(slot_positions, positions)
      sinks = RingSet(
        rope.at(jnp.minimum(positions, self.size - 1)), rope.at(written[:, : self.sinks]),
        hide_empty(written[:, : self.sinks]),
      )  # fmt: skip
      window_kpos = written[:, self.sinks :]
      window = RingSet(rope.at(positions - base), rope.at(window_kpos - base), hide_empty(window_kpos))
      return positions, slot_positions, sinks, window
    # A chunk: two key sets, the sink slots and the window's, each with the chunk; a chunk token
    # belongs to the sinks while its position is below `sinks` (the other set never sees it). The
    # rotary tables are the same for every layer: made once here.
    sink_kpos = jnp.concatenate([slot_positions[:, : self.sinks], positions], axis=1)
    window_kpos = jnp.concatenate([slot_positions[:, self.sinks :], positions], axis=1)
    in_chunk = jnp.arange(sink_kpos.shape[1]) >= self.sinks
    sinks = RingSet(
      rope.at(jnp.minimum(positions, self.size - 1)),
      rope.at(sink_kpos),
      hide(sink_kpos, ~in_chunk | (sink_kpos < self.sinks)),
    )
    in_chunk = jnp.arange(window_kpos.shape[1]) >= self.window
    window = RingSet(
      rope.at(positions - base),
      rope.at(window_kpos - base),  # empty slots rotate somewhere harmless: they are hidden
      hide(window_kpos, ~in_chunk | (window_kpos >= self.sinks)),
    )
    return positions, slot_positions, sinks, window

  def attend(self, step, q, k, v, rope, layer, attention):
    positions, _, sinks, window = step
    attention.require("lse", "the StreamingLLM cache (two key sets merged)")
    k_cache, v_cache = layer
    k_new, v_new = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
    decode = positions.shape[1] == 1
    if decode:
      k_cache, v_cache = (self._write_one(c, new, positions) for c, new in ((k_cache, k_new), (v_cache, v_new)))
    cached_k, cached_v = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)  # [B, T, KVH, D]

    def part(ring: RingSet, lo: int, hi: int, window_size):
      keys, values = cached_k[:, lo:hi], cached_v[:, lo:hi]
      if not decode:
        keys, values = jnp.concatenate([keys, k_new], axis=1), jnp.concatenate([values, v_new], axis=1)
      return attention(
        ring.q_rope.apply(q),
        ring.k_rope.apply(keys),
        values,
        q_positions=positions,
        kv_positions=ring.kv_positions,
        sliding_window=window_size,
        return_lse=True,
      )

    # Both parts mask causally by absolute position; the window part also by the ring's window.
    out = part(window, self.sinks, self.size, self.window)
    if self.sinks:
      sink_part = part(sinks, 0, self.sinks, None)
      out = out._replace(out=merge_attention(sink_part.out, sink_part.lse, out.out, out.lse)[0])
    if not decode:
      slots = ring_slots(positions, self.sinks, self.window)
      rows = jnp.arange(positions.shape[0])[:, None]
      k_cache = k_cache.at[rows, :, slots].set(k_new, mode="drop")
      v_cache = v_cache.at[rows, :, slots].set(v_new, mode="drop")
    return out.out.astype(q.dtype), (constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES))

  def _write_one(self, cache_kv, new, positions):
    """One token per row written at its ring slot: one in-place slice per row (a scatter copied
    the layer's buffer); padding (a negative position) writes the slot's own content back."""
    slot = jnp.clip(ring_slots(positions, self.sinks, self.window)[:, 0], 0, self.size - 1)
    for b in range(new.shape[0]):
      at = (b, 0, slot[b], 0)
      row = new[b : b + 1].transpose(0, 2, 1, 3)  # [1, KVH, 1, D]
      old = jax.lax.dynamic_slice(cache_kv, at, row.shape)
      cache_kv = jax.lax.dynamic_update_slice(cache_kv, jnp.where(positions[b, 0] >= 0, row, old), at)
    return cache_kv

  def _advance(self, slot_positions, positions):
    slots = ring_slots(positions, self.sinks, self.window)
    rows = jnp.arange(positions.shape[0])[:, None]
    return slot_positions.at[rows, slots].set(positions, mode="drop")

  def finish(self, cache, layers, step):
    positions, slot_positions = step[:2]
    return cache.replace(layers=layers, rows=(constrain(self._advance(slot_positions, positions), (*ROW_AXES, SEQ)),))

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
