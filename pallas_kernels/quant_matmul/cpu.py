"""XLA:CPU path: dequantize a cache-sized chunk of K rows to f32, f32 dot, accumulate.

Why: on XLA:CPU a bf16 or int8 matvec runs ~25x slower than f32 (1.3 vs 32 GB/s of weight bytes),
and dequantizing the whole weight first writes and rereads 4 bytes per weight. Here each
`fori_loop` step converts `rows_per_step` storage rows of int8 (a few hundred KiB of f32, so it
stays in L2) and feeds them to the fast f32 dot, so DRAM only sees the 1 (int8) or 0.5 (int4)
bytes per weight. Per-channel scales are applied once to the [M, N] result; a chunk inside one
scale group scales its partial product; a chunk of whole groups scales its weights.

Measured on the 2-core CPU machine: at batch 1 this runs at 0.85-1.2x of the f32 matvec (the
dequantize pass costs about what the 4x fewer weight bytes save); at batch 16 ~2x faster.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant_matmul.weights import QuantizedWeight, activation_planes, plane_scales, unpack_int4

# f32 bytes of one dequantized chunk. Decode (small M) is bandwidth-bound: the chunk should stay in
# L2 (1 MiB/core here; 256 KiB measured best for N=4096 and N=11008). Prefill is FLOP-bound: bigger
# chunks give the f32 GEMM longer K panels.
CHUNK_BYTES = {"decode": 256 * 1024, "prefill": 4 * 1024 * 1024}
DECODE_MAX_M = 4  # at M = 16 a 4 MiB chunk measured 1.8x faster than 256 KiB
# Fewer rows make the per-step overhead dominate (N=11008 int4: 2 rows/step ran 1.3x slower than 8).
MIN_ROWS = 8
LOOPS = 2  # independent loops XLA:CPU may run on two cores; see quant_matmul_cpu


def group_run(qw: QuantizedWeight) -> int | None:
  """Storage rows in a row of one nibble plane that share a scale group (None: per-channel).

  int8: the group. int4: a half tile holds whole groups of `group_size` rows (group <= half
  tile), or a group spans whole tiles and both halves share it (group_size / 2 storage rows).
  """
  g = qw.group_size
  if g is None:
    return None
  if qw.bits == 8 or g <= qw.half_rows:
    return g
  return g // 2


def _whole_groups(rows: int, qw: QuantizedWeight) -> bool:
  """A chunk of whole int4 tiles and whole groups (so `plane_scales` applies)."""
  tiles = qw.bits == 8 or rows % qw.half_rows == 0
  return tiles and (rows * qw.planes) % qw.group_size == 0


def check_rows_per_step(rows: int, qw: QuantizedWeight) -> None:
  """Raises ValueError unless `rows` storage rows per step line up with the scale groups."""
  if not isinstance(rows, int) or rows <= 0:
    raise ValueError(f"rows_per_step must be a positive int, got {rows!r}")
  run = group_run(qw)
  if run is None or run % rows == 0 or _whole_groups(rows, qw):
    return
  tiles = "" if qw.bits == 8 else f" (and of the {qw.half_rows}-row int4 half tile)"
  raise ValueError(
    f"rows_per_step={rows} straddles scale groups: with group_size={qw.group_size} "
    f"(bits={qw.bits}) it must divide {run} storage rows or be a multiple of the group{tiles}"
  )


def chunk_rows(m: int, n: int, qw: QuantizedWeight) -> int:
  """The default storage rows per loop step (valid for `check_rows_per_step`)."""
  target = max(MIN_ROWS, CHUNK_BYTES["decode" if m <= DECODE_MAX_M else "prefill"] // (4 * n * qw.planes))
  run = group_run(qw)
  if run is None:
    return target
  if target <= run:
    return max(d for d in range(1, target + 1) if run % d == 0)
  unit = math.lcm(run, qw.half_rows) if qw.bits == 4 else run
  return max(unit, target // unit * unit)


def _logical_row(row, plane: int, qw: QuantizedWeight):
  """The logical K row of (storage row, plane); `row` may be traced."""
  if qw.bits == 8:
    return row
  h = qw.half_rows
  return (row // h) * 2 * h + plane * h + row % h


@functools.partial(jax.jit, static_argnames=("rows_per_step",))
def quant_matmul_cpu(x: jax.Array, qw: QuantizedWeight, *, rows_per_step: int | None = None) -> jax.Array:
  """x [M, K] @ dequant(qw) -> [M, N] in x.dtype, computed in f32.

  Args:
    rows_per_step: storage rows of `qvalue` per loop step (default `chunk_rows`); with group
      scales it must lie inside a group or cover whole groups (`check_rows_per_step`), else
      ValueError.
  """
  xs = activation_planes(x.astype(jnp.float32), qw)  # [M, Ks] per plane
  q, scale = qw.qvalue, qw.scale
  ks, n = q.shape
  m = x.shape[0]
  per_channel = qw.group_size is None
  if rows_per_step is not None:
    check_rows_per_step(rows_per_step, qw)
  ck = min(ks, rows_per_step or chunk_rows(m, n, qw))

  def step(acc, row0, rows):
    qc = lax.dynamic_slice_in_dim(q, row0, rows, axis=0)
    w = [p.astype(jnp.float32) for p in (unpack_int4(qc) if qw.bits == 4 else (qc,))]
    xc = [lax.dynamic_slice_in_dim(xp, row0, rows, axis=1) for xp in xs]
    # One dot per plane: concatenating the planes into one dot measured 8x slower (the
    # concatenate fusion is not vectorized on XLA:CPU).
    if per_channel:
      return acc + sum(jnp.dot(xp, wp) for xp, wp in zip(xc, w))
    if group_run(qw) % rows == 0:
      # Inside one group per plane: scale each plane's [M, N] partial product, not its [rows, N]
      # weights (a gather of per-row scales measured 2x slower than the whole f32 matvec).
      for p, (xp, wp) in enumerate(zip(xc, w)):
        group = _logical_row(row0, p, qw) // qw.group_size
        acc = acc + jnp.dot(xp, wp) * lax.dynamic_slice_in_dim(scale, group, 1, axis=0)
      return acc
    groups = rows * qw.planes // qw.group_size  # whole tiles and groups: scale each weight row
    s = lax.dynamic_slice_in_dim(scale, row0 * qw.planes // qw.group_size, groups, axis=0)
    w = [wp * sp for wp, sp in zip(w, plane_scales(s, rows, qw))]
    return acc + sum(jnp.dot(xp, wp) for xp, wp in zip(xc, w))

  # Independent loops over disjoint row ranges: XLA:CPU runs independent ops concurrently, while
  # the fusions inside one loop step run on one core (the f32 dot it competes with uses them all).
  steps = ks // ck
  bounds = [steps * i // LOOPS for i in range(LOOPS + 1)]
  acc = jnp.zeros((m, n), jnp.float32)
  parts = [
    lax.fori_loop(lo, hi, lambda i, a: step(a, i * ck, ck), acc) for lo, hi in zip(bounds, bounds[1:]) if hi > lo
  ]
  acc = functools.reduce(jnp.add, parts, acc)
  if ks % ck:  # the ragged tail as one static-size step
    acc = step(acc, steps * ck, ks % ck)
  if per_channel:
    acc = acc * scale
  return acc.astype(x.dtype)
