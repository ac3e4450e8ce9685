"""Pure-jnp reference: dequantize the whole weight, then one dot. The kernels' semantics.

The weight is dequantized in f32 (q * scale) and cast to the activation dtype, the dot
accumulates in f32, and the result is returned in the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul.weights import QuantizedWeight, dequantize


def quant_matmul_reference(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """x [..., K] @ dequantize(qw) [K, N] -> [..., N] in x.dtype."""
  w = dequantize(qw, x.dtype)
  y = jnp.dot(x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
