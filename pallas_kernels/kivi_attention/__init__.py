"""Attention over a KIVI 2/4-bit quantized KV cache (decode and chunked prefill)."""

from pallas_kernels.kivi_attention.ops import IMPLS, quantized_attention
from pallas_kernels.kivi_attention.quantize import (
  dequantize_keys,
  dequantize_values,
  quantize_keys,
  quantize_values,
)
from pallas_kernels.kivi_attention.reference import merge, quantized_attention_reference

__all__ = [
  "IMPLS",
  "dequantize_keys",
  "dequantize_values",
  "merge",
  "quantize_keys",
  "quantize_values",
  "quantized_attention",
  "quantized_attention_reference",
]
