"""Block-sparse flash attention (causal, sliding window, attention sinks, NSA top-k blocks, GQA).

  out = sparse_attention(q, k, v, window=1024, sinks=4)            # q [B, H, S, D], k/v [B, KVH, T, D]
  idx = topk_block_indices(block_scores, 16, block_q=128, block_kv=128)
  out = sparse_attention(q, k, v, window=512, block_indices=idx)   # NSA selection + local window
"""

from pallas_kernels.sparse_attention.block_lists import BlockSizes, topk_block_indices
from pallas_kernels.sparse_attention.ops import IMPLS, block_stats, sparse_attention
from pallas_kernels.sparse_attention.reference import sparse_attention_reference

__all__ = ["IMPLS", "BlockSizes", "block_stats", "sparse_attention", "sparse_attention_reference", "topk_block_indices"]
