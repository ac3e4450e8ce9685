"""Pallas TPU (Mosaic) kernel: ragged paged attention, pages DMA'd from the pool double-buffered.

Grid (kv head "parallel", work item "arbitrary"); a work item (work.py) is block_q query rows of
one sequence, tiled as [block_q * G, D] (the G query heads of the kv head together, token-major),
so a decode item is G rows, not a padded prefill block. Scalar-prefetched into SMEM: the items'
sequence, chunk and row count, kv_lens, cu_q_lens and the page table (flattened: a 2-D SMEM array
pads its minor dimension). The pools stay in HBM (`memory_space=pl.ANY`); the kernel walks its
item's key blocks (`pages_per_block` pages each) in a `fori_loop` bounded by what the item sees
(from the window start to its last row's position), copying each block's pages with
`make_async_copy` into one of two VMEM slots: block j+1's copies start before block j is waited on
and computed (double buffering), and an item's last step starts the next item's first block (only
the first item of each kv head waits for its first copy; so the items axis is sequential). Pages
wholly outside the keys the item sees are never copied (past the sequence's pages the table may
hold anything; before the window a cache may have freed them), so the slot keeps stale data there:
scores are masked with `where` (never added) and values outside the item's keys zeroed, so stale
or NaN data cannot leak. Running max / sum (lane-replicated [R, 128], as splash attention keeps
them) and the f32 accumulator are VMEM scratch; the item's output block is written once at the end
(zero for rows that saw nothing).

Why an in-kernel loop and not a grid axis over key blocks: grid steps cost ~0.35 us each even when
skipped, and a grid axis must be as long as the longest sequence for every item, so a batch of
short decode rows next to one long prompt would pay for the prompt's length S times over.

Block sizes: `BLOCK_ROWS` query rows per prefill item (block_q = BLOCK_ROWS / G tokens) and
`KV_BLOCK_TOKENS` keys per step (pages_per_block = KV_BLOCK_TOKENS / page_size). Mosaic needs
page_size a multiple of the dtype's sublane tile (8 rows f32, 16 bf16) so a slot's pages merge
into one [pages * page_size, D] tile for the dot. Not checkable without a TPU: the final compile,
VMEM use, whether 1-page DMAs (page_size x D: 4 KiB at 16 x 128 bf16) keep HBM busy, speed. The
whole page table sits in SMEM (S x pages_per_seq int32): 256 sequences of 2048 pages is 2 MiB,
past SMEM's ~1 MiB; such tables need a per-item slice (not done).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention.work import Items, query_span

LANES = 128
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASK_VALUE - m) is 0, never NaN
BLOCK_ROWS = 256  # query rows (tokens x G) of a prefill item
KV_BLOCK_TOKENS = 256  # keys per step
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def sublanes(dtype) -> int:
  return 8 * 4 // jnp.dtype(dtype).itemsize


def check_shapes(page_size: int, head_dim: int, dtype) -> None:
  if page_size % sublanes(dtype):
    raise ValueError(
      f"TPU ragged_paged_attention needs page_size a multiple of {sublanes(dtype)} for {jnp.dtype(dtype).name} pages "
      f"(whole sublane tiles), got {page_size}"
    )


def choose_pages_per_block(page_size: int, pages_per_seq: int, pages_per_block: int | None = None) -> int:
  ppb = pages_per_block or max(1, KV_BLOCK_TOKENS // page_size)
  return min(ppb, pages_per_seq)


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _kernel(
  seq_ref,
  chunk_ref,
  rows_ref,
  kv_lens_ref,
  cu_ref,
  pages_ref,
  q_ref,
  k_hbm,
  v_hbm,
  o_ref,
  k_buf,
  v_buf,
  sems,
  m_ref,
  l_ref,
  acc_ref,
  *,
  block_q,
  group,
  ppb,
  pages_per_seq,
  sm_scale,
  window,
):
  h, i, n = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
  page = k_buf.shape[2]
  bt = ppb * page
  r_tile, d = q_ref.shape

  def span(item):
    """(seq, position of row 0, first key, end of keys, first key block, key blocks) of an item."""
    seq, rows = seq_ref[item], rows_ref[item]
    kv_len = kv_lens_ref[seq]
    q_first, first, end = query_span(kv_len, cu_ref[seq + 1] - cu_ref[seq], chunk_ref[item], rows, block_q, window)
    first_block = lax.div(first, bt)
    return seq, q_first, first, end, first_block, jnp.where(end > first, lax.div(end + bt - 1, bt) - first_block, 0)

  here = span(i)
  seq, q_first, first, end, first_block, blocks = here
  kv_len, rows = kv_lens_ref[seq], rows_ref[i]

  def copies(item_span, block, slot):
    """(condition, K copy, V copy) for each page of an item's `block` into `slot`; pages wholly
    outside [first, end) are skipped (past the sequence's pages, or slid out of the window: a cache
    may have freed them)."""
    seq_, _, first_, end_, _, _ = item_span
    out = []
    for p in range(ppb):
      logical = block * ppb + p
      pid = pages_ref[seq_ * pages_per_seq + jnp.minimum(logical, pages_per_seq - 1)]
      out.append(
        (
          (logical * page < end_) & ((logical + 1) * page > first_),
          pltpu.make_async_copy(k_hbm.at[pid, h], k_buf.at[slot, p], sems.at[0, slot]),
          pltpu.make_async_copy(v_hbm.at[pid, h], v_buf.at[slot, p], sems.at[1, slot]),
        )
      )
    return out

  def start(item_span, block, slot):
    for needed, k_copy, v_copy in copies(item_span, block, slot):

      @pl.when(needed)
      def _():
        k_copy.start()
        v_copy.start()

  def wait(item_span, block, slot):
    for needed, k_copy, v_copy in copies(item_span, block, slot):

      @pl.when(needed)
      def _():
        k_copy.wait()
        v_copy.wait()

  m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((i == 0) & (blocks > 0))
  def _():
    start(here, first_block, 0)  # later items' first blocks were started by the item before

  row = lax.div(lax.broadcasted_iota(jnp.int32, (r_tile, 1), 0), group)  # the tile row's token
  q_pos = q_first + row
  live_row = row < rows

  def body(j, carry):
    block, slot = first_block + j, lax.rem(j, 2)

    @pl.when(j + 1 < blocks)
    def _():
      start(here, block + 1, 1 - slot)  # in flight while this block computes

    wait(here, block, slot)
    cdt = q_ref.dtype
    k = k_buf[slot].reshape(bt, d).astype(cdt)
    v = v_buf[slot].reshape(bt, d)
    key_pos = block * bt + lax.broadcasted_iota(jnp.int32, (1, bt), 1)
    visible = live_row & (key_pos <= q_pos) & (key_pos < kv_len)
    if window is not None:
      visible &= key_pos > q_pos - window
    s = _dot(q_ref[...], k, NT) * sm_scale
    s = jnp.where(visible, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    # A row with nothing visible yet has m_next == MASK_VALUE: its masked exps would be 1.
    p = jnp.where(visible, jnp.exp(s - m_next[:, :1]), 0.0)
    l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
    m_ref[...] = m_next
    key_col = block * bt + lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    seen = (key_col >= first) & (key_col < end)
    v = jnp.where(seen, v, jnp.zeros_like(v)).astype(cdt)  # p is 0 elsewhere, but 0 * NaN is not
    acc_ref[...] = alpha[:, :1] * acc_ref[...] + _dot(p.astype(cdt), v, (((1,), (0,)), ((), ())))
    return carry

  lax.fori_loop(0, blocks, body, 0)
  # Both slots are free now: start the next item's first block (same kv head: items run in order).
  after = span(jnp.minimum(i + 1, n - 1))

  @pl.when((i + 1 < n) & (after[5] > 0))
  def _():
    start(after, after[4], 0)

  l = l_ref[:, :1]
  o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def attend_items(
  q_items,
  k_pages,
  v_pages,
  kv_lens,
  page_indices,
  cu_q_lens,
  items: Items,
  *,
  block_q,
  sm_scale,
  sliding_window,
  pages_per_block=None,
  interpret=False,
):
  """q_items [KVH, n, block_q * G, D] -> [KVH, n, block_q * G, D] in q's dtype (work.py's layout)."""
  kvh, n, r, d = q_items.shape
  _, _, page, _ = k_pages.shape
  s, pages_per_seq = page_indices.shape
  ppb = choose_pages_per_block(page, pages_per_seq, pages_per_block)
  kernel = functools.partial(
    _kernel,
    block_q=block_q,
    group=r // block_q,
    ppb=ppb,
    pages_per_seq=pages_per_seq,
    sm_scale=float(sm_scale),
    window=sliding_window,
  )
  tile = pl.BlockSpec((None, None, r, d), lambda h, i, *_: (h, i, 0, 0))
  pool = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=6,
      grid=(kvh, n),
      in_specs=[tile, pool, pool],
      out_specs=tile,
      scratch_shapes=[
        pltpu.VMEM((2, ppb, page, d), k_pages.dtype),
        pltpu.VMEM((2, ppb, page, d), v_pages.dtype),
        pltpu.SemaphoreType.DMA((2, 2)),
        pltpu.VMEM((r, LANES), jnp.float32),
        pltpu.VMEM((r, LANES), jnp.float32),
        pltpu.VMEM((r, d), jnp.float32),
      ],
    ),
    out_shape=jax.ShapeDtypeStruct(q_items.shape, q_items.dtype),
    # Items "arbitrary": each starts its successor's first copy, so one core runs a head's items in order.
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    interpret=interpret,
    name="ragged_paged_attention",
  )(items.seq, items.chunk, items.rows, kv_lens, cu_q_lens, page_indices.reshape(-1), q_items, k_pages, v_pages)
