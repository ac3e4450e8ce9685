"""Static KV cache: preallocated keys and values per layer, written at each sequence's positions.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> from jaxeff.models.kv_cache import init_cache
>>> cache = init_cache(cfg, batch_size=2, max_len=16)     # zeros, fixed shape, sharded by logical axes
>>> cache.k[0].shape                                      # per layer [batch, kv_heads, max_len, head_dim]
(2, 2, 16, 8)
>>> tokens, positions = jnp.ones((2, 3), jnp.int32), jnp.array([[0, 1, 2], [5, 6, 7]])
>>> hidden, cache = model.forward_with_cache(tokens, positions, cache)   # writes k/v at `positions`

The gpt-fast / MaxText pattern: shapes never change, so prefill and decode compile once and the
buffers can be donated and updated in place. Slot t of a row holds that row's token at position t,
so the cache's key positions are just 0..max_len-1 and attention masks by position (causal, and a
sliding window when the model has one). Slots that are not written yet, or hold stale tokens from
an earlier or padded sequence, sit at positions after the query's and are masked; a slot is always
written before any query at or after its position reads it. Positions must lie in [0, max_len).
Each row advances on its own, which is what a ragged batch needs. Going back (a rejected
speculation) is writing at an earlier position.

Layout: per layer [batch, kv_heads, max_len, head_dim], heads-major like gpt-fast's (XLA copied
a [batch, max_len, kv_heads, head_dim] cache into this order every decode step for attention's
matmuls), with logical axes (BATCH, KV_HEADS, SEQ, HEAD_DIM), so it shards like the
activations (batch over data/fsdp, kv heads over tensor). `as_attention_layout` gives the attention
registry's [batch, max_len, kv_heads, head_dim] view; XLA cancels the two transposes. Models with
`scan_layers` keep one stacked array per k and v with a leading LAYERS axis, which `nnx.scan`
slices like the stacked parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxeff.config import ModelConfig
from jaxeff.sharding import BATCH, HEAD_DIM, KV_HEADS, LAYERS, SEQ, constrain

CACHE_AXES = (BATCH, KV_HEADS, SEQ, HEAD_DIM)


class KVCache(NamedTuple):
  """Keys and values: tuples of per-layer [B, KVH, T, D] arrays, or [L, B, KVH, T, D] when stacked."""

  k: tuple[jax.Array, ...] | jax.Array
  v: tuple[jax.Array, ...] | jax.Array

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k, (tuple, list))

  @property
  def batch_size(self) -> int:
    return self._first.shape[-4]

  @property
  def max_len(self) -> int:
    return self._first.shape[-2]

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  @property
  def _first(self) -> jax.Array:
    return self.k if self.stacked else self.k[0]

  def kv_positions(self) -> jax.Array:
    """Positions of the cache slots, [B, T]: slot t holds position t."""
    return jnp.broadcast_to(jnp.arange(self.max_len, dtype=jnp.int32), (self.batch_size, self.max_len))


def cache_dtype(cfg: ModelConfig) -> jnp.dtype:
  """Keys and values are stored in the compute dtype (what attention reads)."""
  return jnp.dtype(cfg.dtype)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An all-zero cache for `batch_size` rows of up to `max_len` positions.

  Args:
    cfg: the model's config (layers, kv heads, head dim, `scan_layers` for the stacked layout).
    batch_size: rows decoded together.
    max_len: positions per row (prompt plus generated tokens).
    dtype: storage dtype; default the model's compute dtype.

  Under `jax.set_mesh(mesh)` (and inside `jax.jit`), the arrays are constrained to their logical
  axes, so the cache is created directly in its sharding.
  """
  if batch_size < 1 or max_len < 1:
    raise ValueError(f"cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
  dtype = cache_dtype(cfg) if dtype is None else jnp.dtype(dtype)
  shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
  return KVCache(*(layer_buffers(cfg, shape, 0, dtype, CACHE_AXES) for _ in range(2)))


def layer_buffers(cfg: ModelConfig, shape: tuple, fill, dtype, axes: tuple):
  """One `shape` buffer filled with `fill` per layer, constrained to `axes`: a tuple, or one array
  with a leading LAYERS axis for `cfg.scan_layers` (the layout every cache of this package uses)."""
  if cfg.scan_layers:
    return constrain(jnp.full((cfg.num_layers,) + tuple(shape), fill, dtype), (LAYERS,) + tuple(axes))
  return tuple(constrain(jnp.full(shape, fill, dtype), axes) for _ in range(cfg.num_layers))


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> int:
  """Bytes `init_cache` would allocate (keys and values, all layers)."""
  dtype = cache_dtype(cfg) if dtype is None else jnp.dtype(dtype)
  return 2 * cfg.num_layers * batch_size * max_len * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def write(cache_kv: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
  """Writes `new` [B, S, KVH, D] into one layer's `cache_kv` [B, KVH, T, D] at `positions` [B, S].

  Each row writes at its own positions, which must lie in [0, T).
  """
  new = new.astype(cache_kv.dtype)
  if new.shape[1] == 1:
    # Decode: one slot per row, as one dynamic_update_slice per row. XLA updates those in place;
    # a scatter here became a bounds-checked select plus several copies of the whole layer cache
    # per step (measured in the compiled HLO on XLA:CPU).
    for b in range(new.shape[0]):
      row = new[b : b + 1].transpose(0, 2, 1, 3)  # [1, KVH, 1, D]
      cache_kv = jax.lax.dynamic_update_slice(cache_kv, row, (b, 0, positions[b, 0], 0))
    return constrain(cache_kv, CACHE_AXES)
  rows = jnp.arange(new.shape[0])[:, None]
  # Advanced indices on dims 0 and 2 put them first: the indexed view is [B, S, KVH, D], like `new`.
  out = cache_kv.at[rows, :, positions].set(new, mode="promise_in_bounds", unique_indices=True)
  return constrain(out, CACHE_AXES)


def as_attention_layout(cache_kv: jax.Array) -> jax.Array:
  """[B, KVH, T, D] -> [B, T, KVH, D], the attention registry's key/value layout."""
  return cache_kv.transpose(0, 2, 1, 3)


class TreeSlots(NamedTuple):
  """Where a token tree of S nodes goes in the cache (speculative decoding's tree verification).

  The nodes are written to consecutive slots `start`..`start` + S - 1 of each row, though several
  share a position (siblings), so those slots hold the nodes' own positions instead of their index
  and `ancestors` [S, S] (row: query node, column: key node; a node is its own ancestor) hides
  everything but a node's own path. Slots before `start` keep their index positions; slots after
  the tree are later than every node and masked by position. After verification the accepted path
  is moved into index order (`move`).
  """

  start: jax.Array  # [B] int32
  ancestors: jax.Array  # [S, S] bool


def tree_layout(tree: TreeSlots, positions: jax.Array, num_slots: int):
  """(slots [B, S], kv_positions [B, T], mask [B, S, T]) for the tree nodes at `positions` [B, S]."""
  b, s = positions.shape
  slots = tree.start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
  index = jnp.arange(num_slots, dtype=jnp.int32)[None]
  offset = index - tree.start[:, None]  # [B, T]: node index for slots inside the tree
  inside = (offset >= 0) & (offset < s)
  node = jnp.clip(offset, 0, s - 1)
  kv_positions = jnp.where(inside, jnp.take_along_axis(positions, node, axis=1), index)
  mask = jnp.where(inside[:, None, :], tree.ancestors[:, node].transpose(1, 0, 2), True)
  return slots, kv_positions, mask


def move(cache_kv: jax.Array, src: jax.Array, dst_start: jax.Array) -> jax.Array:
  """One layer's `cache_kv` [B, KVH, T, D] with the slots `src` [B, K] copied to `dst_start`..+K-1.

  All sources are read before anything is written, so overlapping ranges are fine.
  """
  rows = jnp.take_along_axis(cache_kv, src[:, None, :, None], axis=2)  # [B, KVH, K, D]
  for b in range(cache_kv.shape[0]):
    cache_kv = jax.lax.dynamic_update_slice(cache_kv, rows[b : b + 1], (b, 0, dst_start[b], 0))
  return constrain(cache_kv, CACHE_AXES)


def move_slots(cache: KVCache, src: jax.Array, dst_start: jax.Array) -> KVCache:
  """`move` in every layer (stacked or per layer)."""
  if cache.stacked:
    one = lambda x: jax.vmap(lambda layer: move(layer, src, dst_start))(x)
    return KVCache(one(cache.k), one(cache.v))
  return KVCache(*(tuple(move(x, src, dst_start) for x in xs) for xs in (cache.k, cache.v)))
