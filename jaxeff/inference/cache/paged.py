"""The paged KV cache (PagedAttention, Kwon et al. 2023): a pool of fixed-size blocks and a block
table per sequence.

>>> import jax.numpy as jnp
>>> from jaxeff import ModelConfig
>>> from jaxeff.inference.cache import Paged
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> cache = Paged(block_size=4).init(cfg, batch_size=2, length=16)   # 2 rows x 4 blocks: 8 blocks
>>> cache.layer(0)[0].shape                         # keys of layer 0: [blocks, kv_heads, block_size, head_dim]
(8, 2, 4, 8)
>>> cache.rows[0]                                   # block tables: row b's logical block j is in block [b, j]
Array([[0, 1, 2, 3],
       [4, 5, 6, 7]], dtype=int32)

Memory is a pool of `num_blocks` blocks of `block_size` tokens per layer, shared by every row; a
row's block table maps its logical block j (positions j*bs .. j*bs+bs-1) to a block of the pool,
so position p of row b lives at slot `table[b, p // bs] * bs + p % bs`. Entries of -1 are blocks
the row does not have: writes there are dropped and reads see nothing. The tables are plain state
the host owns: `init` gives every row its own `length` positions (a static layout, as the dense
cache; `Generator` uses it like that), while the serving engine's block manager
(`jaxeff.inference.blocks`) allocates blocks as sequences grow, shares the blocks of a common
prompt prefix between sequences, and writes the tables before each step (`with_tables`).

Attention reads a row's blocks through its table, one of two ways (`kernel`):
- "ragged": `pallas_kernels.ragged_paged_attention`, which walks the block tables itself, one call
  for every row of a step however ragged (TPU: a Mosaic kernel, tables scalar-prefetched, pages
  copied double-buffered; GPU: Triton; CPU: its XLA path, chunked over the pages with an online
  softmax); for the registry's exact softmax attentions ("dense", "blocked"), with or without a
  sliding window.
- "gather": the rows' blocks up to the step's span (`take_window`: the first span/bs table
  columns) gathered into a [rows, span, kv_heads, head_dim] view, and the model's attention
  implementation from the registry run on it, masked by position exactly like the dense cache, so
  every `cfg.attention`, attention sinks and token trees (speculation) work.
"auto" (the default) takes "ragged" where it applies, else "gather". (On this CPU the ragged op's
XLA path ran a SmolLM2 decode step of 8 rows 1.5x faster than the gather at 300 cached tokens
and 2.2x at 1500.)

A step is the usual [rows, chunk] batch or one row of tokens from many sequences:
- `PackedLayout` (the serving engine's steps where the ragged op applies): every sequence's new
  tokens back to back, unpadded (a decoding request's one token, a prompt's chunk of any length),
  with their boundaries as data (`cu_q_lens`), so one compiled program serves every mix of the same
  token count; the ragged op attends them all in one call.
- `RaggedLayout` (the gather path): decode rows of one token and prefill rows of a padded chunk,
  a static shape per mix; each group attends over its own rows' tables.

Layout per layer: keys and values [num_blocks, kv_heads, block_size, head_dim], kv heads over the
mesh's tensor axis like the dense cache's; blocks are not split (every device holds its heads of
every block).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.errors import ConfigError, GenerationError
from jaxeff.inference.cache.base import HIDDEN, Buffer, Cache, CachePolicy, cache_dtype
from jaxeff.inference.cache.dense import tree_layout
from jaxeff.sharding import BATCH, HEAD_DIM, KV_HEADS, constrain
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

KERNELS = ("auto", "ragged", "gather")
KERNEL_ATTENTIONS = ("dense", "blocked")  # registry implementations the kernel computes exactly

POOL_AXES = (None, KV_HEADS, None, HEAD_DIM)  # [blocks, kv heads, block_size, head_dim]
TABLE_AXES = (BATCH, None)


class RaggedLayout(NamedTuple):
  """A ragged step's shape (static): `decode` rows of one token, then `prefill` rows of `chunk`
  tokens (padded), all packed into the one row of tokens a forward runs: [1, decode + prefill * chunk]."""

  decode: int
  prefill: int
  chunk: int

  @property
  def tokens(self) -> int:
    return self.decode + self.prefill * self.chunk

  @property
  def rows(self) -> int:
    return self.decode + self.prefill


class PackedLayout(NamedTuple):
  """A packed step: S sequences' new tokens back to back in one row of T tokens (positions -1 past
  the last one); sequence i's are tokens cu_q_lens[i] .. cu_q_lens[i+1]-1, at consecutive
  positions. The boundaries are data, so the program depends only on T and S."""

  cu_q_lens: jax.Array  # int32 [S + 1], nondecreasing from 0
  max_prefills: int | None = None  # static: at most this many sequences have more than one token


class _Group(NamedTuple):
  """Rows that attend alike in one step: their tables and query positions [n, C] (and a tree)."""

  tables: jax.Array  # [n, NB]
  q_positions: jax.Array  # [n, C]
  kv_positions: jax.Array  # [n, NB * bs]
  mask: jax.Array | None  # [n, C, NB * bs]: a token tree's ancestors
  count: int  # tokens of the group in the step's token row


class PagedStep(NamedTuple):
  slots: jax.Array  # [T]: each token's slot in the flattened pool (num_blocks * bs: dropped)
  groups: tuple  # _Group per row group, in token order
  ragged: bool  # the step's tokens are [1, T] (a RaggedLayout or PackedLayout), not [n, C]
  packed: tuple | None = None  # a PackedLayout's (tables [S, NB], kv_lens [S], cu_q_lens [S + 1], max_prefills)


def block_slots(tables: jax.Array, positions: jax.Array, block_size: int, num_blocks: int) -> jax.Array:
  """Flat pool slots of `positions` [n, C] (or logical indices) through `tables` [n, NB]; negative
  positions, positions past the table and missing blocks (-1) give `num_blocks * block_size`, a slot
  that writes drop."""
  nb = tables.shape[1]
  logical = positions // block_size
  inside = (positions >= 0) & (logical < nb)
  block = jnp.take_along_axis(tables, jnp.clip(logical, 0, nb - 1), axis=1)
  ok = inside & (block >= 0)
  return jnp.where(ok, block * block_size + positions % block_size, num_blocks * block_size)


def token_slots(tables: jax.Array, seq: jax.Array, positions: jax.Array, block_size: int, num_blocks: int):
  """Flat pool slots of tokens [T] of sequences `seq` [T] at `positions` [T] (block_slots, one
  token at a time: no [T, NB] table copy)."""
  nb = tables.shape[1]
  logical = positions // block_size
  block = tables[seq, jnp.clip(logical, 0, nb - 1)]
  ok = (positions >= 0) & (logical < nb) & (block >= 0)
  return jnp.where(ok, block * block_size + positions % block_size, num_blocks * block_size)


def gather_view(pool: jax.Array, tables: jax.Array) -> jax.Array:
  """Rows' blocks in position order: pool [P, KVH, bs, D], tables [n, NB] -> [n, NB * bs, KVH, D]
  (a missing block reads block 0; callers hide those positions)."""
  n, nb = tables.shape
  _, kvh, bs, d = pool.shape
  blocks = jnp.take(pool, jnp.maximum(tables, 0), axis=0)  # [n, NB, KVH, bs, D]
  return blocks.transpose(0, 1, 3, 2, 4).reshape(n, nb * bs, kvh, d)


def view_positions(tables: jax.Array, block_size: int) -> jax.Array:
  """Each view slot's position [n, NB * bs]: its index, or HIDDEN where the row has no block."""
  n, nb = tables.shape
  index = jnp.arange(nb * block_size, dtype=jnp.int32)[None]
  present = jnp.repeat(tables >= 0, block_size, axis=1)
  return jnp.where(present, index, HIDDEN)


def write_pool(pool: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
  """`new` [T, KVH, D] written into `pool` [P, KVH, bs, D] at flat `slots` [T] (out of range: dropped).
  One scatter on (block, offset): the pool is never copied or transposed."""
  bs = pool.shape[2]
  out = pool.at[slots // bs, :, slots % bs].set(new.astype(pool.dtype), mode="drop")
  return constrain(out, POOL_AXES)


@dataclasses.dataclass(frozen=True)
class Paged(CachePolicy):
  """A pool of `num_blocks` blocks of `block_size` tokens; rows reach them through block tables.

  Args:
    block_size: tokens per block (16 is vLLM's default; larger blocks gather fewer, bigger pieces).
    num_blocks: blocks in the pool; None: every row's `length` positions (`batch_size * ceil(length
      / block_size)`, the dense cache's memory). The serving engine sizes it from a memory budget.
    kernel: "auto", "ragged" or "gather" (module docstring).
    interpret: run the ragged op's TPU kernel in the Pallas interpreter (tests on CPU).
  """

  block_size: int = 16
  num_blocks: int | None = None
  kernel: str = "auto"
  interpret: bool = False

  name = "paged"
  spans = True
  exact_rollback = True
  pads_to_end = False
  ragged = True
  layer_resets = (None, None)

  def __post_init__(self):
    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise GenerationError(f"block_size must be a positive integer, got {self.block_size!r}")
    if self.num_blocks is not None and self.num_blocks < 1:
      raise GenerationError(f"num_blocks must be >= 1, got {self.num_blocks}")
    if self.kernel not in KERNELS:
      raise GenerationError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

  def uses_kernel(self, attention, tree: bool) -> bool:
    """Whether a step with this bound attention runs the ragged paged-attention op."""
    options = dict(attention.options)
    fits = attention.name in KERNEL_ATTENTIONS and not options.get("sinks") and not tree
    if self.kernel == "ragged" and not fits:
      what = f"{attention.name!r}{' with sinks' if options.get('sinks') else ''}{' (a token tree)' if tree else ''}"
      raise ConfigError(
        f"the ragged paged-attention op computes {' or '.join(KERNEL_ATTENTIONS)} attention without sinks or "
        f"token trees, not {what}: use kernel='gather' (or 'auto')"
      )
    return self.kernel == "ragged" or (self.kernel == "auto" and fits)

  def blocks_per_row(self, length: int) -> int:
    return -(-length // self.block_size)

  def pool_blocks(self, batch_size: int, length: int) -> int:
    return batch_size * self.blocks_per_row(length) if self.num_blocks is None else self.num_blocks

  def block_bytes(self, cfg) -> int:
    """Bytes one block takes over all layers (keys and values)."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * self.block_size * cfg.head_dim * cache_dtype(cfg).itemsize

  def layer_buffers(self, cfg, batch_size, length):
    shape = (self.pool_blocks(batch_size, length), cfg.num_kv_heads, self.block_size, cfg.head_dim)
    return (Buffer(shape, 0, cache_dtype(cfg), POOL_AXES),) * 2

  def row_buffers(self, cfg, batch_size, length):
    return (Buffer((batch_size, self.blocks_per_row(length)), -1, jnp.int32, TABLE_AXES),)

  def check_model(self, cfg) -> None:
    if cfg.attention_topk_blocks:
      raise ConfigError(
        "KV-cache decode with model.attention_topk_blocks is not implemented (training selects "
        "blocks per query block); decode with a full forward, or use sliding_window/attention_sinks"
      )

  def init(self, cfg, batch_size: int, length: int | None = None) -> Cache:
    """An empty pool, and tables giving row b the blocks b*NB .. b*NB+NB-1 where the pool has them
    (all of them when `num_blocks` is None; -1 past the pool's end)."""
    if length is None:
      raise GenerationError("a paged cache needs a length (positions per row)")
    cache = super().init(cfg, batch_size, length)
    nb, pool = self.blocks_per_row(length), self.pool_blocks(batch_size, length)
    static = np.arange(batch_size * nb, dtype=np.int32).reshape(batch_size, nb)
    static[static >= pool] = -1
    return self.with_tables(cache, static)

  def with_tables(self, cache: Cache, tables) -> Cache:
    """The cache with these block tables [rows, NB] (host arrays from a block manager)."""
    return cache.replace(rows=(constrain(jnp.asarray(tables, jnp.int32), TABLE_AXES),))

  def cache_bytes(self, cfg, batch_size: int, length: int | None = None) -> int:
    nb = self.blocks_per_row(length)
    return self.pool_blocks(batch_size, length) * self.block_bytes(cfg) + batch_size * nb * 4

  # ------------------------------------------------------------------ the forward

  def _num_blocks(self, cache: Cache) -> int:
    return cache.layers[0].shape[1] if cache.stacked else cache.layer(0)[0].shape[0]

  def begin(self, cache: Cache, positions, *, rope=None, tree=None, partial=False, layout=None):
    (tables,) = cache.rows
    bs, pool = self.block_size, self._num_blocks(cache)
    span = tables.shape[1] * bs
    if layout is None:
      if tree is None:
        slots = block_slots(tables, positions, bs, pool)
        group = _Group(tables, positions, view_positions(tables, bs), None, positions.size)
      else:  # the tree's nodes go to consecutive logical slots (as in the dense cache)
        logical, kv_positions, mask = tree_layout(tree, positions, span)
        hidden = view_positions(tables, bs) == HIDDEN
        kv_positions = jnp.where(hidden, HIDDEN, kv_positions)
        slots = block_slots(tables, logical, bs, pool)
        group = _Group(tables, positions, kv_positions, mask, positions.size)
      return PagedStep(slots.reshape(-1), (group,), False)
    if tree is not None:
      raise GenerationError("a ragged step takes no token tree")
    flat = positions.reshape(-1)
    if isinstance(layout, PackedLayout):
      cu, t = layout.cu_q_lens, flat.shape[0]
      seq = jnp.minimum(jnp.searchsorted(cu[1:], jnp.arange(t), side="right"), cu.shape[0] - 2)
      last = flat[jnp.clip(cu[1:] - 1, 0, t - 1)]
      kv_lens = jnp.where(cu[1:] > cu[:-1], last + 1, 0)  # a sequence's last new token closes it
      packed = (tables, kv_lens, cu, layout.max_prefills)
      return PagedStep(token_slots(tables, seq, flat, bs, pool), (), True, packed)
    groups, parts = [], []
    if layout.decode:
      q = flat[: layout.decode].reshape(layout.decode, 1)
      t = tables[: layout.decode]
      groups.append(_Group(t, q, view_positions(t, bs), None, layout.decode))
      parts.append(block_slots(t, q, bs, pool).reshape(-1))
    if layout.prefill:
      q = flat[layout.decode :].reshape(layout.prefill, layout.chunk)
      t = tables[layout.decode :]
      groups.append(_Group(t, q, view_positions(t, bs), None, layout.prefill * layout.chunk))
      parts.append(block_slots(t, q, bs, pool).reshape(-1))
    return PagedStep(jnp.concatenate(parts), tuple(groups), True)

  def attend(self, step: PagedStep, q, k, v, rope, layer, attention):
    b, c, h, d = q.shape
    kvh = k.shape[2]
    k_pool, v_pool = (
      write_pool(pool, new.reshape(b * c, kvh, d), step.slots) for pool, new in zip(layer, (rope.apply(k), v))
    )
    q = rope.apply(q)
    if step.packed is not None:
      if not self.uses_kernel(attention, False):
        raise GenerationError(
          f"a packed step runs the ragged paged-attention op, which does not compute {attention.name!r} "
          f"attention{' with sinks' if dict(attention.options).get('sinks') else ''} (kernel={self.kernel!r}): "
          "use a RaggedLayout step"
        )
      tables, kv_lens, cu, prefills = step.packed
      out = self._ragged_op(q, k_pool, v_pool, kv_lens, jnp.maximum(tables, 0), cu, attention, prefills)
      return out, (k_pool, v_pool)
    if self.uses_kernel(attention, any(g.mask is not None for g in step.groups)):
      return self._attend_kernel(step, q, k_pool, v_pool, attention), (k_pool, v_pool)
    if not step.ragged:
      (group,) = step.groups
      return self._attend_group(group, q, k_pool, v_pool, attention), (k_pool, v_pool)
    outs, start = [], 0
    for group in step.groups:
      n, gc = group.q_positions.shape
      part = q[0, start : start + group.count].reshape(n, gc, h, d)
      outs.append(self._attend_group(group, part, k_pool, v_pool, attention).reshape(1, group.count, h, d))
      start += group.count
    return jnp.concatenate(outs, axis=1), (k_pool, v_pool)

  def _attend_kernel(self, step: PagedStep, q, k_pool, v_pool, attention):
    """Every row of the step in one kernel call: q [B, C, H, D] (or the ragged [1, T, H, D])."""
    tables, kv_lens, q_lens = [], [], []
    extra = max(-(-g.q_positions.shape[1] // self.block_size) for g in step.groups)
    for g in step.groups:
      n, gc = g.q_positions.shape
      first = g.q_positions[:, 0]
      # Rows are right-padded: their gc queries sit at first..first+gc-1 for the kernel (padding
      # queries see keys past the real ones; their outputs are dropped). No real token: no keys.
      kv_lens.append(jnp.where(first >= 0, first + gc, 0))
      # Blocks past the table (padding past a row's end) and missing ones read block 0: only
      # padding queries can see them.
      tables.append(jnp.pad(jnp.maximum(g.tables, 0), ((0, 0), (0, extra))))
      q_lens += [gc] * n
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return self._ragged_op(q, k_pool, v_pool, jnp.concatenate(kv_lens), jnp.concatenate(tables), cu_q_lens, attention)

  def _ragged_op(self, q, k_pool, v_pool, kv_lens, tables, cu_q_lens, attention, max_prefills=None):
    """The op over q [..., H, D] flattened to its tokens [T, H, D]; the result in q's shape."""
    h, d = q.shape[-2:]
    return ragged_paged_attention(
      q.reshape(-1, h, d),
      k_pool,
      v_pool,
      kv_lens,
      tables,
      cu_q_lens,
      jnp.full((1,), kv_lens.shape[0], jnp.int32),
      sliding_window=dict(attention.options).get("sliding_window"),
      interpret=self.interpret,
      max_prefill_seqs=max_prefills,
    ).reshape(q.shape)

  def _attend_group(self, group: _Group, q, k_pool, v_pool, attention):
    options = {}
    if group.mask is not None:
      attention.require("mask", "token-tree verification (use a chain speculator with this attention)")
      options["mask"] = group.mask
    return attention(
      q,
      gather_view(k_pool, group.tables),
      gather_view(v_pool, group.tables),
      q_positions=group.q_positions,
      kv_positions=group.kv_positions,
      **options,
    )

  # ------------------------------------------------------------------ what drivers ask

  def describe(self, batch_size: int, length: int) -> str:
    blocks = self.pool_blocks(batch_size, length)
    return f"{blocks} blocks of {self.block_size} tokens, up to {length} positions per row"

  def take_window(self, cache: Cache, row0, rows: int, span: int | None = None) -> Cache:
    """Rows row0.. of the tables (and only the blocks the first `span` positions need); the pool
    is shared by every row, so the window holds all of it."""
    (tables,) = cache.rows
    tables = jax.lax.dynamic_slice_in_dim(tables, row0, rows, axis=0)
    if span is not None:
      tables = tables[:, : self.blocks_per_row(span)]
    return cache.replace(rows=(tables,))

  def put_window(self, cache: Cache, window: Cache, row0) -> Cache:
    return cache.replace(layers=window.layers)  # tables are the host's: a step never changes them

  def shield(self, cache: Cache, live: jax.Array) -> Cache:
    """Rows not `live` lose their tables for one step: they neither write nor read."""
    (tables,) = cache.rows
    return cache.replace(rows=(jnp.where(live[:, None], tables, -1),))

  def keep_rows(self, new: Cache, live: jax.Array, old: Cache) -> Cache:
    return new.replace(rows=old.rows)  # shielded rows wrote nothing; their tables come back

  def move(self, cache: Cache, src: jax.Array, dst_start: jax.Array) -> Cache:
    """Every layer with the logical slots `src` [B, K] copied to `dst_start`..+K-1 (a verified tree
    path into position order; all read before any is written)."""
    (tables,) = cache.rows
    bs, pool = self.block_size, self._num_blocks(cache)
    dst = dst_start[:, None] + jnp.arange(src.shape[1], dtype=jnp.int32)[None]
    src_slots = block_slots(tables, src, bs, pool).reshape(-1)
    dst_slots = block_slots(tables, dst, bs, pool).reshape(-1)

    def one(x):  # [P, KVH, bs, D]
      moved = x[jnp.minimum(src_slots // bs, pool - 1), :, src_slots % bs]  # [K, KVH, D], all read first
      return write_pool(x, moved, dst_slots)

    if cache.stacked:
      layers = tuple(jax.vmap(one)(x) for x in cache.layers)
    else:
      layers = tuple(tuple(one(x) for x in layer) for layer in cache.layers)
    return cache.replace(layers=layers)

  def copy_blocks(self, cache: Cache, src: jax.Array, dst: jax.Array) -> Cache:
    """Every layer with blocks `src` [K] copied to blocks `dst` [K] (copy-on-write: a shared,
    partly filled block a sequence is about to write)."""

    def one(x):
      return constrain(x.at[dst].set(x[src]), POOL_AXES)

    if cache.stacked:
      layers = tuple(jax.vmap(one)(x) for x in cache.layers)
    else:
      layers = tuple(tuple(one(x) for x in layer) for layer in cache.layers)
    return cache.replace(layers=layers)
