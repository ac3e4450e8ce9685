"""Block-sparse flash attention (causal, sliding window, attention sinks, NSA top-k blocks, GQA).

>>> import jax, jax.numpy as jnp
>>> from pallas_kernels import sparse_attention, topk_block_indices
>>> q = jax.random.normal(jax.random.key(0), (1, 4, 256, 32))           # [B, H, S, D]
>>> k = v = jax.random.normal(jax.random.key(1), (1, 2, 256, 32))       # [B, KVH, T, D]: GQA
>>> out = sparse_attention(q, k, v, window=64, sinks=4)                  # StreamingLLM mask
>>> scores = jax.random.normal(jax.random.key(2), (1, 2, 4, 4))         # [B, KVH, q blocks, k blocks]
>>> idx = topk_block_indices(scores, 2, block_q=64, block_kv=64)
>>> out = sparse_attention(q, k, v, window=32, block_indices=idx)        # NSA selection + a window
>>> out.shape
(1, 4, 256, 32)
"""

from pallas_kernels.sparse_attention.block_lists import BlockSizes, topk_block_indices
from pallas_kernels.sparse_attention.ops import IMPLS, block_stats, sparse_attention
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

__all__ = ["IMPLS", "BlockSizes", "block_stats", "sparse_attention", "sparse_attention_reference", "topk_block_indices"]
