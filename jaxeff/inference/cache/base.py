"""What every KV-cache policy is: settings, a per-layer state, and one `attend` the model calls.

A policy (a frozen dataclass of its settings) describes its buffers; `init` builds a `Cache`: one
state per layer (`layers`: a tuple of per-layer tuples, or, for `scan_layers` models, one tuple of
arrays with a leading LAYERS axis that `nnx.scan` slices like the stacked parameters) plus per-row
state shared by the layers (`rows`: counters, slot maps). `Llama.forward_with_cache` knows nothing
about any policy: per chunk it calls `begin` (what every layer needs: slots, masks, counters),
then each layer's attention calls `attend(step, q, k, v, rope, layer, attention)` with the layer's
queries, keys and values before rotary embedding and the model's attention implementation from
the registry (`jaxeff.models.attention.BoundAttention`), and finally `finish` advances the rows.

Policies compute their scores and softmax through that implementation (the registry's `lse`,
`key_weights` and `mask` capabilities where they need more than the output), so `model.attention`
and its kernels apply to every cache. Buffers are created in their logical sharding (batch over
data/fsdp, kv heads over tensor).

What the drivers ask of a policy beside the forward: `room` (new tokens that fit after a prompt),
`max_chunk` (longest prompt chunk one forward may read), `reset_rows` (a row freed for a new
request), `window`/`put_window` (a step over some rows, and for slot-per-position caches only the
positions it needs), `describe` (one line for statistics), `as_filled` (bookkeeping as after N
tokens, for benchmarks of long contexts without reading them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff.errors import GenerationError
from jaxeff.models.attention import AttentionResult
from jaxeff.sharding import BATCH, HEAD_DIM, KV_HEADS, LAYERS, SEQ, constrain

CACHE_AXES = (BATCH, KV_HEADS, SEQ, HEAD_DIM)  # keys and values: [B, KVH, T, D]
SLOT_AXES = (BATCH, KV_HEADS, SEQ)  # per-head slot bookkeeping: [B, KVH, T]
ROW_AXES = (BATCH,)
HIDDEN = jnp.iinfo(jnp.int32).max  # the key position of an empty slot: after every query, so never seen


class Buffer(NamedTuple):
  """One array of a policy's state: its shape, initial value, dtype and logical axes."""

  shape: tuple
  fill: Any
  dtype: Any
  axes: tuple


@struct.dataclass
class Cache:
  """A policy's state for `batch_size` rows: `layers` (per layer, or stacked) and `rows`."""

  layers: Any
  rows: tuple
  policy: Any = struct.field(pytree_node=False)
  stacked: bool = struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  @property
  def batch_size(self) -> int:
    first = jax.tree.leaves(self.layers)[0]
    return first.shape[1 if self.stacked else 0]

  @property
  def num_layers(self) -> int:
    return jax.tree.leaves(self.layers)[0].shape[0] if self.stacked else len(self.layers)

  def layer(self, i: int) -> tuple:
    """Layer `i`'s state (the policy's buffers in order)."""
    return tuple(x[i] for x in self.layers) if self.stacked else self.layers[i]


def hide_empty(positions: jax.Array) -> jax.Array:
  """Key positions with empty slots and padding (negative) moved after every query."""
  return jnp.where(positions >= 0, positions, HIDDEN)


def _row_axis(cache: Cache, in_layers: bool) -> int:
  return 1 if in_layers and cache.stacked else 0


class CachePolicy:
  """Base class; the defaults are those of a cache with one slot per position (`Dense`).

  Subclasses are frozen dataclasses of their settings and implement `layer_buffers` (and
  `row_buffers` for per-row state), `attend`, and what their rules change of the rest.
  """

  name = "policy"
  spans = False  # slot t holds position t: a step may read only the first positions (`window`)
  exact_rollback = False  # writing past a row's end and writing again later is harmless (speculation)
  pads_to_end = False  # padding tokens may be written at positions after a prompt (else they get -1)
  ragged = False  # `begin` takes a `layout` (a ragged step: decode and prefill rows in one token row)
  # Per buffer (layer_buffers', row_buffers' order): the value a new request's row starts from, or
  # None for buffers that are simply overwritten (keys, values).
  layer_resets: tuple = ()
  row_resets: tuple = ()

  # ------------------------------------------------------------------ state

  def layer_buffers(self, cfg, batch_size: int, length: int) -> tuple[Buffer, ...]:
    raise NotImplementedError

  def row_buffers(self, cfg, batch_size: int, length: int) -> tuple[Buffer, ...]:
    return ()

  def check_model(self, cfg) -> None:
    """Raises for a model this policy cannot serve (e.g. one with its own sliding window)."""
    if cfg.sliding_window is not None or cfg.attention_sinks:
      raise GenerationError(f"the {self.name} cache replaces the model's own sliding window; use one of them")

  def init(self, cfg, batch_size: int, length: int | None = None) -> Cache:
    """An empty cache for `batch_size` rows of `length` positions (what the policy makes of it).
    Under `jax.set_mesh(mesh)` (and inside `jax.jit`) it is created in its sharding."""
    if batch_size < 1 or (length is not None and length < 1):
      raise GenerationError(f"a cache needs batch_size >= 1 and length >= 1, got {batch_size}, {length}")
    buffers = self.layer_buffers(cfg, batch_size, length)
    if cfg.scan_layers:
      layers = tuple(
        constrain(jnp.full((cfg.num_layers, *b.shape), b.fill, b.dtype), (LAYERS, *b.axes)) for b in buffers
      )
    else:
      layers = tuple(
        tuple(constrain(jnp.full(b.shape, b.fill, b.dtype), b.axes) for b in buffers) for _ in range(cfg.num_layers)
      )
    rows = tuple(
      constrain(jnp.full(b.shape, b.fill, b.dtype), b.axes) for b in self.row_buffers(cfg, batch_size, length)
    )
    return Cache(layers, rows, self, cfg.scan_layers)

  def cache_bytes(self, cfg, batch_size: int, length: int | None = None) -> int:
    """Bytes `init` would allocate (every buffer, bookkeeping included)."""
    shapes = jax.eval_shape(lambda: self.init(cfg, batch_size, length))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  # ------------------------------------------------------------------ the forward

  def begin(self, cache: Cache, positions: jax.Array, *, rope=None, tree=None, partial: bool = False):
    """What every layer's `attend` needs for a chunk at `positions` [B, C], computed once for all
    layers (`rope`: the rotary embedding at the chunk's positions, for tables a policy needs at
    other positions)."""
    if tree is not None or partial:
      raise GenerationError(f"the {self.name} cache takes plain chunks (no token tree, all layers)")
    return positions

  def attend(self, step, q, k, v, rope, layer: tuple, attention) -> tuple[jax.Array, tuple]:
    """One layer: q [B, C, H, D], k/v [B, C, KVH, D] (before rotary embedding; `rope` rotates at
    the chunk's positions), the layer's state -> (out [B, C, H, D], the layer's new state)."""
    raise NotImplementedError

  def finish(self, cache: Cache, layers, step) -> Cache:
    """The cache after the chunk: the layers' new state, the rows advanced."""
    return cache.replace(layers=layers)

  # ------------------------------------------------------------------ what drivers ask

  def room(self, cfg, length: int, prompt: int) -> int | None:
    """New tokens that fit after a prompt of `prompt` tokens in a cache of `length` positions
    (None: any number; a bounded cache)."""
    return length - prompt

  def length_for(self, prompt: int, new_tokens: int) -> int:
    """The smallest `length` whose cache takes a request of `prompt` plus `new_tokens` tokens."""
    return prompt + new_tokens

  def max_chunk(self, length: int) -> int:
    """Most tokens one forward may read (prompts longer than this are prefilled in chunks)."""
    return length

  def reading_length(self, length: int, chunk: int) -> int:
    """The `length` to `init` a cache with for reading a text of `length` tokens in chunks."""
    return length

  def describe(self, batch_size: int, length: int) -> str:
    return f"{batch_size} x {length} positions"

  def reset(self, cache: Cache) -> Cache:
    """Every row emptied: the bookkeeping buffers (`layer_resets`, `row_resets`) refilled; keys
    and values are simply overwritten as the rows are used again."""
    if not self._has_resets():
      return cache
    refill = lambda fills, state: tuple(x if f is None else jnp.full_like(x, f) for f, x in zip(fills, state))
    if cache.stacked:
      layers = refill(self.layer_resets, cache.layers)
    else:
      layers = tuple(refill(self.layer_resets, layer) for layer in cache.layers)
    return cache.replace(layers=layers, rows=refill(self.row_resets, cache.rows))

  def _has_resets(self) -> bool:
    return any(f is not None for f in self.layer_resets + self.row_resets)

  def reset_rows(self, cache: Cache, mask: jax.Array) -> Cache:
    """Rows where `mask` [B] is set emptied for new requests; others as they are."""
    if not self._has_resets():
      return cache
    return select_rows(cache, mask, self.reset(cache), cache)

  def shield(self, cache: Cache, live: jax.Array) -> Cache:
    """The cache as a step over rows `live` [B] should see it (policies whose idle rows could be
    written through shared state hide them here); `keep_rows` undoes it after the step."""
    return cache

  def keep_rows(self, new: Cache, live: jax.Array, old: Cache) -> Cache:
    """After a step: rows `live` from `new`, the others as they were in `old`."""
    return select_rows(new, live, new, old)

  def take_window(self, cache: Cache, row0, rows: int, span: int | None = None) -> Cache:
    """Rows row0..row0+rows-1 (and, for a slot-per-position cache, the first `span` positions):
    a small cache a step runs on; `put_window` writes it back."""
    take = lambda axis: lambda x: jax.lax.dynamic_slice_in_dim(x, row0, rows, axis)
    layers = jax.tree.map(take(_row_axis(cache, True)), cache.layers)
    if span is not None:
      layers = jax.tree.map(lambda x: self._slice_span(x, _row_axis(cache, True), span), layers)
    return cache.replace(layers=layers, rows=jax.tree.map(take(0), cache.rows))

  def put_window(self, cache: Cache, window: Cache, row0) -> Cache:
    """`window` written back at rows row0.. (and positions 0..): in place when the cache is donated."""

    def put(axis):
      def one(full, part):
        start = [0] * full.ndim
        start[axis] = row0
        return jax.lax.dynamic_update_slice(full, part.astype(full.dtype), start)

      return one

    layers = jax.tree.map(put(_row_axis(cache, True)), cache.layers, window.layers)
    rows = jax.tree.map(put(0), cache.rows, window.rows)
    return cache.replace(layers=layers, rows=rows)

  def _slice_span(self, x, row_axis: int, span: int):
    return x

  def as_filled(self, cache: Cache, context: int) -> Cache:
    """The cache's bookkeeping as `context` tokens leave it (contents untouched): for benchmarks."""
    return cache


def select_rows(cache: Cache, mask: jax.Array, new: Cache, old: Cache) -> Cache:
  """Rows where `mask` [B] is set from `new`, the others from `old` (same policy and shapes)."""

  def pick(axis):
    def one(a, b):
      shape = [1] * a.ndim
      shape[axis] = mask.shape[0]
      return jnp.where(mask.reshape(shape), a, b)

    return one

  layers = jax.tree.map(pick(_row_axis(cache, True)), new.layers, old.layers)
  rows = jax.tree.map(pick(0), new.rows, old.rows)
  return cache.replace(layers=layers, rows=rows)


def cache_dtype(cfg) -> jnp.dtype:
  """Keys and values are stored in the compute dtype (what attention reads)."""
  return jnp.dtype(cfg.dtype)


def merge_attention(out_a, lse_a, out_b, lse_b):
  """Softmax attention over the union of two disjoint key sets from each set's output [..., D]
  and log-sum-exp [...]: (out, lse). A part that saw nothing (lse -inf or the mask value) gets no
  weight, whatever its output holds."""
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = jnp.where(wa + wb > 0, wa + wb, 1.0)
  pick = lambda w, out: jnp.where(w[..., None] > 0, w[..., None] * out.astype(jnp.float32), 0.0)
  out = (pick(wa, out_a) + pick(wb, out_b)) / total[..., None]
  return out.astype(out_b.dtype), m + jnp.log(total)


def per_kv_head(attention, q, keys, values, q_positions, kv_positions, **kwargs):
  """Attention over keys each kv head keeps for itself (H2O, SnapKV): q [B, C, H, D], keys/values
  [B, KVH, T, D], key positions [B, KVH, T] (negative: empty). The registry's implementation runs
  once per kv head (vmapped), with that head's positions. Returns an `AttentionResult` whose
  out is [B, C, H, D] and key_weights (when asked) [B, KVH, T]."""
  b, c, h, d = q.shape
  kvh = keys.shape[1]
  qg = q.reshape(b, c, kvh, h // kvh, d)

  def one(qh, kh, vh, kpos):  # [B, C, G, D], [B, T, D], [B, T, D], [B, T]
    return attention(qh, kh[:, :, None], vh[:, :, None], q_positions=q_positions, kv_positions=kpos, **kwargs)

  res = jax.vmap(one, in_axes=(2, 1, 1, 1), out_axes=0)(qg, keys, values, hide_empty(kv_positions))
  if not isinstance(res, AttentionResult):
    res = AttentionResult(res, None, None)
  out = jnp.moveaxis(res.out, 0, 2).reshape(b, c, h, d)
  weights = None if res.key_weights is None else jnp.moveaxis(res.key_weights[:, :, 0], 0, 1)
  return res._replace(out=out, key_weights=weights)
