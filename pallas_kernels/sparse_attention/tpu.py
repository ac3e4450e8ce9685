"""Pallas TPU (Mosaic) kernels: forward, dq and dk/dv, driven by scalar-prefetched block lists.

Forward and dq: grid (batch, kv head, query block, list entry), the last axis "arbitrary". One
program step holds the q block of all G query heads of a kv head ([G, bq, d]), so a key block is
loaded once per group (NSA's shared selection) and each of the G heads runs its own dots against
it. The k/v index_map reads the entry's key block id from SMEM; padding entries repeat the last
id, so the pipeline issues no DMA for them, and `pl.when(j < count)` skips their compute. Blocks
marked full skip the per-token mask. m, l and the accumulator live in VMEM scratch; m and l are
lane-replicated [bq, 128] tiles (the layout splash attention uses).

dk/dv: grid (batch, kv head, transposed entry): the (key block, query block) pairs sorted by key
block, flattened into one list (block_lists.py), so the grid has exactly as many steps as the
forward plus one per key block, whatever the mask (sinks or top-k make a key block visible to
every query block; a rectangular [nk, nq] grid would then cost nk * nq steps). dk/dv accumulate in
VMEM from a run's first entry and are written at its last.

Mask value: a finite -0.7 * f32 max; a row that sees nothing so far has m == MASK_VALUE, its
stale sums are wiped by the exp(m_prev - m_next) = 0 rescale once a visible key arrives, and a
row that never sees one is written as zeros (log-sum-exp DEAD_LSE so backward gets p = 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention.block_lists import (
  DEAD_LSE,
  FLAG_BITS,
  FULL,
  MASK_VALUE,
  SELECTED,
  T_FIRST,
  T_FLAG_BITS,
  T_FULL,
  T_LAST,
  T_SELECTED,
  T_VALID,
  BlockSizes,
  list_offset,
  token_visible,
)

LANES, SUBLANES = 128, 8
# bq query positions x G heads per step; bk = 128 keys (NSA-size selection blocks, one MXU tile
# wide). Per-step overhead is ~0.35 us, so larger bq amortizes it when G is small. Not tuned on
# hardware (no TPU on the development machines).
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=128, block_kv=128)
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _expand(x, n: int):
  """A lane-replicated [rows, 128] tile as [rows, n]."""
  if n == LANES:
    return x
  if n < LANES:
    return x[:, :n]
  return jnp.tile(x, (1, n // LANES))


def _dot(a, b, dims=None):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _scores(q, k, scale, vis):
  """q @ k.T * scale in f32, masked where `vis` is False (vis None: a full block, no mask)."""
  s = _dot(q, k, NT) * scale
  return s if vis is None else jnp.where(vis, s, MASK_VALUE)


def _visible(pb, qpos_ref, kvpos_ref, kb, selected):
  """[bq, bk] token mask of the current block (shared by the G heads)."""
  bk = pb.block_kv
  q_pos = _expand(qpos_ref[...], bk)
  kv_pos = kvpos_ref[:1, :]
  sel = jnp.broadcast_to(selected, (1, bk))
  vis = token_visible(pb.mask, q_pos, kv_pos, sel)
  if pb.seq_kv % bk:  # the last key block is partly padding
    key = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    vis = jnp.logical_and(vis, key < pb.seq_kv)
  return vis


def _positions(q_pos, kv_pos):
  """q positions lane-replicated [Bq, S, 128]; kv positions sublane-replicated [Bk, 8, T]."""
  q_lanes = jnp.broadcast_to(q_pos[:, :, None], (*q_pos.shape, LANES))
  kv_sub = jnp.broadcast_to(kv_pos[:, None, :], (kv_pos.shape[0], SUBLANES, kv_pos.shape[1]))
  return q_lanes, kv_sub


def _sink_input(sink, h):
  # A [8, H] f32 tile in SMEM (sublane-aligned, as splash attention passes its sinks).
  return jnp.broadcast_to(sink.astype(jnp.float32)[None, :], (SUBLANES, h))


# ------------------------------------------------------------------------------------ forward


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
  groups,
  head_dim,
  list_index,
  count_index,
  num_entries,
  has_sink,
):
  if has_sink:
    sink_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  else:
    sink_ref, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = None, refs
  b, g, i, j = (pl.program_id(a) for a in range(4))
  bk, scale = pb.block_kv, head_dim**-0.5

  @pl.when(j == 0)
  def _init():
    for h in range(groups):
      if has_sink:
        m_ref[h] = jnp.full(m_ref.shape[1:], sink_ref[0, g * groups + h], jnp.float32)
        l_ref[h] = jnp.ones(l_ref.shape[1:], jnp.float32)
      else:
        m_ref[h] = jnp.full(m_ref.shape[1:], MASK_VALUE, jnp.float32)
        l_ref[h] = jnp.zeros(l_ref.shape[1:], jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  entry = ids_ref[list_index(b, g, i, j)]
  kb = entry >> FLAG_BITS
  live = j < counts_ref[count_index(b, g, i)]

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    vis = _visible(pb, qpos_ref, kvpos_ref, kb, (entry & SELECTED) != 0) if masked else None
    for h in range(groups):
      s = _scores(q_ref[h], k, scale, vis)
      m_prev, l_prev = m_ref[h], l_ref[h]
      m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
      p = jnp.exp(s - _expand(m_next, bk))
      alpha = jnp.exp(m_prev - m_next)
      l_ref[h] = alpha * l_prev + p.sum(axis=-1, keepdims=True)
      m_ref[h] = m_next
      acc_ref[h] = _expand(alpha, head_dim) * acc_ref[h] + _dot(p.astype(v.dtype), v)

  pl.when(jnp.logical_and(live, (entry & FULL) != 0))(lambda: step(False))
  pl.when(jnp.logical_and(live, (entry & FULL) == 0))(lambda: step(True))

  @pl.when(j == num_entries - 1)
  def _finish():
    for h in range(groups):
      m, l = m_ref[h], l_ref[h]
      dead = m == MASK_VALUE  # nothing visible (and no sink logit)
      l_safe = jnp.where(dead, 1.0, l)
      o = acc_ref[h] / _expand(l_safe, head_dim)
      o_ref[h] = jnp.where(_expand(dead, head_dim), 0.0, o).astype(o_ref.dtype)
      lse_ref[h] = jnp.where(dead, DEAD_LSE, m + jnp.log(l_safe))


def forward(pb, q, k, v, sink, q_pos, kv_pos, lists):
  """(out [B, H, S', D], lse [B, H, S'] f32) on padded inputs."""
  b, h, s, d = q.shape
  kvh = k.shape[1]
  bq, bk, groups = pb.block_q, pb.block_kv, pb.groups
  nq, maxb = s // bq, lists.ids.shape[-1]
  lb, lg = lists.ids.shape[:2]
  list_index = list_offset(lb, lg, nq, maxb)
  count_index = list_offset(lb, lg, nq)
  pbq, pbk = q_pos.shape[0] > 1, kv_pos.shape[0] > 1
  q_lanes, kv_sub = _positions(q_pos, kv_pos)

  def kv_map(b_, g_, i, j, ids, counts):
    return b_, g_, ids[list_index(b_, g_, i, j)] >> FLAG_BITS, 0

  def kvpos_map(b_, g_, i, j, ids, counts):
    return (b_ if pbk else 0), 0, ids[list_index(b_, g_, i, j)] >> FLAG_BITS

  q_block = pl.BlockSpec((None, groups, bq, d), lambda b_, g_, i, j, *_: (b_, g_, i, 0))
  in_specs = [
    q_block,
    pl.BlockSpec((None, None, bk, d), kv_map),
    pl.BlockSpec((None, None, bk, d), kv_map),
    pl.BlockSpec((None, bq, LANES), lambda b_, g_, i, j, *_: ((b_ if pbq else 0), i, 0)),
    pl.BlockSpec((None, SUBLANES, bk), kvpos_map),
  ]
  args = [q, k, v, q_lanes, kv_sub]
  if sink is not None:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(_sink_input(sink, h))
  row_block = pl.BlockSpec((None, groups, bq, LANES), lambda b_, g_, i, j, *_: (b_, g_, i, 0))
  kernel = functools.partial(
    _fwd_kernel,
    pb=pb,
    groups=groups,
    head_dim=d,
    list_index=list_index,
    count_index=count_index,
    num_entries=maxb,
    has_sink=sink is not None,
  )
  out, lse = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kvh, nq, maxb),
      in_specs=in_specs,
      out_specs=[q_block, row_block],
      scratch_shapes=[
        pltpu.VMEM((groups, bq, LANES), jnp.float32),
        pltpu.VMEM((groups, bq, LANES), jnp.float32),
        pltpu.VMEM((groups, bq, d), jnp.float32),
      ],
    ),
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s, LANES), jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    interpret=pb.interpret,
    name="sparse_attention_fwd",
  )(lists.ids.reshape(-1), lists.counts.reshape(-1), *args)
  return out, lse[..., 0]


# ------------------------------------------------------------------------------------ backward


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
  acc_ref,
  *,
  pb,
  groups,
  head_dim,
  list_index,
  count_index,
  num_entries,
):
  b, g, i, j = (pl.program_id(a) for a in range(4))
  bk, scale = pb.block_kv, head_dim**-0.5

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  entry = ids_ref[list_index(b, g, i, j)]
  kb = entry >> FLAG_BITS
  live = j < counts_ref[count_index(b, g, i)]

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    vis = _visible(pb, qpos_ref, kvpos_ref, kb, (entry & SELECTED) != 0) if masked else None
    for h in range(groups):
      s = _scores(q_ref[h], k, scale, vis)
      p = jnp.exp(s - _expand(lse_ref[h], bk))
      dp = _dot(do_ref[h], v, NT)
      ds = p * (dp - _expand(delta_ref[h], bk)) * scale
      acc_ref[h] += _dot(ds.astype(k.dtype), k)

  pl.when(jnp.logical_and(live, (entry & FULL) != 0))(lambda: step(False))
  pl.when(jnp.logical_and(live, (entry & FULL) == 0))(lambda: step(True))

  @pl.when(j == num_entries - 1)
  def _finish():
    dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(
  tkv_ref,
  tinfo_ref,
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
  dk_acc,
  dv_acc,
  *,
  pb,
  groups,
  head_dim,
  list_index,
):
  b, g, p_ = (pl.program_id(a) for a in range(3))
  bk, scale = pb.block_kv, head_dim**-0.5
  info = tinfo_ref[list_index(b, g, p_)]
  kb = tkv_ref[list_index(b, g, p_)]

  @pl.when((info & T_FIRST) != 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked: bool):
    k, v = k_ref[...], v_ref[...]
    vis = _visible(pb, qpos_ref, kvpos_ref, kb, (info & T_SELECTED) != 0) if masked else None
    for h in range(groups):
      q, do = q_ref[h], do_ref[h]
      s = _scores(q, k, scale, vis)
      p = jnp.exp(s - _expand(lse_ref[h], bk))
      dv_acc[...] += _dot(p.T.astype(do.dtype), do)
      dp = _dot(do, v, NT)
      ds = p * (dp - _expand(delta_ref[h], bk)) * scale
      dk_acc[...] += _dot(ds.T.astype(q.dtype), q)

  valid = (info & T_VALID) != 0
  pl.when(jnp.logical_and(valid, (info & T_FULL) != 0))(lambda: step(False))
  pl.when(jnp.logical_and(valid, (info & T_FULL) == 0))(lambda: step(True))

  @pl.when((info & T_LAST) != 0)
  def _finish():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(pb, q, k, v, sink, q_pos, kv_pos, lists, out, lse, d_out, delta):
  """(dq, dk, dv) on padded inputs; lse and delta are [B, H, S'] f32."""
  del sink, out
  b, h, s, d = q.shape
  kvh = k.shape[1]
  bq, bk, groups = pb.block_q, pb.block_kv, pb.groups
  nq, maxb = s // bq, lists.ids.shape[-1]
  lb, lg = lists.ids.shape[:2]
  pbq, pbk = q_pos.shape[0] > 1, kv_pos.shape[0] > 1
  q_lanes, kv_sub = _positions(q_pos, kv_pos)
  lse_lanes = jnp.broadcast_to(lse[..., None], (*lse.shape, LANES))
  delta_lanes = jnp.broadcast_to(delta[..., None], (*delta.shape, LANES))
  semantics = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dq: the forward's lists and grid.
  list_index = list_offset(lb, lg, nq, maxb)
  count_index = list_offset(lb, lg, nq)

  def kv_map(b_, g_, i, j, ids, counts):
    return b_, g_, ids[list_index(b_, g_, i, j)] >> FLAG_BITS, 0

  def kvpos_map(b_, g_, i, j, ids, counts):
    return (b_ if pbk else 0), 0, ids[list_index(b_, g_, i, j)] >> FLAG_BITS

  q_block = pl.BlockSpec((None, groups, bq, d), lambda b_, g_, i, j, *_: (b_, g_, i, 0))
  row_block = pl.BlockSpec((None, groups, bq, LANES), lambda b_, g_, i, j, *_: (b_, g_, i, 0))
  dq = pl.pallas_call(
    functools.partial(
      _dq_kernel, pb=pb, groups=groups, head_dim=d, list_index=list_index, count_index=count_index, num_entries=maxb
    ),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kvh, nq, maxb),
      in_specs=[
        q_block,
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, bq, LANES), lambda b_, g_, i, j, *_: ((b_ if pbq else 0), i, 0)),
        pl.BlockSpec((None, SUBLANES, bk), kvpos_map),
        row_block,
        row_block,
        q_block,
      ],
      out_specs=q_block,
      scratch_shapes=[pltpu.VMEM((groups, bq, d), jnp.float32)],
    ),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=semantics,
    interpret=pb.interpret,
    name="sparse_attention_dq",
  )(lists.ids.reshape(-1), lists.counts.reshape(-1), q, k, v, q_lanes, kv_sub, lse_lanes, delta_lanes, d_out)

  # dk / dv: the transposed pairs, one grid step each.
  num_pairs = lists.t_kv.shape[-1]
  t_index = list_offset(lb, lg, num_pairs)

  def tq_map(b_, g_, p_, tkv, tinfo):
    return b_, g_, tinfo[t_index(b_, g_, p_)] >> T_FLAG_BITS, 0

  def tkv_map(b_, g_, p_, tkv, tinfo):
    return b_, g_, tkv[t_index(b_, g_, p_)], 0

  def tqpos_map(b_, g_, p_, tkv, tinfo):
    return (b_ if pbq else 0), tinfo[t_index(b_, g_, p_)] >> T_FLAG_BITS, 0

  def tkvpos_map(b_, g_, p_, tkv, tinfo):
    return (b_ if pbk else 0), 0, tkv[t_index(b_, g_, p_)]

  tq_block = pl.BlockSpec((None, groups, bq, d), tq_map)
  trow_block = pl.BlockSpec((None, groups, bq, LANES), tq_map)
  tkv_block = pl.BlockSpec((None, None, bk, d), tkv_map)
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, pb=pb, groups=groups, head_dim=d, list_index=t_index),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kvh, num_pairs),
      in_specs=[
        tq_block,
        tkv_block,
        tkv_block,
        pl.BlockSpec((None, bq, LANES), tqpos_map),
        pl.BlockSpec((None, SUBLANES, bk), tkvpos_map),
        trow_block,
        trow_block,
        tq_block,
      ],
      out_specs=[tkv_block, tkv_block],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
    ),
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=pb.interpret,
    name="sparse_attention_dkv",
  )(lists.t_kv.reshape(-1), lists.t_info.reshape(-1), q, k, v, q_lanes, kv_sub, lse_lanes, delta_lanes, d_out)
  return dq, dk, dv
