"""Dense jnp reference: the full [S, T] score matrix with the exact mask. The kernels' semantics.

softmax over the visible keys (plus, with learned sink logits, a per-head logit that joins the
denominator and has no value: out = sum_j p_j v_j, p_j = e^{s_j} / (e^{sink} + sum_k e^{s_k})),
scores in f32 scaled by 1/sqrt(d). A row that sees no key outputs zeros. Output in q.dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.block_lists import MASK_VALUE, Mask, token_visible


def visibility(
  q_positions,
  kv_positions,
  *,
  num_kv_heads: int,
  causal=True,
  window=None,
  sinks=0,
  block_indices=None,
  block_q=None,
  block_kv=None,
):
  """[B, KVH, S, T] bool (B, KVH may be 1 when shared): which keys each query sees."""
  mask = Mask(causal, window, sinks, block_indices is not None)
  q_pos = q_positions[:, None, :, None]
  kv_pos = kv_positions[:, None, None, :]
  selected = False
  if block_indices is not None:
    s, t = q_positions.shape[-1], kv_positions.shape[-1]
    nk = -(-t // block_kv)
    idx = block_indices.astype(jnp.int32)
    chosen = (idx[..., None] == jnp.arange(nk)).any(-2)  # [B, KVH, nq, nk]; -1 / >= nk match nothing
    selected = chosen[:, :, jnp.arange(s) // block_q][..., jnp.arange(t) // block_kv]
  return token_visible(mask, q_pos, kv_pos, selected)


def sparse_attention_reference(
  q,
  k,
  v,
  *,
  causal=True,
  window=None,
  sinks=0,
  block_indices=None,
  sink_logits=None,
  q_positions=None,
  kv_positions=None,
  block_q=None,
  block_kv=None,
):
  """Dense attention with the block-sparse op's mask; differentiable (autodiff).

  Args: as `pallas_kernels.sparse_attention`; `block_q` / `block_kv` give the granularity of
  `block_indices` (required with it).
  """
  b, h, s, d = q.shape
  kvh, t = k.shape[1], k.shape[2]
  g = h // kvh
  if block_indices is not None and (block_q is None or block_kv is None):
    raise ValueError("block_indices needs block_q and block_kv (the selection's granularity)")
  q_positions = jnp.arange(s, dtype=jnp.int32)[None] if q_positions is None else jnp.atleast_2d(q_positions)
  kv_positions = jnp.arange(t, dtype=jnp.int32)[None] if kv_positions is None else jnp.atleast_2d(kv_positions)
  visible = visibility(
    q_positions,
    kv_positions,
    num_kv_heads=kvh,
    causal=causal,
    window=window,
    sinks=sinks,
    block_indices=block_indices,
    block_q=block_q,
    block_kv=block_kv,
  )[:, :, None]
  qg = q.reshape(b, kvh, g, s, d)
  scores = jnp.einsum(
    "bkgsd,bktd->bkgst", qg, k, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
  ) * (d**-0.5)
  scores = jnp.where(visible, scores, MASK_VALUE)
  m = scores.max(-1, keepdims=True)
  if sink_logits is not None:
    sink = sink_logits.astype(jnp.float32).reshape(1, kvh, g, 1, 1)
    m = jnp.maximum(m, sink)
  p = jnp.where(visible, jnp.exp(scores - m), 0.0)
  denom = p.sum(-1, keepdims=True)
  if sink_logits is not None:
    denom = denom + jnp.exp(sink - m)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgst,bktd->bkgsd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, h, s, d).astype(q.dtype)
