"""Ragged paged attention: the definition the kernels are tested against.

The queries of all sequences are concatenated, q [T, Hq, D]: sequence i owns rows
cu_q_lens[i]:cu_q_lens[i+1], its q_len newest tokens, at positions kv_lens[i] - q_len ..
kv_lens[i] - 1. Its keys and values (already in the pool, keys already rotated) are the first
kv_lens[i] tokens of its pages: logical token t lives in page page_indices[i, t // page_size] at
slot t % page_size of k_pages / v_pages [P, KVH, page_size, D]. A query at position p sees the keys
at positions <= p (and > p - sliding_window when a window is set); query head h reads kv head
h // (Hq / KVH). Rows of sequences >= num_seqs[0], and rows past cu_q_lens[num_seqs[0]], are zero,
as is a row that sees no key.

This version walks the sequences one at a time (a Python loop over the static S), each against
all of its gathered pages with full masks: obviously correct and jit-able, O(S * T * context).
Page-table entries past a sequence's pages (or of pages wholly before its window) may be anything:
they are clamped into the pool and everything read through them is masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention_reference(
  q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window=None
):
  """[T, Hq, D] in q's dtype; f32 softmax."""
  t, hq, d = q.shape
  num_pages, kvh, page_size, _ = k_pages.shape
  s, pages_per_seq = page_indices.shape
  g = hq // kvh
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(t, kvh, g, d)
  rows = jnp.arange(t)
  out = jnp.zeros((t, kvh, g, d), jnp.float32)
  for i in range(s):
    kv_len, start, end = kv_lens[i], cu_q_lens[i], cu_q_lens[i + 1]
    live = i < num_seqs[0]
    # Page entries past the sequence's pages may be anything: clamp before gathering (masked below).
    pages = jnp.clip(page_indices[i], 0, num_pages - 1)
    k = k_pages[pages].astype(jnp.float32).transpose(1, 0, 2, 3).reshape(kvh, pages_per_seq * page_size, d)
    v = v_pages[pages].astype(jnp.float32).transpose(1, 0, 2, 3).reshape(kvh, pages_per_seq * page_size, d)
    key_pos = jnp.arange(pages_per_seq * page_size)
    mine = live & (rows >= start) & (rows < end)  # [T]
    q_pos = kv_len - (end - start) + (rows - start)  # [T]
    visible = (key_pos[None, :] <= q_pos[:, None]) & (key_pos[None, :] < kv_len) & mine[:, None]
    if sliding_window is not None:
      visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
    # Garbage (even NaN) in keys nobody sees (past kv_len, pages freed out of the window) stays out.
    v = jnp.where(visible.any(axis=0)[None, :, None], v, 0.0)
    scores = jnp.einsum("tkgd,kcd->tkgc", qf, k, precision=hi) * sm_scale
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    p = jnp.where(visible[:, None, None, :], jnp.exp(scores - top), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("tkgc,kcd->tkgd", p, v, precision=hi) / jnp.where(total > 0, total, 1.0)
    out = jnp.where(mine[:, None, None, None], o, out)
  return out.reshape(t, hq, d).astype(q.dtype)
