"""Pallas kernels for jaxeff, one folder per kernel.

Each kernel folder has the same layout:
  reference.py  pure-jnp reference (the semantics the kernels are tested against)
  tpu.py        Pallas TPU (Mosaic) kernel with its block-size table
  gpu.py        Pallas GPU (Triton) kernel with its block-size table
  cpu.py        an XLA:CPU path where the reference is too slow on CPU (optional)
  ops.py        the public op: picks an implementation by `jax.default_backend()`
"""

from pallas_kernels.quant_matmul import (
    QuantizedWeight,
    dequantize,
    quant_matmul,
    quant_matmul_reference,
    quantize_weight,
)
from pallas_kernels.sparse_attention import (BlockSizes as SparseAttentionBlockSizes, sparse_attention,
                                            sparse_attention_reference, topk_block_indices)

__all__ = ["QuantizedWeight", "dequantize", "quant_matmul", "quant_matmul_reference", "quantize_weight"]
__all__ += ["SparseAttentionBlockSizes", "sparse_attention", "sparse_attention_reference", "topk_block_indices"]
