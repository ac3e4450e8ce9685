"""Pure-jnp reference: dequantize the whole weight, then one dot. The kernels' semantics.

    y = round(x, compute_dtype) @ (q * scale)      accumulated in f32, returned in x.dtype

The activations enter the dot in `compute_dtype` (default: x.dtype); the quantized values are
exact in bf16 (|q| <= 127) and the scales are applied in f32, so a kernel that scales each group's
partial product computes exactly this up to f32 summation order. Kernels that dequantize a block
to `compute_dtype` before their dot add one rounding of the weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul.weights import QuantizedWeight, dequantize


def quant_matmul_reference(x: jax.Array, qw: QuantizedWeight, compute_dtype=None) -> jax.Array:
  """x [..., K] @ dequantize(qw) [K, N] -> [..., N] in x.dtype."""
  cdt = jnp.dtype(compute_dtype or x.dtype)
  xr = x.astype(cdt).astype(jnp.float32)
  y = jnp.dot(xr, dequantize(qw, jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
