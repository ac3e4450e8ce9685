"""Pallas GPU (Triton) kernels: forward, dq and dk/dv walking the block lists in-kernel.

Forward and dq: grid (query block, batch, query head); the program keeps its q block in
registers and runs `fori_loop(0, count)` over its list, loading each listed key block with a
dynamic slice of the whole K/V (only listed blocks are ever read). dk/dv: grid (key block, batch,
kv head); the program loops over the query blocks of its transposed list (start/count per key
block) and, inside, over the G query heads of the group, so dk/dv of a kv head accumulate in
registers without atomics. Online softmax in f32 with the finite mask value (see tpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sparse_attention.block_lists import (
  DEAD_LSE,
  FLAG_BITS,
  MASK_VALUE,
  SELECTED,
  T_FLAG_BITS,
  T_SELECTED,
  BlockSizes,
  list_offset,
  token_visible,
)

# Chosen by compiling the kernels with triton 3.8.0 for sm_80 and sm_90 at head dim 128, bf16
# (ptxas: no register spills, shared memory within sm_80's 163 KB): 8 warps keep the forward at
# 174 / 128 registers (4 warps: 255); the dk/dv kernel spills on sm_80 with 2 pipeline stages and
# none with 1. See BENCHMARKS.md. Not timed on hardware (no GPU on the development machines).
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=64, block_kv=64, num_warps=8, num_stages=2, block_q_dkv=32, num_stages_dkv=1)
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims=None):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = dims or (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _visible(pb, q_pos, kv_pos, kb, selected):
  """[bq, bk] token mask: q_pos [bq], kv_pos [bk] of key block kb."""
  bk = pb.block_kv
  vis = token_visible(pb.mask, q_pos[:, None], kv_pos[None, :], selected)
  if pb.seq_kv % bk:
    vis = jnp.logical_and(vis, (kb * bk + jnp.arange(bk))[None, :] < pb.seq_kv)
  return vis


def _listed_block(pb, entry, k_ref, v_ref, kvpos_ref, kv_row, q, q_pos, scale):
  """(k, v, masked scores q @ k.T * scale) of the key block a list entry names."""
  bk = pb.block_kv
  kb = entry >> FLAG_BITS
  keys = pl.ds(kb * bk, bk)
  k, v = k_ref[keys, :], v_ref[keys, :]
  vis = _visible(pb, q_pos, kvpos_ref[kv_row, keys], kb, (entry & SELECTED) != 0)
  return k, v, jnp.where(vis, _dot(q, k, NT) * scale, MASK_VALUE)


def _fwd_kernel(
  ids_ref,
  counts_ref,
  q_ref,
  k_ref,
  v_ref,
  qpos_ref,
  kvpos_ref,
  *refs,
  pb,
  head_dim,
  groups,
  list_index,
  count_index,
  has_sink,
  qpos_batched,
  kvpos_batched,
):
  if has_sink:
    sink_ref, o_ref, lse_ref = refs
  else:
    sink_ref, (o_ref, lse_ref) = None, refs
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g = h // groups
  bq, scale = pb.block_q, head_dim**-0.5
  q = q_ref[...]
  q_pos = qpos_ref[(b if qpos_batched else 0), pl.ds(i * bq, bq)]
  kv_row = b if kvpos_batched else 0

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k, v, s = _listed_block(pb, ids_ref[list_index(b, g, i, j)], k_ref, v_ref, kvpos_ref, kv_row, q, q_pos, scale)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    p = jnp.exp(s - m_next[:, None])
    alpha = jnp.exp(m_prev - m_next)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, alpha * l_prev + p.sum(axis=-1)

  if has_sink:
    m0, l0 = jnp.full((bq,), sink_ref[h], jnp.float32), jnp.ones((bq,), jnp.float32)
  else:
    m0, l0 = jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32)
  acc0 = jnp.zeros((bq, head_dim), jnp.float32)
  acc, m, l = lax.fori_loop(0, counts_ref[count_index(b, g, i)], body, (acc0, m0, l0))
  dead = m == MASK_VALUE
  l_safe = jnp.where(dead, 1.0, l)
  o_ref[...] = jnp.where(dead[:, None], 0.0, acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(dead, DEAD_LSE, m + jnp.log(l_safe))


def _params(pb, stages=None):
  return plgpu.CompilerParams(num_warps=pb.num_warps, num_stages=stages or pb.num_stages)


def _whole(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def forward(pb, q, k, v, sink, q_pos, kv_pos, lists):
  b, h, s, d = q.shape
  t = k.shape[2]
  bq, groups = pb.block_q, pb.groups
  nq, maxb = s // bq, lists.ids.shape[-1]
  lb, lg = lists.ids.shape[:2]
  kernel = functools.partial(
    _fwd_kernel,
    pb=pb,
    head_dim=d,
    groups=groups,
    list_index=list_offset(lb, lg, nq, maxb),
    count_index=list_offset(lb, lg, nq),
    has_sink=sink is not None,
    qpos_batched=q_pos.shape[0] > 1,
    kvpos_batched=kv_pos.shape[0] > 1,
  )
  ids, counts = lists.ids.reshape(-1), lists.counts.reshape(-1)
  kv_spec = pl.BlockSpec((None, None, t, d), lambda i, b_, h_: (b_, h_ // groups, 0, 0))
  in_specs = [
    _whole(ids.shape),
    _whole(counts.shape),
    pl.BlockSpec((None, None, bq, d), lambda i, b_, h_: (b_, h_, i, 0)),
    kv_spec,
    kv_spec,
    _whole(q_pos.shape),
    _whole(kv_pos.shape),
  ]
  args = [ids, counts, q, k, v, q_pos, kv_pos]
  if sink is not None:
    in_specs.append(_whole((h,)))
    args.append(sink.astype(jnp.float32))
  out, lse = pl.pallas_call(
    kernel,
    grid=(nq, b, h),
    in_specs=in_specs,
    out_specs=[
      pl.BlockSpec((None, None, bq, d), lambda i, b_, h_: (b_, h_, i, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
    ],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
    compiler_params=_params(pb),
    interpret=pb.interpret,
    name="sparse_attention_fwd",
  )(*args)
  return out, lse


def _dq_kernel(
  ids_ref,
  counts_ref,
  q_ref,
  k_ref,
  v_ref,
  qpos_ref,
  kvpos_ref,
  lse_ref,
  delta_ref,
  do_ref,
  dq_ref,
  *,
  pb,
  head_dim,
  groups,
  list_index,
  count_index,
  qpos_batched,
  kvpos_batched,
):
  i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  g = h // groups
  bq, scale = pb.block_q, head_dim**-0.5
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = qpos_ref[(b if qpos_batched else 0), pl.ds(i * bq, bq)]
  kv_row = b if kvpos_batched else 0

  def body(j, acc):
    k, v, s = _listed_block(pb, ids_ref[list_index(b, g, i, j)], k_ref, v_ref, kvpos_ref, kv_row, q, q_pos, scale)
    p = jnp.exp(s - lse[:, None])
    ds = p * (_dot(do, v, NT) - delta[:, None]) * scale
    return acc + _dot(ds.astype(k.dtype), k)

  acc = lax.fori_loop(0, counts_ref[count_index(b, g, i)], body, jnp.zeros((bq, head_dim), jnp.float32))
  dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(
  tinfo_ref,
  tstart_ref,
  tcount_ref,
  q_ref,
  k_ref,
  v_ref,
  qpos_ref,
  kvpos_ref,
  lse_ref,
  delta_ref,
  do_ref,
  dk_ref,
  dv_ref,
  *,
  pb,
  head_dim,
  groups,
  pair_index,
  kv_index,
  qpos_batched,
  kvpos_batched,
):
  kb, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bq, bk, scale = pb.block_q, pb.block_kv, head_dim**-0.5
  kv_pos = kvpos_ref[(b if kvpos_batched else 0), pl.ds(kb * bk, bk)]
  q_row = b if qpos_batched else 0
  start = tstart_ref[kv_index(b, g, kb)]

  sub = pb.block_q_dkv or bq

  def body(n, carry):
    info = tinfo_ref[pair_index(b, g, start + n)]
    qb = info >> T_FLAG_BITS
    selected = (info & T_SELECTED) != 0

    def chunk(c, carry):  # the query block in chunks of `sub` rows ...
      rows = pl.ds(qb * bq + c * sub, sub)
      vis = _visible(pb, qpos_ref[q_row, rows], kv_pos, kb, selected)

      def head(hh, carry):  # ... each for the G query heads of the group
        dk, dv = carry
        h = g * groups + hh
        q, do = q_ref[h, rows, :], do_ref[h, rows, :]
        k, v = k_ref[...], v_ref[...]  # re-read (cache-resident) rather than held: fewer registers
        s = jnp.where(vis, _dot(q, k, NT) * scale, MASK_VALUE)
        p = jnp.exp(s - lse_ref[h, rows][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, TN)
        ds = p * (_dot(do, v, NT) - delta_ref[h, rows][:, None]) * scale
        return dk + _dot(ds.astype(q.dtype), q, TN), dv

      return lax.fori_loop(0, groups, head, carry)

    return lax.fori_loop(0, bq // sub, chunk, carry)

  zeros = jnp.zeros((bk, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(0, tcount_ref[kv_index(b, g, kb)], body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(pb, q, k, v, sink, q_pos, kv_pos, lists, out, lse, d_out, delta):
  del sink, out
  b, h, s, d = q.shape
  kvh, t = k.shape[1], k.shape[2]
  bq, bk, groups = pb.block_q, pb.block_kv, pb.groups
  nq, nk, maxb = s // bq, t // bk, lists.ids.shape[-1]
  lb, lg = lists.ids.shape[:2]
  batched = dict(qpos_batched=q_pos.shape[0] > 1, kvpos_batched=kv_pos.shape[0] > 1)
  ids, counts = lists.ids.reshape(-1), lists.counts.reshape(-1)
  kv_spec = pl.BlockSpec((None, None, t, d), lambda i, b_, h_: (b_, h_ // groups, 0, 0))
  q_spec = pl.BlockSpec((None, None, bq, d), lambda i, b_, h_: (b_, h_, i, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))
  dq = pl.pallas_call(
    functools.partial(
      _dq_kernel,
      pb=pb,
      head_dim=d,
      groups=groups,
      list_index=list_offset(lb, lg, nq, maxb),
      count_index=list_offset(lb, lg, nq),
      **batched,
    ),
    grid=(nq, b, h),
    in_specs=[
      _whole(ids.shape),
      _whole(counts.shape),
      q_spec,
      kv_spec,
      kv_spec,
      _whole(q_pos.shape),
      _whole(kv_pos.shape),
      row_spec,
      row_spec,
      q_spec,
    ],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(pb),
    interpret=pb.interpret,
    name="sparse_attention_dq",
  )(ids, counts, q, k, v, q_pos, kv_pos, lse, delta, d_out)

  tinfo, tstart, tcount = (x.reshape(-1) for x in (lists.t_info, lists.t_start, lists.t_count))
  group_rows = pl.BlockSpec((None, h, s, d), lambda kb, b_, g_: (b_, 0, 0, 0))
  group_vec = pl.BlockSpec((None, h, s), lambda kb, b_, g_: (b_, 0, 0))
  kv_block = pl.BlockSpec((None, None, bk, d), lambda kb, b_, g_: (b_, g_, kb, 0))
  dk, dv = pl.pallas_call(
    functools.partial(
      _dkv_kernel,
      pb=pb,
      head_dim=d,
      groups=groups,
      pair_index=list_offset(lb, lg, lists.t_info.shape[-1]),
      kv_index=list_offset(lb, lg, nk),
      **batched,
    ),
    grid=(nk, b, kvh),
    in_specs=[
      _whole(tinfo.shape),
      _whole(tstart.shape),
      _whole(tcount.shape),
      group_rows,
      kv_block,
      kv_block,
      _whole(q_pos.shape),
      _whole(kv_pos.shape),
      group_vec,
      group_vec,
      group_rows,
    ],
    out_specs=[kv_block, kv_block],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_params(pb, pb.num_stages_dkv),
    interpret=pb.interpret,
    name="sparse_attention_dkv",
  )(tinfo, tstart, tcount, q, k, v, q_pos, kv_pos, lse, delta, d_out)
  return dq, dk, dv
