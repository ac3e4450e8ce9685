"""Pallas GPU (Triton) kernel: x [M, K] @ dequant(W) with an in-kernel loop over K.

Grid (N blocks, M blocks); each program owns a [bm, bn] f32 accumulator in registers and walks
K with `fori_loop`, loading [bk, bn] int8 weight blocks (int4: packed, half the bytes) with masked
loads, so ragged M, N and K need no padding of the weight. Triton blocks must be powers of two
and `dot` needs every dim >= 16, so M is covered by blocks of at least 16 rows (masked).

Group scales: bk divides the group's storage rows, so each K step uses one scale row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quant_matmul.weights import QuantizedWeight, activation_planes, unpack_int4

# (bm, bn, bk, num_warps, num_stages); bk in storage rows of `qvalue`. Decode (M <= 16) is a
# bandwidth-bound GEMV: narrow N blocks give enough programs to fill ~132 SMs at N = 4096, and
# long K steps with deep pipelining keep loads in flight. Prefill tiles like a plain GEMM.
# Not yet tuned on hardware (no GPU on the development machines).
BLOCK_SIZES = {
    "decode": (16, 32, 256, 4, 4),
    "prefill": (64, 128, 64, 4, 3),
}
DECODE_MAX_M = 16
MIN_DOT_DIM = 16


def _largest_pow2_divisor(n: int) -> int:
  return n & -n


def choose_blocks(m: int, ks: int, n: int, qw: QuantizedWeight, block_sizes=None):
  """(bm, bn, bk, num_warps, num_stages): powers of two, >= 16, bk dividing a group."""
  bm, bn, bk, warps, stages = block_sizes or BLOCK_SIZES["decode" if m <= DECODE_MAX_M else "prefill"]
  bm = min(bm, max(MIN_DOT_DIM, pl.next_power_of_2(m)))
  bn = min(bn, max(MIN_DOT_DIM, pl.next_power_of_2(n)))
  bk = min(bk, max(MIN_DOT_DIM, pl.next_power_of_2(ks)))
  if qw.group_size is not None:
    bk = min(bk, _largest_pow2_divisor(qw.group_rows))
    if bk < MIN_DOT_DIM:
      raise NotImplementedError(
          f"GPU quant_matmul needs group_size with a power-of-two factor >= {MIN_DOT_DIM * 8 // qw.bits}, "
          f"got group_size={qw.group_size} (bits={qw.bits})")
  return bm, bn, bk, warps, stages


def _kernel(*refs, bits, num_planes, per_channel, group_rows, m, n, ks, bm, bn, bk):
  x_refs, (q_ref, s_ref, o_ref) = refs[:num_planes], refs[num_planes:]
  m0, n0 = pl.program_id(1) * bm, pl.program_id(0) * bn
  m_ok = (m0 + jnp.arange(bm)) < m
  n_ok = (n0 + jnp.arange(bn)) < n
  cdt = x_refs[0].dtype
  precision = jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None

  def body(kb, acc):
    k0 = kb * bk
    k_ok = (k0 + jnp.arange(bk)) < ks
    q = plgpu.load(q_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], mask=k_ok[:, None] & n_ok[None, :], other=0)
    planes = unpack_int4(q) if bits == 4 else (q,)
    if per_channel:
      w = [p.astype(cdt) for p in planes]
    else:
      s = plgpu.load(s_ref.at[pl.ds(k0 // group_rows, 1), pl.ds(n0, bn)], mask=n_ok[None, :], other=0.0)
      w = [(p.astype(jnp.float32) * s).astype(cdt) for p in planes]
    for x_ref, wv in zip(x_refs, w):
      xv = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
      acc += jnp.dot(xv, wv, preferred_element_type=jnp.float32, precision=precision)
    return acc

  acc = jax.lax.fori_loop(0, pl.cdiv(ks, bk), body, jnp.zeros((bm, bn), jnp.float32))
  if per_channel:
    acc = acc * plgpu.load(s_ref.at[pl.ds(0, 1), pl.ds(n0, bn)], mask=n_ok[None, :], other=0.0)
  plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype),
              mask=m_ok[:, None] & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes"))
def quant_matmul_gpu(x: jax.Array, qw: QuantizedWeight, *, interpret=False, block_sizes=None) -> jax.Array:
  """x [M, K] @ dequant(qw) [K, N] -> [M, N] in x.dtype."""
  xs = activation_planes(x, qw)
  (m, ks), n = xs[0].shape, qw.out_features
  bm, bn, bk, warps, stages = choose_blocks(m, ks, n, qw, block_sizes)
  kernel = functools.partial(_kernel, bits=qw.bits, num_planes=len(xs), per_channel=qw.group_size is None,
                             group_rows=qw.group_rows, m=m, n=n, ks=ks, bm=bm, bn=bn, bk=bk)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(n, bn), pl.cdiv(m, bm)),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
      interpret=interpret,
      name="quant_matmul",
  )(*xs, qw.qvalue, qw.scale)
