"""Pallas GPU (Triton) kernel: ragged paged attention, a program per (work item, kv head, key split).

A work item (work.py) is block_q query rows of one sequence, tiled as [block_q * G, D] (the G query
heads of the kv head together, token-major), padded with zero rows to a power of two >= 16 (Triton
tiles; `dot` needs every dim >= 16). The program reads its item's sequence, chunk and row count, the
sequence's kv_len and q_len, then walks its share of the pages the item sees (from the first one its
window reaches to the one holding its last row's position) in a `fori_loop`, one page per step: the
page id comes from the (flattened) page table, the page's [page_size, D] keys and values are loaded
from the pool, and an f32 online softmax folds them in. Pages past the item's last needed key, or
wholly before its window, are never read (their table entries may be anything); keys past a row's
position, before its window or past kv_len are masked in the scores with `where`, values outside the
item's keys are zeroed (garbage, even NaN, cannot leak). f32 queries use IEEE dots (HIGHEST); other
dtypes feed the dots as they are.

Flash-decoding: items x KVH programs alone leave most SMs idle at small batches (one 8-kv-head
sequence is 8 programs on 132 SMs), so each item's pages are split over up to `splits` programs
until the grid has about `TARGET_PROGRAMS`; each writes its normalized f32 output and log-sum-exp
and `combine` merges them in jnp (an empty split has lse -inf and weight 0). A row that saw nothing
is zero.

Tables: `BLOCK_ROWS` query rows per prefill item, `NUM_WARPS` / `NUM_STAGES` (cubin: see
tests/test_cubin.py and BENCHMARKS.md). page_size and head_dim must be powers of two >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention.work import Items, query_span

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_DOT_DIM = 16
BLOCK_ROWS = 64  # query rows (tokens x G) of a prefill item
NUM_WARPS, NUM_STAGES = 4, 2
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def check_shapes(page_size: int, head_dim: int) -> None:
  for name, n in (("page_size", page_size), ("head_dim", head_dim)):
    if not _pow2(n) or n < MIN_DOT_DIM:
      raise ValueError(
        f"GPU ragged_paged_attention needs {name} a power of two >= {MIN_DOT_DIM} (Triton tiles), got {n}"
      )


def check_blocks(block_q: int, decode_q: int, group: int, pages_per_block: int | None) -> None:
  if pages_per_block is not None:
    raise ValueError("GPU ragged_paged_attention walks one page per step: pages_per_block must be None")


def tile_rows(block_q: int, group: int) -> int:
  return max(MIN_DOT_DIM, _next_pow2(block_q * group))


def num_splits(items: int, kv_heads: int, pages_per_seq: int) -> int:
  return max(1, min(pages_per_seq, -(-TARGET_PROGRAMS // (items * kv_heads))))


def combine(out, lse):
  """Merge per-split (out [.., S, R, D], lse [.., S, R]) into out [.., R, D] (0 where nothing was seen)."""
  top = jnp.max(lse, axis=-2)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top[..., None, :])  # 0 for empty splits
  total = w.sum(axis=-2)
  return (out * w[..., None]).sum(axis=-3) / jnp.where(total > 0, total, 1.0)[..., None]


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
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  *,
  block_q,
  group,
  pages_per_seq,
  splits,
  sm_scale,
  window,
):
  i, split = pl.program_id(0), pl.program_id(2)
  page, d = k_ref.shape[1], k_ref.shape[2]
  r_tile = q_ref.shape[0]
  seq, rows = seq_ref[i], rows_ref[i]
  kv_len = kv_lens_ref[seq]
  q_first, first, end = query_span(kv_len, cu_ref[seq + 1] - cu_ref[seq], chunk_ref[i], rows, block_q, window)
  first_page = lax.div(first, page)
  end_page = jnp.where(end > first, lax.div(end + page - 1, page), first_page)
  per_split = lax.div(end_page - first_page + splits - 1, splits)
  first_page, end_page = first_page + split * per_split, jnp.minimum(end_page, first_page + (split + 1) * per_split)
  row = jnp.arange(r_tile) // group  # the tile row's token
  q_pos = (q_first + row)[:, None]
  live_row = (row < rows)[:, None]
  q = q_ref[...]
  cdt = q.dtype

  def step(j, carry):
    acc, m_prev, l_prev = carry
    pid = pages_ref[seq * pages_per_seq + j]
    k = k_ref[pid, :, :].astype(cdt)
    key_pos = j * page + jnp.arange(page)
    visible = live_row & (key_pos[None, :] <= q_pos) & (key_pos[None, :] < kv_len)
    if window is not None:
      visible &= key_pos[None, :] > q_pos - window
    s = jnp.where(visible, _dot(q, k, NT) * sm_scale, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp(m_prev - m_next)
    # A row with nothing visible yet has m_next == MASK_VALUE: its masked exps would be 1.
    p = jnp.where(visible, jnp.exp(s - m_next[:, None]), 0.0)
    v = v_ref[pid, :, :]
    seen = (key_pos >= first) & (key_pos < end)
    v = jnp.where(seen[:, None], v, jnp.zeros_like(v)).astype(cdt)  # p is 0 elsewhere, but 0 * NaN is not
    acc = alpha[:, None] * acc + _dot(p.astype(cdt), v, (((1,), (0,)), ((), ())))
    return acc, m_next, alpha * l_prev + p.sum(axis=-1)

  init = (
    jnp.zeros((r_tile, d), jnp.float32),
    jnp.full((r_tile,), MASK_VALUE, jnp.float32),
    jnp.zeros((r_tile,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(first_page, end_page, step, init)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


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
  splits=None,
  interpret=False,
):
  """q_items [KVH, n, block_q * G, D] -> [KVH, n, block_q * G, D] in q's dtype (work.py's layout).

  `splits`: programs an item's pages are split over (default from `TARGET_PROGRAMS`)."""
  kvh, n, r, d = q_items.shape
  num_pages, _, page, _ = k_pages.shape
  pages_per_seq = page_indices.shape[1]
  rp = tile_rows(block_q, r // block_q)
  splits = splits or num_splits(n, kvh, pages_per_seq)
  q_items = jnp.pad(q_items, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
  kernel = functools.partial(
    _kernel,
    block_q=block_q,
    group=r // block_q,
    pages_per_seq=pages_per_seq,
    splits=splits,
    sm_scale=float(sm_scale),
    window=sliding_window,
  )
  meta = (items.seq, items.chunk, items.rows, kv_lens, cu_q_lens, page_indices.reshape(-1))
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, h, s: (0,) * a.ndim)
  tile = pl.BlockSpec((None, None, rp, d), lambda i, h, s: (h, i, 0, 0))
  pool = pl.BlockSpec((num_pages, None, page, d), lambda i, h, s: (0, h, 0, 0))
  # One split writes the output in q's dtype; several write f32 parts for `combine`.
  out_dtype = q_items.dtype if splits == 1 else jnp.float32
  out, lse = pl.pallas_call(
    kernel,
    grid=(n, kvh, splits),
    in_specs=[whole(a) for a in meta] + [tile, pool, pool],
    out_specs=[
      pl.BlockSpec((None, None, None, rp, d), lambda i, h, s: (h, i, s, 0, 0)),
      pl.BlockSpec((None, None, None, rp), lambda i, h, s: (h, i, s, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((kvh, n, splits, rp, d), out_dtype),
      jax.ShapeDtypeStruct((kvh, n, splits, rp), jnp.float32),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    interpret=interpret,
    name="ragged_paged_attention",
  )(*meta, q_items, k_pages, v_pages)
  out = out[:, :, 0] if splits == 1 else combine(out, lse).astype(q_items.dtype)
  return out[:, :, :r]
