"""Pallas GPU (Triton) kernel: x [M, K] @ dequant(W) with an in-kernel loop over K, split-K at decode.

Grid (N blocks, M blocks, K splits). Each program owns a [bm, bn] f32 accumulator in registers
and walks its share of K with `fori_loop`, `bk` storage rows of `qvalue` per step (int4: half the
bytes of int8), with masked loads, so ragged M, N and K need no padding of the weight or of x.
A step is cut into sub-blocks of `sub` rows that lie inside one int4 half tile, so each sub-block
meets one contiguous slice of x. Triton blocks are powers of two and `dot` needs every dim >= 16:
M is covered by blocks of at least 16 rows (masked).

Scales: a sub-block inside one group scales its partial product by the group's [1, bn] row (exact:
the int8 values are exact in bf16); a sub-block holding several groups loads a [sub/group, bn]
scale tile, broadcasts it down the rows and dequantizes before its dot. So `bk` does not depend on
the group size. Per-channel scales multiply the accumulator once.

Split-K: at decode a GEMV over N = 1024 (GQA k/v projections) has too few N blocks to fill ~132 SMs,
so K is split until the grid has about `TARGET_PROGRAMS` programs; each split writes an f32
partial [M, N] and XLA sums the partials (deterministic, no atomics).

Compute dtype: bf16 by default for f32 activations (f32 dots at HIGHEST precision would run on
CUDA cores); `compute_dtype=jnp.float32` keeps IEEE f32.

Block sizes (`BLOCK_SIZES`) were chosen with `pallas_kernels.cubin` (registers, spills, shared
memory and occupancy for sm_80 / sm_90, see BENCHMARKS.md); speed is not measured (no GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quant_matmul.weights import QuantizedWeight, unpack_int4, zero_point_offsets

# (shape class, bits) -> (bm, bn, bk, num_warps, num_stages); bk in storage rows of `qvalue`.
# Chosen by compiling candidates to cubin for sm_80 and sm_90 (`python -m jaxeff.bench kernels`,
# BENCHMARKS.md): no spills, registers and shared memory leaving 16-40 warps per SM; not timed.
# Decode (M <= 16) is a bandwidth-bound GEMV: 64-column blocks plus split-K give enough programs;
# 8 warps halve the registers per thread that the unpacked weight tile takes (4 warps: 96-168
# registers, 8-12 warps/SM; 8 warps: 44-94, 16-32), 3 stages keep two 16 KiB weight tiles in
# flight. Prefill tiles like a GEMM; int4's two unpacked int32 planes need a shorter M tile on
# sm_80 (64-row tiles: 248-255 registers, one block per SM).
BLOCK_SIZES = {
  ("decode", 8): (16, 64, 256, 8, 3),
  ("decode", 4): (16, 64, 256, 8, 3),
  ("prefill", 8): (64, 64, 64, 8, 3),
  ("prefill", 4): (32, 64, 64, 4, 3),
}
DECODE_MAX_M = 16
MIN_DOT_DIM = 16
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs


def shape_class(m: int) -> str:
  return "decode" if m <= DECODE_MAX_M else "prefill"


def sub_rows(bk: int, qw: QuantizedWeight) -> int:
  """Rows per sub-block: a power of two dividing bk, inside one int4 half tile, and dividing the
  group (one scale row) or a multiple of it (a scale tile)."""
  sub = bk if qw.bits == 8 else min(bk, qw.half_rows)
  g = qw.group_size  # in logical rows, as are a sub-block's rows in each plane
  if g is not None and g % sub and sub % g:
    sub = min(sub, g & -g)  # the largest power of two dividing the group
  return sub


def choose_blocks(m: int, ks: int, n: int, qw: QuantizedWeight, block_sizes=None):
  """(bm, bn, bk, sub, splits, num_warps, num_stages): powers of two >= 16 (Triton's rules)."""
  bm, bn, bk, warps, stages = block_sizes or BLOCK_SIZES[shape_class(m), qw.bits]
  bm = min(bm, max(MIN_DOT_DIM, pl.next_power_of_2(m)))
  bn = min(bn, max(MIN_DOT_DIM, pl.next_power_of_2(n)))
  bk = min(bk, max(MIN_DOT_DIM, pl.next_power_of_2(ks)))
  sub = sub_rows(bk, qw)
  if sub < MIN_DOT_DIM:
    raise NotImplementedError(
      f"GPU quant_matmul needs sub-blocks of >= {MIN_DOT_DIM} rows; group_size={qw.group_size} with "
      f"bits={qw.bits} (int4 half tile {qw.half_rows}) gives {sub}"
    )
  steps = pl.cdiv(ks, bk)
  splits = 1
  if shape_class(m) == "decode":
    programs = pl.cdiv(n, bn) * pl.cdiv(m, bm)
    want = min(steps, max(1, TARGET_PROGRAMS // programs))
    splits = max(d for d in range(1, want + 1) if steps % d == 0)  # equal shares of K
  return bm, bn, bk, sub, splits, warps, stages


def _kernel(
  x_ref,
  q_ref,
  s_ref,
  *refs,
  bits,
  half_rows,
  group_size,
  m,
  n,
  k,
  ks,
  bm,
  bn,
  bk,
  sub,
  steps_per_split,
  cdt,
  zero_point,
):
  # With a zero point, z_ref holds each scale's offset 2^(bits-1) * scale + minimum (weights.py):
  # a group's dequantized weights are q * s + z.
  z_ref, o_ref = refs if zero_point else (None, refs[0])
  n0, m0, split = pl.program_id(0) * bn, pl.program_id(1) * bm, pl.program_id(2)
  m_ok = (m0 + jnp.arange(bm)) < m
  n_ok = (n0 + jnp.arange(bn)) < n
  precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
  groups_total = s_ref.shape[0]

  def sub_block(r0, carry):
    """Rows [r0, r0 + sub) of qvalue (inside one half tile) into the accumulator (and, per-channel
    with a zero point, x's running row sums)."""
    acc, xsum = carry
    rows_ok = (r0 + jnp.arange(sub)) < ks
    q = plgpu.load(q_ref.at[pl.ds(r0, sub), pl.ds(n0, bn)], mask=rows_ok[:, None] & n_ok[None, :], other=0)
    planes = unpack_int4(q) if bits == 4 else (q,)
    for plane, w in enumerate(planes):
      # Logical K row of the sub-block's first row for this plane (see weights.py's layout).
      c0 = r0 if bits == 8 else (r0 // half_rows) * 2 * half_rows + plane * half_rows + r0 % half_rows
      cols_ok = (c0 + jnp.arange(sub)) < k
      xv = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(c0, sub)], mask=m_ok[:, None] & cols_ok[None, :], other=0).astype(
        cdt
      )
      if group_size is None:
        acc += jnp.dot(xv, w.astype(cdt), preferred_element_type=jnp.float32, precision=precision)
        if zero_point:
          xsum += jnp.sum(xv.astype(jnp.float32), axis=1, keepdims=True)
      elif group_size % sub == 0:  # one group: scale the partial product (+ the group's x sum x offset)
        g0 = c0 // group_size
        g_mask = (g0 < groups_total) & n_ok[None, :]
        s = plgpu.load(s_ref.at[pl.ds(g0, 1), pl.ds(n0, bn)], mask=g_mask, other=0.0)
        acc += jnp.dot(xv, w.astype(cdt), preferred_element_type=jnp.float32, precision=precision) * s
        if zero_point:
          z = plgpu.load(z_ref.at[pl.ds(g0, 1), pl.ds(n0, bn)], mask=g_mask, other=0.0)
          acc += jnp.sum(xv.astype(jnp.float32), axis=1, keepdims=True) * z
      else:  # several groups: dequantize with the scale (and offset) tiles broadcast down their rows
        per = sub // group_size
        g0 = c0 // group_size
        g_mask = ((g0 + jnp.arange(per)) < groups_total)[:, None] & n_ok[None, :]
        tile = lambda ref: jnp.broadcast_to(
          plgpu.load(ref.at[pl.ds(g0, per), pl.ds(n0, bn)], mask=g_mask, other=0.0)[:, None, :], (per, group_size, bn)
        ).reshape(sub, bn)
        wv = w.astype(jnp.float32) * tile(s_ref)
        if zero_point:
          wv = wv + tile(z_ref)
        acc += jnp.dot(xv, wv.astype(cdt), preferred_element_type=jnp.float32, precision=precision)
    return acc, xsum

  def step(i, carry):
    k0 = (split * steps_per_split + i) * bk
    for j in range(bk // sub):
      carry = sub_block(k0 + j * sub, carry)
    return carry

  init = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, 1), jnp.float32))
  acc, xsum = jax.lax.fori_loop(0, steps_per_split, step, init)
  if group_size is None:
    acc = acc * plgpu.load(s_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], mask=n_ok[None, :], other=0.0)
    if zero_point:
      acc += xsum * plgpu.load(z_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], mask=n_ok[None, :], other=0.0)
  row0 = split * m + m0  # split partials are stacked along M
  plgpu.store(o_ref.at[pl.ds(row0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=m_ok[:, None] & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "compute_dtype", "out_dtype"))
def quant_matmul_gpu(
  x: jax.Array, qw: QuantizedWeight, *, interpret=False, block_sizes=None, compute_dtype=None, out_dtype=None
) -> jax.Array:
  """x [M, K] @ dequant(qw) [K, N] -> [M, N] in `out_dtype` (default x.dtype).

  Args:
    interpret: as for `pl.pallas_call`.
    block_sizes: (bm, bn, bk, num_warps, num_stages) instead of the table (bk in storage rows).
    compute_dtype: the dot's input dtype (default x.dtype); accumulation is f32.
  """
  cdt = jnp.dtype(compute_dtype or x.dtype)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  (m, k), (ks, n) = x.shape, qw.qvalue.shape
  bm, bn, bk, sub, splits, warps, stages = choose_blocks(m, ks, n, qw, block_sizes)
  steps_per_split = pl.cdiv(ks, bk) // splits  # splits divides the steps
  kernel = functools.partial(
    _kernel,
    bits=qw.bits,
    half_rows=qw.half_rows,
    group_size=qw.group_size,
    m=m,
    n=n,
    k=k,
    ks=ks,
    bm=bm,
    bn=bn,
    bk=bk,
    sub=sub,
    steps_per_split=steps_per_split,
    cdt=cdt,
    zero_point=qw.zero_point,
  )
  operands = (x, qw.qvalue, qw.scale) + ((zero_point_offsets(qw),) if qw.zero_point else ())
  partial_dtype = jnp.float32 if splits > 1 else out_dtype
  y = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((splits * m, n), partial_dtype),
    grid=(pl.cdiv(n, bn), pl.cdiv(m, bm), splits),
    compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    interpret=interpret,
    name="quant_matmul",
  )(*operands)
  if splits > 1:
    y = y.reshape(splits, m, n).sum(axis=0).astype(out_dtype)
  return y
