"""XLA path in storage-row order: what GSPMD partitions where the kernel cannot run per shard.

    y = sum over nibble planes p of  x_p @ (q_p * scale_p)

x is rearranged into the planes' row order (`activation_planes`: an [M, K] gather, small next to
the weight), and the weight is dequantized where it lies, row for row, so a weight sharded along
its storage rows is never moved: each device dequantizes its shard and GSPMD sums the partial
products. Unlike `reference` (logical row order), no int4 tile has to be put back together, which
would reshard the dequantized weight whenever a shard boundary cuts a tile. It does write and
read the dequantized shard (4 bytes per weight), so it is a fallback, not a fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul.weights import QuantizedWeight, activation_planes, plane_scales, unpack_int4


def quant_matmul_xla(x: jax.Array, qw: QuantizedWeight, compute_dtype=None) -> jax.Array:
  """x [M, K] @ dequant(qw) -> [M, N] in x.dtype; dots in `compute_dtype` (default x.dtype), f32 sums."""
  cdt = jnp.dtype(compute_dtype or x.dtype)
  xs = activation_planes(x.astype(cdt), qw)
  ks, n = qw.qvalue.shape
  planes = unpack_int4(qw.qvalue) if qw.bits == 4 else (qw.qvalue,)
  per_channel = qw.group_size is None
  scales = [None] * len(planes) if per_channel else plane_scales(qw.scale, ks, qw)
  y = jnp.zeros((x.shape[0], n), jnp.float32)
  for xp, wp, sp in zip(xs, planes, scales):
    w = wp.astype(cdt) if per_channel else (wp.astype(jnp.float32) * sp).astype(cdt)
    y = y + jnp.dot(xp, w, preferred_element_type=jnp.float32)
  if per_channel:
    y = y * qw.scale
  return y.astype(x.dtype)
