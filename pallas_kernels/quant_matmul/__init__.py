"""Weight-only int8/int4 quantized matmul: `quant_matmul(x, quantize_weight(w))` ~= `x @ w`.

  qw = quantize_weight(w, bits=4, group_size=128)   # w [K, N] -> QuantizedWeight
  y = quant_matmul(x, qw)                             # x [..., K] -> [..., N] in x.dtype
  y = quant_matmul(x, qw, axes={"k": "fsdp", "n": "tensor"})   # per shard on the context mesh
"""

from pallas_kernels.quant_matmul.ops import IMPLS, default_compute_dtype, partition, quant_matmul
from pallas_kernels.quant_matmul.reference import quant_matmul_reference
from pallas_kernels.quant_matmul.weights import QuantizedWeight, dequantize, quantize_weight

__all__ = ["IMPLS", "QuantizedWeight", "default_compute_dtype", "dequantize", "partition", "quant_matmul",
           "quant_matmul_reference", "quantize_weight"]
