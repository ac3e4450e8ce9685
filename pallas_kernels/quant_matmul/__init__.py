"""Weight-only int8/int4 quantized matmul: `quant_matmul(x, quantize_weight(w))` ~= `x @ w`.

>>> import jax, jax.numpy as jnp
>>> from pallas_kernels import dequantize, quant_matmul, quantize_weight
>>> w = jax.random.normal(jax.random.key(0), (256, 64))
>>> x = jax.random.normal(jax.random.key(1), (2, 256))
>>> qw = quantize_weight(w, bits=4, group_size=128)   # w [K, N] -> QuantizedWeight (int4 packed)
>>> y = quant_matmul(x, qw)                           # x [..., K] -> [..., N] in x.dtype
>>> bool(jnp.allclose(y, x @ dequantize(qw), atol=1e-4))   # x @ dequant(qw), the weight never dequantized whole
True

On a mesh, `quant_matmul(x, qw, axes={"k": "fsdp", "n": "tensor"})` runs per shard.
"""

from pallas_kernels.quant_matmul.ops import IMPLS, default_compute_dtype, partition, quant_matmul
from pallas_kernels.quant_matmul.reference import quant_matmul_reference
from pallas_kernels.quant_matmul.weights import QuantizedWeight, dequantize, quantize_weight

__all__ = [
  "IMPLS",
  "QuantizedWeight",
  "default_compute_dtype",
  "dequantize",
  "partition",
  "quant_matmul",
  "quant_matmul_reference",
  "quantize_weight",
]
