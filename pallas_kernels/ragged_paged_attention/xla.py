"""XLA path (CPU): online softmax over key chunks, each gathered from the pool for every item at once.

Runs over the work items of work.py. A `fori_loop` walks key chunks of `pages_per_block` pages up to
the most any item needs (a decode batch of short sequences costs only what they hold); step j
gathers, for every item, the pages of its chunk first_block + j straight from the pool (page ids
clamped into the pool: entries past a sequence's pages may be anything and are masked), lays them
out as [KVH, items, keys, D] (one plain batched matmul), scores them in f32 against the item's G x
block_q rows and folds them into f32 running max / sum / accumulator. Nothing is ever as large as a
whole context per token: a step holds items x chunk keys, the chunk sized from `CHUNK_ELEMENTS`.
Keys past a row's position, before its window, or past kv_len are masked in the scores; values
outside the item's keys are zeroed, so garbage (even NaN) in the pool (past a sequence's pages, or
in pages that slid out of its window and were freed) cannot leak. Dots in f32: XLA:CPU's bf16
matmuls are far slower (/work/shared/notes/kernels.md).

Measured on the 2-core CPU box (f32, 3 kv heads x GQA 3, D 64, 16-token pages): 16 decode rows at
1024 cached tokens 6.2 ms (the reference: 30 ms); 8 such rows plus a 512-token prompt 19 ms (355
ms). Chunks of 256K f32 keys per step beat 64K (7.4 / 37 ms) and 1M (12 / 24 ms).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.ragged_paged_attention.work import Items, query_span

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
CHUNK_ELEMENTS = 1 << 18  # f32 keys of one step across the items and kv heads (1 MiB: measured best of 64K-1M)


def choose_pages_per_block(items: int, kv_heads: int, page_size: int, head_dim: int, pages_per_seq: int) -> int:
  return max(1, min(pages_per_seq, CHUNK_ELEMENTS // (items * kv_heads * page_size * head_dim)))


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
):
  """q_items [KVH, n, block_q * G, D] -> f32 [KVH, n, block_q * G, D] (work.py's layout)."""
  kvh, n, r, d = q_items.shape
  num_pages, _, page, _ = k_pages.shape
  pps = page_indices.shape[1]
  g = r // block_q
  ppb = pages_per_block or choose_pages_per_block(n, kvh, page, d, pps)
  c = ppb * page
  kv_len = kv_lens[items.seq]
  q_len = cu_q_lens[items.seq + 1] - cu_q_lens[items.seq]
  q_first, first, end = query_span(kv_len, q_len, items.chunk, items.rows, block_q, sliding_window)
  first_block = first // c
  blocks = jnp.where(end > first, (end + c - 1) // c - first_block, 0)
  row = jnp.arange(r) // g  # token of each tile row
  q_pos = q_first[:, None] + row[None, :]  # [n, R]
  live_row = row[None, :] < items.rows[:, None]
  qf = q_items.astype(jnp.float32) * sm_scale
  hi = lax.Precision.HIGHEST

  def step(j, carry):
    m_prev, l_prev, acc = carry
    block = first_block + j
    logical = block[:, None] * ppb + jnp.arange(ppb)[None, :]  # [n, ppb]
    ids = jnp.clip(page_indices[items.seq[:, None], jnp.minimum(logical, pps - 1)], 0, num_pages - 1)
    key_pos = (block[:, None] * c + jnp.arange(c)[None, :]).reshape(n, 1, c)
    visible = live_row[:, :, None] & (key_pos <= q_pos[:, :, None]) & (key_pos < kv_len[:, None, None])
    if sliding_window is not None:
      visible &= key_pos > q_pos[:, :, None] - sliding_window
    visible &= (j < blocks)[:, None, None]
    # [n, ppb, KVH, page, D] -> [KVH, n, keys, D]: batch dims leading, one plain batched matmul.
    k = k_pages[ids].astype(jnp.float32).transpose(2, 0, 1, 3, 4).reshape(kvh, n, c, d)
    s = jnp.einsum("knrd,kncd->knrc", qf, k, precision=hi)
    s = jnp.where(visible[None], s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp(m_prev - m_next)
    # A row with nothing visible yet has m_next == MASK_VALUE: its masked exps would be 1.
    p = jnp.where(visible[None], jnp.exp(s - m_next[..., None]), 0.0)
    v = v_pages[ids].astype(jnp.float32).transpose(2, 0, 1, 3, 4).reshape(kvh, n, c, d)
    seen = (key_pos >= first[:, None, None]) & (key_pos < end[:, None, None])
    v = jnp.where(seen.reshape(1, n, c, 1), v, 0.0)
    pv = jnp.einsum("knrc,kncd->knrd", p, v, precision=hi)
    return m_next, alpha * l_prev + p.sum(axis=-1), alpha[..., None] * acc + pv

  init = (
    jnp.full((kvh, n, r), MASK_VALUE, jnp.float32),
    jnp.zeros((kvh, n, r), jnp.float32),
    jnp.zeros((kvh, n, r, d), jnp.float32),
  )
  _, l, acc = lax.fori_loop(0, jnp.max(blocks, initial=0), step, init)
  return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
