"""XLA:CPU path: dequantize a cache-sized chunk of K rows to f32, f32 dot, accumulate.

Why: on XLA:CPU a bf16 or int8 matvec runs ~25x slower than f32 (1.3 vs 32 GB/s of weight bytes),
and dequantizing the whole weight first writes and rereads 4 bytes per weight. Here each
`fori_loop` step converts `chunk_rows` rows of int8 (a few hundred KiB of f32, so it stays in L2)
and feeds them to the fast f32 dot, so DRAM only sees the 1 (int8) or 0.5 (int4) bytes per weight.
Per-channel scales are applied once to the [M, N] result; group scales while dequantizing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant_matmul.weights import QuantizedWeight, activation_planes, unpack_int4

# f32 bytes of one dequantized chunk. Decode (small M) is bandwidth-bound: the chunk should stay in
# L2 (1 MiB/core here; 256 KiB measured best for N=4096 and N=11008). Prefill is FLOP-bound: bigger
# chunks give the f32 GEMM longer K panels.
CHUNK_BYTES = {"decode": 256 * 1024, "prefill": 4 * 1024 * 1024}
DECODE_MAX_M = 4  # at M = 16 a 4 MiB chunk measured 1.8x faster than 256 KiB
# Fewer rows make the per-step overhead dominate (N=11008 int4: 2 rows/step ran 1.3x slower than 8).
MIN_ROWS = 8
LOOPS = 2  # independent loops XLA:CPU may run on two cores; see quant_matmul_cpu


def chunk_rows(m: int, n: int, qw: QuantizedWeight) -> int:
  """Storage rows of `qvalue` per loop step; with group scales, a divisor or multiple of a group."""
  planes = 8 // qw.bits
  target = max(MIN_ROWS, CHUNK_BYTES["decode" if m <= DECODE_MAX_M else "prefill"] // (4 * n * planes))
  gr = qw.group_rows
  if qw.group_size is None or target >= gr:
    return target if qw.group_size is None else target // gr * gr
  return max(d for d in range(1, target + 1) if gr % d == 0)


@functools.partial(jax.jit, static_argnames=("rows_per_step",))
def quant_matmul_cpu(x: jax.Array, qw: QuantizedWeight, *, rows_per_step: int | None = None) -> jax.Array:
  """x [M, K] @ dequant(qw) -> [M, N] in x.dtype, computed in f32."""
  xs = activation_planes(x.astype(jnp.float32), qw)  # [M, Ks] per plane
  q, scale = qw.qvalue, qw.scale
  ks, n = q.shape
  m = x.shape[0]
  per_channel = qw.group_size is None
  ck = min(ks, rows_per_step or chunk_rows(m, n, qw))

  def step(acc, row0, rows):
    qc = lax.dynamic_slice_in_dim(q, row0, rows, axis=0)
    planes = unpack_int4(qc) if qw.bits == 4 else (qc,)
    w = [p.astype(jnp.float32) for p in planes]
    post_scale = None
    if not per_channel and rows <= qw.group_rows:
      # The chunk lies inside one group: scale the [M, N] partial product, not the [rows, N]
      # weights (a gather of per-row scales measured 2x slower than the whole f32 matvec).
      post_scale = lax.dynamic_slice_in_dim(scale, row0 // qw.group_rows, 1, axis=0)
    elif not per_channel:  # whole groups: broadcast each group's scale row over its rows
      s = lax.dynamic_slice_in_dim(scale, row0 // qw.group_rows, rows // qw.group_rows, axis=0)
      w = [(p.reshape(-1, qw.group_rows, n) * s[:, None, :]).reshape(rows, n) for p in w]
    xc = [lax.dynamic_slice_in_dim(xp, row0, rows, axis=1) for xp in xs]
    # One dot per plane: concatenating the planes into one dot measured 8x slower (the
    # concatenate fusion is not vectorized on XLA:CPU).
    part = sum(jnp.dot(xp, wp) for xp, wp in zip(xc, w))
    return acc + (part if post_scale is None else part * post_scale)

  # Independent loops over disjoint row ranges: XLA:CPU runs independent ops concurrently, while
  # the fusions inside one loop step run on one core (the f32 dot it competes with uses them all).
  steps = ks // ck
  bounds = [steps * i // LOOPS for i in range(LOOPS + 1)]
  acc = jnp.zeros((m, n), jnp.float32)
  parts = [lax.fori_loop(lo, hi, lambda i, a: step(a, i * ck, ck), acc) for lo, hi in zip(bounds, bounds[1:])
           if hi > lo]
  acc = functools.reduce(jnp.add, parts, acc)
  if ks % ck:  # the ragged tail as one static-size step
    acc = step(acc, steps * ck, ks % ck)
  if per_channel:
    acc = acc * scale
  return acc.astype(x.dtype)
