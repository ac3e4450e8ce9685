"""`ragged_paged_attention`: the public op; picks an implementation by backend and runs it per shard.

  backend  default impl  notes
  tpu      "tpu"         Pallas Mosaic kernel, pages DMA'd from the pool double-buffered (tpu.py)
  gpu      "gpu"         Pallas Triton kernel, a program per (item, kv head) (gpu.py)
  cpu      "xla"         chunked f32 XLA path (xla.py); with interpret=... the "tpu" kernel runs in
                         the Pallas interpreter instead (tests, debugging)

`impl=` forces one of IMPLS ("reference" is the one-sequence-at-a-time definition, reference.py).
Every call validates, then runs through `shard_kernel` split over kv heads (the pool's KVH axis and
the matching groups of query heads; a Mosaic kernel is never partitioned automatically). Inside,
the batch becomes work items (work.py): decode rows (q_len <= decode_q) in blocks of decode_q
rows, longer sequences in blocks of block_q rows, one kernel call per class.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import gpu, tpu, work, xla
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.sharding import shard_kernel

IMPLS = ("tpu", "gpu", "xla", "reference")
_KERNELS = {"tpu": tpu, "gpu": gpu, "xla": xla}
_DIMS = ("thd", "pkcd", "pkcd", "s", "sn", "u", "o")


def default_impl(interpret=False) -> str:
  backend = jax.default_backend()
  if backend in ("tpu", "gpu"):
    return backend
  return "tpu" if interpret else "xla"


def default_block_q(impl: str, group: int) -> int:
  """Prefill query rows per item: the impl's tile of about ROWS query rows (tokens x G heads)."""
  rows = {"tpu": tpu.BLOCK_ROWS, "gpu": gpu.BLOCK_ROWS}.get(impl, 128)
  return 1 << max(0, (rows // group).bit_length() - 1)  # a power of two (Triton tiles)


def _is_int(x, ndim):
  return x.ndim == ndim and jnp.issubdtype(x.dtype, jnp.integer)


def _positive(name, value, allow_none=False):
  if value is None and allow_none:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def _check(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, impl):
  if q.ndim != 3 or not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be floating [T, Hq, D], got {q.dtype}{list(q.shape)}")
  t, hq, d = q.shape
  if k_pages.ndim != 4 or not jnp.issubdtype(k_pages.dtype, jnp.floating):
    raise ValueError(f"k_pages must be floating [P, KVH, page_size, D], got {k_pages.dtype}{list(k_pages.shape)}")
  if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
    raise ValueError(
      f"v_pages must match k_pages ({k_pages.dtype}{list(k_pages.shape)}), got {v_pages.dtype}{list(v_pages.shape)}"
    )
  _, kvh, page_size, kd = k_pages.shape
  if kd != d:
    raise ValueError(f"the pages' head_dim ({kd}) must equal q's ({d})")
  if hq % kvh:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({kvh})")
  if not _is_int(kv_lens, 1):
    raise ValueError(f"kv_lens must be integers [S], got {kv_lens.dtype}{list(kv_lens.shape)}")
  s = kv_lens.shape[0]
  if not _is_int(page_indices, 2) or page_indices.shape[0] != s:
    got = f"{page_indices.dtype}{list(page_indices.shape)}"
    raise ValueError(f"page_indices must be integers [{s}, pages_per_seq], got {got}")
  if not _is_int(cu_q_lens, 1) or cu_q_lens.shape[0] != s + 1:
    raise ValueError(f"cu_q_lens must be integers [{s + 1}] (S + 1), got {cu_q_lens.dtype}{list(cu_q_lens.shape)}")
  if not _is_int(num_seqs, 1) or num_seqs.shape[0] != 1:
    raise ValueError(f"num_seqs must be integers [1], got {num_seqs.dtype}{list(num_seqs.shape)}")
  if impl == "tpu":
    tpu.check_shapes(page_size, d, k_pages.dtype)
  elif impl == "gpu":
    gpu.check_shapes(page_size, d)


def ragged_paged_attention(
  q: jax.Array,
  k_pages: jax.Array,
  v_pages: jax.Array,
  kv_lens: jax.Array,
  page_indices: jax.Array,
  cu_q_lens: jax.Array,
  num_seqs: jax.Array,
  *,
  sm_scale: float | None = None,
  sliding_window: int | None = None,
  impl: str | None = None,
  interpret: Any = False,
  block_q: int | None = None,
  decode_q: int = 1,
  pages_per_block: int | None = None,
  max_prefill_seqs: int | None = None,
  head_axes="tensor",
  mesh=None,
) -> jax.Array:
  """Causal attention of a ragged batch of query tokens over a paged KV cache.

  Args:
    q: [T, Hq, D] floating: every sequence's new tokens' queries, concatenated; sequence i's are
      q[cu_q_lens[i]:cu_q_lens[i+1]], at positions kv_lens[i] - q_len_i .. kv_lens[i] - 1.
    k_pages, v_pages: [P, KVH, page_size, D]: the block pool, the new tokens' keys (rotated) and
      values already written. Hq % KVH == 0 (query head h reads kv head h // (Hq / KVH)).
    kv_lens: int [S]: tokens in each sequence's cache, its new ones included.
    page_indices: int [S, pages_per_seq]: sequence i's logical page j is pool page
      page_indices[i, j]; entries past ceil(kv_lens[i] / page_size) are never read.
    cu_q_lens: int [S + 1], nondecreasing from 0. num_seqs: int [1]: sequences >= num_seqs[0] are
      padding (their rows, and rows past cu_q_lens[num_seqs[0]], come back zero).
    sm_scale: the scores' scale (default D ** -0.5).
    sliding_window: a query at position p sees keys at positions > p - sliding_window (None: all).
      Pages wholly before the window of a sequence's first query are never read (may be freed).
    impl: one of IMPLS; None picks by backend (module docstring).
    interpret: False, True or `pltpu.InterpretParams(...)`: run the Pallas kernel in the interpreter.
    block_q: query rows per prefill item (default from the impl's tile; a power of two for "gpu").
    decode_q: sequences with q_len <= decode_q run as items of decode_q rows (1: plain decode;
      a few for speculative verification).
    pages_per_block: pages per key step ("tpu": one DMA block; "xla": one gathered chunk; "gpu"
      walks one page per step and refuses it). Default from the impl's table.
    max_prefill_seqs: at most this many sequences have q_len > decode_q (the caller's promise: the
      prefill items are sized for it, work.py; None: any number). Prefill sequences past it would
      be left out (their rows zero), so a caller that cannot promise it passes None.
    head_axes: mesh axes the kv heads (and their query heads) may be split over; dropped if they do
      not divide. mesh: default the context mesh (`jax.set_mesh`).
  Returns:
    [T, Hq, D] in q's dtype (f32 accumulation); a row that sees no key is zero, not NaN.
  """
  impl = impl or default_impl(interpret)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  _check(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, impl)
  _positive("sliding_window", sliding_window, allow_none=True)
  _positive("block_q", block_q, allow_none=True)
  _positive("decode_q", decode_q)
  _positive("pages_per_block", pages_per_block, allow_none=True)
  if max_prefill_seqs is not None and (not isinstance(max_prefill_seqs, int) or max_prefill_seqs < 0):
    raise ValueError(f"max_prefill_seqs must be an int >= 0 or None, got {max_prefill_seqs!r}")
  group = q.shape[1] // k_pages.shape[1]
  block_q = block_q or default_block_q(impl, group)
  if impl == "gpu":
    gpu.check_blocks(block_q, decode_q, group, pages_per_block)
  d = q.shape[2]
  sm_scale = float(d**-0.5 if sm_scale is None else sm_scale)
  ints = tuple(jnp.asarray(a).astype(jnp.int32) for a in (kv_lens, page_indices, cu_q_lens, num_seqs))
  static = dict(sm_scale=sm_scale, sliding_window=sliding_window, block_q=block_q, decode_q=decode_q)
  static["pages_per_block"] = pages_per_block
  static["max_prefill_seqs"] = max_prefill_seqs
  head_axes = head_axes if head_axes is None or isinstance(head_axes, str) else tuple(head_axes)
  return _sharded(
    (q, k_pages, v_pages, *ints),
    impl=impl,
    static=tuple(static.items()),
    interpret=interpret,
    head_axes=head_axes,
    mesh=mesh,
  )


@functools.partial(jax.jit, static_argnames=("impl", "static", "interpret", "head_axes", "mesh"))
def _sharded(operands, *, impl, static, interpret, head_axes, mesh):
  local = functools.partial(_local, impl, dict(static), interpret)
  axes = {"h": head_axes, "k": head_axes}
  return shard_kernel(local, *operands, in_dims=_DIMS, out_dims="thd", axes=axes, mesh=mesh)


def _local(impl, static, interpret, q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
  sm_scale, window = static["sm_scale"], static["sliding_window"]
  if impl == "reference":
    return ragged_paged_attention_reference(
      q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale, sliding_window=window
    )
  t, kvh, s = q.shape[0], k_pages.shape[1], kv_lens.shape[0]
  decode_q, block_q = static["decode_q"], static["block_q"]
  n_decode, n_prefill = work.class_sizes(t, s, decode_q, block_q, static["max_prefill_seqs"])
  kw = dict(sm_scale=sm_scale, sliding_window=window, pages_per_block=static["pages_per_block"])
  if impl != "xla":
    kw["interpret"] = interpret
  out = jnp.zeros(q.shape, q.dtype)
  for lo, hi, bq, count in ((0, decode_q, decode_q, n_decode), (decode_q, None, block_q, n_prefill)):
    if count == 0:
      continue
    items = work.make_items(cu_q_lens, num_seqs, t=t, lo=lo, hi=hi, block_q=bq, count=count)
    o = _KERNELS[impl].attend_items(
      work.gather_queries(q, items, kvh), k_pages, v_pages, kv_lens, page_indices, cu_q_lens, items, block_q=bq, **kw
    )
    out = work.scatter_outputs(out, o, items)
  return out
