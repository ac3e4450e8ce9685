"""Native Sparse Attention (Yuan et al., DeepSeek, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", arXiv 2502.11089), as `ModelConfig.attention="nsa"`.

Each query attends through three branches whose outputs a learned gate mixes:

  o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win,   g = sigmoid(x W_gate)  (per token and head)

- compressed (o_cmp): blocks of `nsa_compress_block` (l) consecutive keys/values, taken every
  `nsa_compress_stride` (d) tokens, each mapped to one key and one value by a learned linear map of
  the block plus an intra-block position embedding: k_cmp_i = W_k [k_{id} + p_0; ...; k_{id+l-1} + p_{l-1}].
  A query at t sees compressed block i when the whole block precedes it (id + l - 1 <= t).
- selected (o_slc): the compressed branch's attention probabilities, summed over the query heads of
  a kv-head group (one selection per group, as the paper shares it for GQA), score the key blocks
  of the sparse kernel (`block_kv` keys: the selection block l'), each compressed block crediting
  the selection blocks it overlaps (paper eq. 9). The kernel shares one selection per query block
  (`block_q` queries); it is scored by the block's first query, because scores of later queries
  would leak their tokens into the block's earlier queries (the paper selects per query). The
  top `nsa_select_blocks` blocks per (kv head, query block) are attended exactly by
  `pallas_kernels.sparse_attention(block_indices=...)`; the first block and the query block's own
  two most recent key blocks are always selected (the paper's 1 initial + 2 local blocks).
- sliding window (o_win): the last `nsa_window` tokens, through the same kernel.

The selection is discrete (no gradient flows through the top-k); the compressor learns through
o_cmp, as in the paper. Deviations, kept simple on purpose: the three branches share the layer's
keys and values (the paper gives each its own), and the compressor is one linear map (the paper's
phi is "a learnable MLP"). KV-cache decode with NSA is not implemented (a clear error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.errors import ConfigError
from jaxeff.models.attention import MASKED, register_attention
from jaxeff.models.layers import Linear, param
from jaxeff.sharding import EMBED, HEAD_DIM

_ALWAYS = 1e9  # the score that forces a block into the selection


def compressed_block_starts(seq_len: int, block: int, stride: int) -> np.ndarray:
  """First positions of the compressed blocks that fit in `seq_len` tokens."""
  if seq_len < block:
    return np.zeros(0, np.int32)
  return np.arange(0, seq_len - block + 1, stride, dtype=np.int32)


def overlap_matrix(starts: np.ndarray, block: int, select_block: int, num_select: int) -> np.ndarray:
  """[compressed blocks, selection blocks] 1 where compressed block i overlaps selection block j."""
  first, last = starts // select_block, (starts + block - 1) // select_block
  j = np.arange(num_select)
  return ((j[None, :] >= first[:, None]) & (j[None, :] <= last[:, None])).astype(np.float32)


class NativeSparseAttention(nnx.Module):
  """The compressor and the gate of one layer; `__call__` runs the three branches."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dt, param_dtype=pdt, init_std=cfg.initializer_range, rngs=rngs)
    hd, l = cfg.head_dim, cfg.nsa_compress_block
    self.key_position = param(jnp.zeros((l, hd), pdt), (None, HEAD_DIM))
    self.compress_keys = Linear(l * hd, hd, axes=(None, HEAD_DIM), **kw)
    self.compress_values = Linear(l * hd, hd, axes=(None, HEAD_DIM), **kw)
    self.gate = Linear(cfg.hidden_size, 3 * cfg.num_heads, axes=(EMBED, None), **kw)

  def compress(self, x, starts, add_position: bool):
    """[B, S, KVH, D] -> [B, M, KVH, D]: one key (value) per compressed block."""
    b, _, kvh, d = x.shape
    l = self.cfg.nsa_compress_block
    blocks = x[:, starts[:, None] + np.arange(l)[None, :]]  # [B, M, l, KVH, D]
    if add_position:
      blocks = blocks + self.key_position[...].astype(x.dtype)[None, None, :, None, :]
    blocks = blocks.transpose(0, 1, 3, 2, 4).reshape(b, len(starts), kvh, l * d)
    linear = self.compress_keys if add_position else self.compress_values
    return linear(blocks)

  def __call__(self, x, q, k, v):
    """x [B, S, E] (the layer input, for the gate); q [B, S, H, D], k/v [B, S, KVH, D] at positions
    0..S-1 (training / full forward). Returns [B, S, H, D]."""
    o_cmp, o_slc, o_win, gates, _ = self.branches(x, q, k, v)
    out = gates[0] * o_cmp + gates[1] * o_slc + gates[2] * o_win  # [B, H, S, D]
    return out.astype(q.dtype).transpose(0, 2, 1, 3)

  def branches(self, x, q, k, v):
    """The three branch outputs [B, H, S, D] (f32 gates [3, B, H, S, 1]) and the selected key
    blocks [B, KVH, query blocks, nsa_select_blocks] (-1: padding), for tests and inspection."""
    import pallas_kernels  # here: only NSA models need the kernels package
    from pallas_kernels.sparse_attention import ops as sparse_ops

    cfg = self.cfg
    b, s, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    impl = sparse_ops.default_impl()
    bs = sparse_ops.resolve_block_sizes(impl, s, s, None)
    nq, nk = -(-s // bs.block_q), -(-s // bs.block_kv)
    kernel_kw = dict(batch_axes=sharding.mesh_axes(sharding.BATCH), head_axes=sharding.mesh_axes(sharding.HEADS))
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # the kernel's [B, heads, S, D]

    # Compressed branch (dense over the few compressed tokens).
    starts = compressed_block_starts(s, cfg.nsa_compress_block, cfg.nsa_compress_stride)
    qg = qh.reshape(b, kvh, g, s, d)
    if len(starts):
      k_cmp = self.compress(k, starts, add_position=True).transpose(0, 2, 1, 3)  # [B, KVH, M, D]
      v_cmp = self.compress(v, starts, add_position=False).transpose(0, 2, 1, 3)
      scores = jnp.einsum("bkgsd,bkmd->bkgsm", qg, k_cmp, preferred_element_type=jnp.float32) / np.sqrt(d)
      visible = (starts + cfg.nsa_compress_block - 1)[None, :] <= np.arange(s)[:, None]  # [S, M]
      scores = jnp.where(visible, scores, MASKED)
      probs = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0)  # a query before any block: zeros
      o_cmp = jnp.einsum("bkgsm,bkmd->bkgsd", probs.astype(v_cmp.dtype), v_cmp).reshape(b, h, s, d)
      # Selection scores per (kv head, query block, key block), shared by the group's heads.
      per_token = jnp.einsum(
        "bksm,mj->bksj",
        jax.lax.stop_gradient(probs).sum(2),
        overlap_matrix(starts, cfg.nsa_compress_block, bs.block_kv, nk),
      )
      # One selection per kernel query block, from its first query: a later query's scores would
      # leak its token into the earlier queries of the block (the selection is shared).
      block_scores = per_token[:, :, :: bs.block_q]
    else:
      o_cmp = jnp.zeros_like(qh)
      block_scores = jnp.zeros((b, kvh, nq, nk), jnp.float32)
    # Always: the first key block and the two most recent ones of each query block.
    last_block = np.minimum(((np.arange(nq) + 1) * bs.block_q - 1) // bs.block_kv, nk - 1)
    kb = np.arange(nk)
    forced = (kb[None, :] == 0) | ((kb[None, :] <= last_block[:, None]) & (kb[None, :] >= last_block[:, None] - 1))
    block_scores = block_scores + jnp.asarray(forced * _ALWAYS, jnp.float32)
    chosen = pallas_kernels.topk_block_indices(
      block_scores, cfg.nsa_select_blocks, block_q=bs.block_q, block_kv=bs.block_kv
    )
    o_slc = pallas_kernels.sparse_attention(qh, kh, vh, block_indices=chosen, block_sizes=bs, **kernel_kw)
    o_win = pallas_kernels.sparse_attention(qh, kh, vh, window=cfg.nsa_window, block_sizes=bs, **kernel_kw)

    gates = jax.nn.sigmoid(self.gate(x).astype(jnp.float32)).reshape(b, s, 3, h).transpose(2, 0, 3, 1)[..., None]
    return o_cmp, o_slc, o_win, gates, chosen


def _check(cfg: ModelConfig) -> None:
  if cfg.sliding_window is not None:
    raise ConfigError("attention nsa has its own window (model.nsa_window); leave model.sliding_window null")


# Parameters of its own (compressor, gate): the layer owns a module; whole sequences only (no KV cache).
register_attention("nsa", module=NativeSparseAttention, cache=False, check=_check)
