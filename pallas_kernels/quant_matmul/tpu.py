"""Pallas TPU (Mosaic) kernel: x [M, K] @ dequant(W), dequantized block by block in VMEM.

Grid (M blocks "parallel", N blocks "parallel", K blocks "arbitrary"); an f32 [bm, bn] VMEM
accumulator lives across the K axis. A K block is `bk` storage rows of `qvalue` (int4: whole
tiles, so the matching x block is the contiguous 2 * bk columns).

Inside a step the block is cut into segments, each inside one int4 half tile (or <= 512 int8
rows) and one scale group. Each segment's int8 values (int4: nibbles unpacked with shifts) are
cast to the compute dtype, exact for |q| <= 127, and meet their slice of x in one MXU dot; the
partial products of a group are summed and multiplied by the group's [1, bn] scale row. Scales
reach the kernel as [groups, 1, N] (a free reshape of the stored [groups, N]), so the scale
block's last two dims are (1, bn) for any number of groups per block. Per-channel scales multiply
the accumulator once, at the last K step. No [bk, bn] f32 weight temporary is ever formed.

Block sizes come from `BLOCK_SIZES`, keyed by shape class: decode (M <= 256: all of M in one
block, bandwidth-bound) moves MiB-sized weight blocks, all of K per step where it fits, so the
~0.35 us per-step overhead stays small; prefill is MXU-bound. `vmem_limit_bytes` is set from the
chosen blocks (`vmem_bytes`).

Edges: M and N edge blocks compute garbage rows/columns that the pipeline never writes back; a
ragged last K block masks the x columns and weight rows past K with a select (garbage, even NaN,
cannot leak into the sum), and skips segments wholly past K.

Not verifiable without a TPU: speed, and whether Mosaic's layout passes accept every slice (the
lowering tests run on CPU, Mosaic's layout passes run only in the TPU compiler). x slices are
whole 128-lane vregs except for groups smaller than 128 and int4 weights whose K gives half tiles
shorter than 128 (static 16-64-lane slices); each such dot is also shallower than the MXU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quant_matmul.weights import QuantizedWeight, unpack_int4, zero_point_offsets

DECODE_MAX_M = 256
# (shape class, scaling) -> (bm, bn, weight bytes per step). bm None: all of M in one block.
# Decode: JAX's tuned quantized-matmul tables use ~2 MiB+ weight blocks (e.g. (128, 512, 4096) for
# 4096x4096 int8: all of K at once); 4 MiB lets 14336-deep K take two steps. Grouped weights keep
# 2 MiB: their steps hold more (smaller) dots. Prefill: M rows reuse each weight block.
BLOCK_SIZES = {
  ("decode", "per-channel"): (None, 512, 4 << 20),
  ("decode", "grouped"): (None, 512, 2 << 20),
  ("prefill", "per-channel"): (256, 512, 1 << 20),
  ("prefill", "grouped"): (256, 512, 1 << 20),
}
SEGMENT_ROWS = 512  # int8 storage rows per dot: bounds one dot's int32 / compute-dtype temporaries
MAX_DOTS_PER_STEP = 64  # a step's dots are unrolled: bounds code size for small groups
VMEM_LIMITS = (16 << 20, 64 << 20)  # the default scoped limit .. v7x's 64 MiB of VMEM per core


def shape_class(m: int, qw: QuantizedWeight) -> tuple[str, str]:
  return ("decode" if m <= DECODE_MAX_M else "prefill", "per-channel" if qw.group_size is None else "grouped")


def segments(bk: int, qw: QuantizedWeight) -> list[tuple[int | None, list[tuple[int, int, int, int]]]]:
  """A K block's dots, grouped by scale group: [(group in block or None, [(plane, row0, col0, rows)])].

  row0 indexes the block's storage rows, col0 its x columns (logical rows); blocks start on a tile
  and group boundary, so this depends on `bk` and the weight's layout only.
  """
  if qw.bits == 8:
    pieces = [(0, r, r, min(SEGMENT_ROWS, bk - r)) for r in range(0, bk, SEGMENT_ROWS)]
  else:
    h = qw.half_rows
    pieces = [(p, t * h, 2 * h * t + p * h, h) for t in range(bk // h) for p in (0, 1)]
  if qw.group_size is None:
    return [(None, pieces)]
  g = qw.group_size
  out: list[tuple[int | None, list]] = []
  for plane, row0, col0, rows in pieces:
    c = col0
    while c < col0 + rows:  # cut at group boundaries
      end = min(col0 + rows, (c // g + 1) * g)
      piece = (plane, row0 + c - col0, c, end - c)
      if out and out[-1][0] == c // g:
        out[-1][1].append(piece)
      else:
        out.append((c // g, [piece]))
      c = end
  return out


def vmem_bytes(bm: int, bn: int, bk: int, qw: QuantizedWeight, compute_dtype, out_dtype) -> int:
  """VMEM the kernel needs: double-buffered blocks, the accumulator and one segment's temporaries."""
  cb, ob = jnp.dtype(compute_dtype).itemsize, jnp.dtype(out_dtype).itemsize
  rows = max(bm, 16)  # sublane padding of small M blocks
  groups = 1 if qw.group_size is None else max(1, bk * qw.planes // qw.group_size)
  x = rows * qw.planes * bk * cb
  q = bk * bn
  s = groups * 8 * bn * 4  # a [groups, 1, bn] block pads the unit dim to 8 sublanes
  o = rows * bn * ob
  seg = min(bk, SEGMENT_ROWS if qw.bits == 8 else qw.half_rows)
  temporaries = seg * bn * (4 + 4 + cb) + 2 * rows * bn * 4  # int32 + select + cast; partial + dot
  if qw.zero_point:  # offsets blocks like the scales, and the per-channel x-sum scratch
    s, temporaries = 2 * s, temporaries + rows * 128 * 4
  return 2 * (x + q + s + o) + rows * bn * 4 + temporaries


def _k_alignment(qw: QuantizedWeight) -> int:
  """bk (storage rows) must be a multiple of this unless it is all of K."""
  align = math.lcm(128 // qw.planes, 32)  # x lanes a multiple of 128; int8 sublane tiles of 32
  if qw.bits == 4:
    align = math.lcm(align, qw.half_rows)
  if qw.group_size is not None:
    align = math.lcm(align, max(1, qw.group_size // qw.planes))
  return align


def _rows_per_dot(qw: QuantizedWeight) -> int:
  """Storage rows one of `segments`' dots covers (the last one of a block may cover fewer)."""
  if qw.bits == 8:
    return min(qw.group_size or SEGMENT_ROWS, SEGMENT_ROWS)
  return min(qw.half_rows, qw.group_size or qw.half_rows) // 2  # two planes per storage row


def choose_blocks(
  m: int, ks: int, n: int, qw: QuantizedWeight, block_sizes=None, compute_dtype=jnp.bfloat16, out_dtype=jnp.float32
) -> tuple[int, int, int, int]:
  """(bm, bn, bk, vmem_limit_bytes) from the table, obeying Mosaic's (8, 128) block rule.

  `block_sizes` overrides the table entry: (bm, bn, bk) with bk in storage rows (tests use small
  blocks to get many grid steps).
  """
  align = _k_alignment(qw)
  if block_sizes is not None:
    bm, bn, bk = block_sizes
    bm = m if bm is None or m <= bm else bm
    bn = n if n <= bn else bn
    bk = ks if ks <= max(bk, align) else max(align, bk // align * align)
  else:
    kind = shape_class(m, qw)[0]
    bm, bn, budget = BLOCK_SIZES[shape_class(m, qw)]
    bm = m if bm is None or m <= bm else bm
    bn = n if n <= bn else bn
    # All of K if it fits the budget (bytes and unrolled dots), else the largest aligned divisor
    # of K that does, else the largest aligned size (a ragged, masked last block).
    limit = max(align, min(budget // bn, MAX_DOTS_PER_STEP * _rows_per_dot(qw)))
    fits = [d for d in range(align, min(limit, ks) + 1, align) if ks % d == 0]
    bk = ks if ks <= limit else fits[-1] if fits else limit // align * align
    if kind == "decode" and bk == ks:  # spend the rest of the budget on wider N blocks
      while bn * 2 <= n // 2 and n % (bn * 2) == 0 and ks * bn * 2 <= budget:
        bn *= 2
  need = vmem_bytes(bm, bn, bk, qw, compute_dtype, out_dtype)
  while need > VMEM_LIMITS[1] and bk > align:
    bk = max(align, bk // 2 // align * align)
    need = vmem_bytes(bm, bn, bk, qw, compute_dtype, out_dtype)
  if need > VMEM_LIMITS[1]:
    raise ValueError(
      f"quant_matmul TPU blocks ({bm}, {bn}, {bk}) need {need >> 20} MiB of VMEM "
      f"(limit {VMEM_LIMITS[1] >> 20} MiB); pass smaller block_sizes"
    )
  return bm, bn, bk, min(VMEM_LIMITS[1], max(VMEM_LIMITS[0], int(need * 1.25) + (2 << 20)))


def _kernel(x_ref, q_ref, s_ref, *refs, bits, blocks, per_channel, ks, bk, nk, cdt, zero_point):
  # With a zero point, z_ref holds each scale's offset 2^(bits-1) * scale + minimum (weights.py):
  # a group contributes part * s + (its x row sums) * z; per-channel, x's row sums over all of K
  # accumulate in xsum_ref (lane-broadcast) and meet z at the last step.
  if zero_point:
    z_ref, o_ref, acc_ref, xsum_ref = refs
  else:
    (o_ref, acc_ref), z_ref, xsum_ref = refs, None, None
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if xsum_ref is not None:
      xsum_ref[...] = jnp.zeros_like(xsum_ref)

  def accumulate(valid_rows: int):
    planes_of = {}  # storage rows -> unpacked planes, shared by a tile's two halves

    def weights(plane, row0, rows):
      if (row0, rows) not in planes_of:
        q = q_ref[row0 : row0 + rows, :]
        planes_of[row0, rows] = unpack_int4(q) if bits == 4 else (q,)
      return planes_of[row0, rows][plane].astype(cdt)

    acc = acc_ref[...]
    xsum_all = None
    for group, pieces in blocks:
      part = xsum = None
      for plane, row0, col0, rows in pieces:
        if row0 >= valid_rows:
          continue  # wholly past K (ragged last block)
        w, xv = weights(plane, row0, rows), x_ref[:, col0 : col0 + rows]
        if row0 + rows > valid_rows:  # straddles K's end: zero both sides of the garbage
          w = jnp.where(jax.lax.broadcasted_iota(jnp.int32, w.shape, 0) < valid_rows - row0, w, 0)
          xv = jnp.where(jax.lax.broadcasted_iota(jnp.int32, xv.shape, 1) < valid_rows - row0, xv, 0)
        precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None
        d = jnp.dot(xv, w, preferred_element_type=jnp.float32, precision=precision)
        part = d if part is None else part + d
        if zero_point:
          r = jnp.sum(xv.astype(jnp.float32), axis=1, keepdims=True)
          xsum = r if xsum is None else xsum + r
      if part is not None:
        acc += part if per_channel else part * s_ref[group]
        if zero_point and not per_channel:
          acc += xsum * z_ref[group]
        elif zero_point:
          xsum_all = xsum if xsum_all is None else xsum_all + xsum
    acc_ref[...] = acc
    if xsum_all is not None:
      xsum_ref[...] += jnp.broadcast_to(xsum_all, xsum_ref.shape)

  tail = ks - (nk - 1) * bk
  if tail != bk:  # only the last K block pays for the masks
    pl.when(k < nk - 1)(lambda: accumulate(bk))
    pl.when(k == nk - 1)(lambda: accumulate(tail))
  else:
    accumulate(bk)

  @pl.when(k == nk - 1)
  def _finish():
    acc = acc_ref[...]
    if per_channel:
      acc = acc * s_ref[...]
      if zero_point:
        acc += xsum_ref[:, :1] * z_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "compute_dtype", "out_dtype"))
def quant_matmul_tpu(
  x: jax.Array, qw: QuantizedWeight, *, interpret=False, block_sizes=None, compute_dtype=None, out_dtype=None
) -> jax.Array:
  """x [M, K] @ dequant(qw) [K, N] -> [M, N] in `out_dtype` (default x.dtype).

  Args:
    interpret: as for `pl.pallas_call` (True, or `pltpu.InterpretParams(...)` for the simulator).
    block_sizes: (bm, bn, bk) instead of the table (bk in storage rows of `qvalue`).
    compute_dtype: the dot's input dtype (default x.dtype); accumulation is f32.
  """
  cdt = jnp.dtype(compute_dtype or x.dtype)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  kp, (ks, n), m = qw.padded_in_features, qw.qvalue.shape, x.shape[0]
  x = jnp.pad(x.astype(cdt), ((0, 0), (0, kp - x.shape[1])))
  bm, bn, bk, vmem_limit = choose_blocks(m, ks, n, qw, block_sizes, cdt, out_dtype)
  nk = pl.cdiv(ks, bk)
  per_channel = qw.group_size is None
  if per_channel:
    as_blocks = lambda a: a
    s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
  else:
    as_blocks = lambda a: a.reshape(a.shape[0], 1, n)
    s_spec = pl.BlockSpec((bk * qw.planes // qw.group_size, 1, bn), lambda i, j, k: (k, 0, j))
  operands = [x, qw.qvalue, as_blocks(qw.scale)]
  in_specs = [
    pl.BlockSpec((bm, bk * qw.planes), lambda i, j, k: (i, k)),
    pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
    s_spec,
  ]
  scratch = [pltpu.VMEM((bm, bn), jnp.float32)]
  if qw.zero_point:  # offsets ride along with the scales, same blocks
    operands.append(as_blocks(zero_point_offsets(qw)))
    in_specs.append(s_spec)
    scratch.append(pltpu.VMEM((bm, 128), jnp.float32))
  kernel = functools.partial(
    _kernel,
    bits=qw.bits,
    blocks=segments(bk, qw),
    per_channel=per_channel,
    ks=ks,
    bk=bk,
    nk=nk,
    cdt=cdt,
    zero_point=qw.zero_point,
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
    grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), nk),
    in_specs=in_specs,
    out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
    scratch_shapes=scratch,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem_limit
    ),
    interpret=interpret,
    name="quant_matmul",
  )(*operands)
