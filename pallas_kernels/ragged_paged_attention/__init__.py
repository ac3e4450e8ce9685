"""Ragged paged attention: a ragged batch of query tokens (decode rows and prefill chunks of many
sequences, concatenated) attending causally over a paged KV cache (a block pool and page tables).

>>> import jax.numpy as jnp
>>> from pallas_kernels.ragged_paged_attention import ragged_paged_attention
>>> k_pages = v_pages = jnp.ones((8, 2, 16, 64))                        # [P, KVH, page_size, D]
>>> q = jnp.ones((5, 4, 64))                                            # 1 decode row + a 4-token chunk
>>> out = ragged_paged_attention(q, k_pages, v_pages, kv_lens=jnp.array([20, 4]),
...                              page_indices=jnp.array([[3, 5], [0, -1]]), cu_q_lens=jnp.array([0, 1, 5]),
...                              num_seqs=jnp.array([2]))
>>> out.shape
(5, 4, 64)
"""

from pallas_kernels.ragged_paged_attention.ops import IMPLS, ragged_paged_attention
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

__all__ = ["IMPLS", "ragged_paged_attention", "ragged_paged_attention_reference"]
