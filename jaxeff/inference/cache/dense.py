"""The dense (static) KV cache: one slot per position, exact attention, the default policy.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.inference.cache import Dense
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> cache = Dense().init(cfg, batch_size=2, length=16)   # zeros, fixed shape, sharded by logical axes
>>> cache.layer(0)[0].shape                                 # keys of layer 0: [batch, kv_heads, length, head_dim]
(2, 2, 16, 8)
>>> tokens, positions = jnp.ones((2, 3), jnp.int32), jnp.array([[0, 1, 2], [5, 6, 7]])
>>> hidden, cache = model.forward_with_cache(tokens, positions, cache)   # writes k/v at `positions`

The gpt-fast / MaxText pattern: shapes never change, so prefill and decode compile once and the
buffers can be donated and updated in place. Slot t of a row holds that row's token at position t,
so the cache's key positions are 0..length-1 and attention masks by position (causal, and the
model's sliding window and sinks when it has them). Slots not written yet, or holding stale tokens
from an earlier or padded sequence, sit at positions after the query's and are masked; a slot is
always written before any query at or after its position reads it. Each row advances on its own
(a ragged batch), and going back (a rejected speculation) is writing at an earlier position.

Layout per layer: keys and values [batch, kv_heads, length, head_dim], heads-major like gpt-fast's
(XLA copied a [batch, length, kv_heads, head_dim] cache into this order every decode step for
attention's matmuls), with logical axes (BATCH, KV_HEADS, SEQ, HEAD_DIM): batch over data/fsdp, kv
heads over tensor, like the activations. The attention registry reads the [batch, length,
kv_heads, head_dim] view; XLA cancels the two transposes.

Token trees (speculative decoding): `TreeSlots` writes a tree's nodes to consecutive slots with a
mask that shows each node only its ancestors (the registry's `mask` capability); `move` then puts
the accepted path in position order.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxeff.errors import ConfigError
from jaxeff.inference.cache.base import CACHE_AXES, Buffer, Cache, CachePolicy, cache_dtype
from jaxeff.models.attention import index_positions
from jaxeff.sharding import constrain


class TreeSlots(NamedTuple):
  """Where a token tree of S nodes goes in the cache (speculative decoding's tree verification).

  The nodes are written to consecutive slots `start`..`start` + S - 1 of each row, though several
  share a position (siblings), so those slots hold the nodes' own positions instead of their index
  and `ancestors` [S, S] (row: query node, column: key node; a node is its own ancestor) hides
  everything but a node's own path. Slots before `start` keep their index positions; slots after
  the tree are later than every node and masked by position. After verification the accepted path
  is moved into index order (`Dense.move`).
  """

  start: jax.Array  # [B] int32
  ancestors: jax.Array  # [S, S] bool


class DenseStep(NamedTuple):
  slots: jax.Array  # [B, C]: where each token's keys and values go
  q_positions: jax.Array  # [B, C]
  kv_positions: jax.Array  # [B, T]: each slot's position
  mask: jax.Array | None  # [B, C, T]: a tree's ancestor mask, or None


def tree_layout(tree: TreeSlots, positions: jax.Array, num_slots: int):
  """(slots [B, S], kv_positions [B, T], mask [B, S, T]) for the tree nodes at `positions` [B, S]."""
  s = positions.shape[1]
  slots = tree.start[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
  index = jnp.arange(num_slots, dtype=jnp.int32)[None]
  offset = index - tree.start[:, None]  # [B, T]: node index for slots inside the tree
  inside = (offset >= 0) & (offset < s)
  node = jnp.clip(offset, 0, s - 1)
  kv_positions = jnp.where(inside, jnp.take_along_axis(positions, node, axis=1), index)
  mask = jnp.where(inside[:, None, :], tree.ancestors[:, node].transpose(1, 0, 2), True)
  return slots, kv_positions, mask


def write(cache_kv: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
  """Writes `new` [B, S, KVH, D] into one layer's `cache_kv` [B, KVH, T, D] at `slots` [B, S]
  (each row its own, in [0, T))."""
  new = new.astype(cache_kv.dtype)
  if new.shape[1] == 1:
    # Decode: one slot per row, as one dynamic_update_slice per row. XLA updates those in place;
    # a scatter here became a bounds-checked select plus several copies of the whole layer cache
    # per step (measured in the compiled HLO on XLA:CPU).
    for b in range(new.shape[0]):
      row = new[b : b + 1].transpose(0, 2, 1, 3)  # [1, KVH, 1, D]
      cache_kv = jax.lax.dynamic_update_slice(cache_kv, row, (b, 0, slots[b, 0], 0))
    return constrain(cache_kv, CACHE_AXES)
  rows = jnp.arange(new.shape[0])[:, None]
  # Advanced indices on dims 0 and 2 put them first: the indexed view is [B, S, KVH, D], like `new`.
  out = cache_kv.at[rows, :, slots].set(new, mode="promise_in_bounds", unique_indices=True)
  return constrain(out, CACHE_AXES)


def _move(cache_kv: jax.Array, src: jax.Array, dst_start: jax.Array) -> jax.Array:
  rows = jnp.take_along_axis(cache_kv, src[:, None, :, None], axis=2)  # [B, KVH, K, D]
  for b in range(cache_kv.shape[0]):
    cache_kv = jax.lax.dynamic_update_slice(cache_kv, rows[b : b + 1], (b, 0, dst_start[b], 0))
  return constrain(cache_kv, CACHE_AXES)


@dataclasses.dataclass(frozen=True)
class Dense(CachePolicy):
  """One slot per position: exact attention, memory grows with the text."""

  name = "dense"
  spans = True
  exact_rollback = True
  pads_to_end = True
  layer_resets = (None, None)

  def layer_buffers(self, cfg, batch_size, length):
    shape = (batch_size, cfg.num_kv_heads, length, cfg.head_dim)
    return (Buffer(shape, 0, cache_dtype(cfg), CACHE_AXES),) * 2

  def check_model(self, cfg) -> None:
    if cfg.attention_topk_blocks:
      # Training selects per query block from its first query; a one-token decode step would select
      # from each token's own query: a different mask than the model was trained with.
      raise ConfigError(
        "KV-cache decode with model.attention_topk_blocks is not implemented (training selects "
        "blocks per query block); decode with a full forward, or use sliding_window/attention_sinks"
      )

  def begin(self, cache: Cache, positions, *, rope=None, tree=None, partial=False):
    num_slots = cache.layer(0)[0].shape[2] if not cache.stacked else cache.layers[0].shape[3]
    if tree is None:
      kv_positions = index_positions(positions.shape[0], num_slots)  # slot t holds position t
      return DenseStep(positions, positions, kv_positions, None)
    slots, kv_positions, mask = tree_layout(tree, positions, num_slots)
    return DenseStep(slots, positions, kv_positions, mask)

  def attend(self, step: DenseStep, q, k, v, rope, layer, attention):
    k_cache, v_cache = (write(c, new, step.slots) for c, new in zip(layer, (rope.apply(k), v)))
    options = {}
    if step.mask is not None:
      attention.require("mask", "token-tree verification (use a chain speculator with this attention)")
      options["mask"] = step.mask
    out = attention(
      rope.apply(q),
      k_cache.transpose(0, 2, 1, 3),  # the registry's [B, T, KVH, D]
      v_cache.transpose(0, 2, 1, 3),
      q_positions=step.q_positions,
      kv_positions=step.kv_positions,
      **options,
    )
    return out, (k_cache, v_cache)

  def _slice_span(self, x, row_axis, span):
    return jax.lax.slice_in_dim(x, 0, span, axis=row_axis + 2)

  def move(self, cache: Cache, src: jax.Array, dst_start: jax.Array) -> Cache:
    """Every layer with the slots `src` [B, K] copied to `dst_start`..+K-1 (all read before any
    is written, so overlapping ranges are fine): a verified tree path into position order."""
    if cache.stacked:
      layers = tuple(jax.vmap(lambda layer: _move(layer, src, dst_start))(x) for x in cache.layers)
    else:
      layers = tuple(tuple(_move(x, src, dst_start) for x in layer) for layer in cache.layers)
    return cache.replace(layers=layers)
