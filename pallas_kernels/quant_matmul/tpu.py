"""Pallas TPU (Mosaic) kernel: x [M, K] @ dequant(W), dequantized block by block in VMEM.

Grid (M blocks "parallel", N blocks "parallel", K blocks "arbitrary"); an f32 [bm, bn] VMEM
accumulator lives across the K axis. Each step reads one int8 block of `qvalue` ([bk, bn] storage
rows, so int4 moves half the bytes), unpacks int4 with shifts, applies group scales in f32,
casts to the activation dtype and runs one MXU dot per plane (int4: even and odd K rows).
Per-channel scales are applied once to the accumulator at the last K step.

Edges: M and N edge blocks compute garbage rows/columns that the pipeline never writes back;
a ragged last K block is masked (x columns and weight rows past K set to 0 with a select, so
garbage, even NaN, cannot leak into the sum).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quant_matmul.weights import QuantizedWeight, activation_planes, unpack_int4

# (bm, bn, bk), bk in storage rows of `qvalue` (int4: 2 K rows each). Decode is bandwidth-bound:
# big weight blocks amortize the ~0.35 us per-grid-step overhead (a 1024x512 int8 block is 512 KiB,
# ~0.6 us of HBM time on v5e). Prefill is MXU-bound: the activation block gets taller instead.
# int4 blocks have half the storage rows: the unpacked f32 planes then take the same VMEM.
BLOCK_SIZES = {
    ("decode", 8): (None, 512, 1024),  # bm None: all of M in one block
    ("decode", 4): (None, 512, 512),
    ("prefill", 8): (256, 512, 512),
    ("prefill", 4): (256, 512, 256),
}
DECODE_MAX_M = 256


def choose_blocks(m: int, ks: int, n: int, qw: QuantizedWeight, block_sizes=None) -> tuple[int, int, int]:
  """(bm, bn, bk) obeying Mosaic's rule: the last two block dims divisible by (8, 128) or full."""
  bm, bn, bk = block_sizes or BLOCK_SIZES[("decode" if m <= DECODE_MAX_M else "prefill", qw.bits)]
  bm = m if bm is None or m <= bm else bm
  bn = n if n <= bn else bn
  # bk is x's lane dim (multiple of 128); with group scales, whole groups per block and the
  # scale block's sublane dim (groups per block) a multiple of 8.
  align = 128 if qw.group_size is None else math.lcm(128, 8 * qw.group_rows)
  bk = ks if ks <= max(bk, align) else max(align, bk // align * align)
  return bm, bn, bk


def _kernel(*refs, bits, num_planes, per_channel, group_rows, ks, bk, nk):
  x_refs, (q_ref, s_ref, o_ref, acc_ref) = refs[:num_planes], refs[num_planes:]
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  def accumulate(masked: bool):
    q = q_ref[...]
    planes = unpack_int4(q) if bits == 4 else (q,)
    cdt = x_refs[0].dtype
    if per_channel:
      w = [p.astype(cdt) for p in planes]  # exact: |q| <= 127 fits bf16's mantissa
    else:
      # One scale row per group of `group_rows` rows, broadcast down the sublanes; q * s in f32
      # and then cast, exactly as `dequantize` rounds.
      s = s_ref[...]
      gpb, bn = s.shape
      s_rows = jnp.broadcast_to(s[:, None, :], (gpb, group_rows, bn)).reshape(bk, bn)
      w = [(p.astype(jnp.float32) * s_rows).astype(cdt) for p in planes]
    xs = [r[...] for r in x_refs]
    if masked:
      w_rows = k * bk + jax.lax.broadcasted_iota(jnp.int32, w[0].shape, 0)
      x_cols = k * bk + jax.lax.broadcasted_iota(jnp.int32, xs[0].shape, 1)
      w = [jnp.where(w_rows < ks, p, 0) for p in w]
      xs = [jnp.where(x_cols < ks, xv, 0) for xv in xs]
    precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
    acc = acc_ref[...]
    for xv, wv in zip(xs, w):
      acc += jnp.dot(xv, wv, preferred_element_type=jnp.float32, precision=precision)
    acc_ref[...] = acc

  if ks % bk:  # only the last K block pays for the mask
    pl.when(k < nk - 1)(lambda: accumulate(False))
    pl.when(k == nk - 1)(lambda: accumulate(True))
  else:
    accumulate(False)

  @pl.when(k == nk - 1)
  def _finish():
    acc = acc_ref[...]
    if per_channel:
      acc = acc * s_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes"))
def quant_matmul_tpu(x: jax.Array, qw: QuantizedWeight, *, interpret=False, block_sizes=None) -> jax.Array:
  """x [M, K] @ dequant(qw) [K, N] -> [M, N] in x.dtype. `interpret` as for `pl.pallas_call`."""
  xs = activation_planes(x, qw)
  (m, ks), n = xs[0].shape, qw.out_features
  bm, bn, bk = choose_blocks(m, ks, n, qw, block_sizes)
  nk = pl.cdiv(ks, bk)
  per_channel = qw.group_size is None
  if per_channel:
    s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
  else:
    s_spec = pl.BlockSpec((bk // qw.group_rows, bn), lambda i, j, k: (k, j))
  kernel = functools.partial(_kernel, bits=qw.bits, num_planes=len(xs), per_channel=per_channel,
                             group_rows=qw.group_rows, ks=ks, bk=bk, nk=nk)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), nk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))] * len(xs) + [
          pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
          s_spec,
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="quant_matmul",
  )(*xs, qw.qvalue, qw.scale)
