"""Pallas kernels for jaxeff, one folder per kernel.

Each kernel folder has the same layout:
  reference.py  pure-jnp reference (the semantics the kernels are tested against)
  tpu.py        Pallas TPU (Mosaic) kernel with its block-size table
  gpu.py        Pallas GPU (Triton) kernel with its block-size table
  cpu.py        an XLA:CPU path where the reference is too slow on CPU (optional)
  ops.py        the public op: picks an implementation by `jax.default_backend()`

Shared helpers: `sharding.py` (`shard_kernel`: run a kernel per shard of a mesh) and `cubin.py`
(compile a jitted op's Pallas GPU kernels to cubin without a GPU and report their resources;
needs the `triton` package, imported only when used).
"""

from pallas_kernels.quant_matmul import (
  QuantizedWeight,
  default_compute_dtype,
  dequantize,
  partition,
  quant_matmul,
  quant_matmul_reference,
  quantize_weight,
)
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.sparse_attention import BlockSizes as SparseAttentionBlockSizes
from pallas_kernels.sparse_attention import sparse_attention, sparse_attention_reference, topk_block_indices

__all__ = [
  "QuantizedWeight",
  "default_compute_dtype",
  "dequantize",
  "partition",
  "quant_matmul",
  "quant_matmul_reference",
  "quantize_weight",
  "ragged_paged_attention",
  "ragged_paged_attention_reference",
  "SparseAttentionBlockSizes",
  "sparse_attention",
  "sparse_attention_reference",
  "topk_block_indices",
]
