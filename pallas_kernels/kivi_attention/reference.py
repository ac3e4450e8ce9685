"""Attention over a KIVI-quantized cache: the definition the kernels are tested against.

Queries [B, KVH, M, D] (a kv head's M query rows: its group of query heads, times the chunk's
tokens) attend over the first `lengths[b]` tokens of that row's quantized keys and values (every
one visible: the quantized part of a cache lies before every query). Returns the attention output
normalized over those tokens, f32 [B, KVH, M, D], and its log-sum-exp f32 [B, KVH, M] (-inf where
lengths is 0, output 0 there), so a caller merges it with attention over full-precision tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kivi_attention.quantize import dequantize_keys, dequantize_values


def quantized_attention_reference(
  q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths, *, bits, group, sm_scale
):
  """Dequantize everything, then masked softmax attention (f32)."""
  k = dequantize_keys(k_codes, k_scale, k_min, bits, group)  # [B, KVH, T, D]
  v = dequantize_values(v_codes, v_scale, v_min, bits, group)
  s = jnp.einsum("bkmd,bktd->bkmt", q.astype(jnp.float32), k, precision=jax.lax.Precision.HIGHEST) * sm_scale
  visible = jnp.arange(k.shape[2])[None, None, None, :] < lengths[:, None, None, None]
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(visible, jnp.exp(s - m_safe), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bkmt,bktd->bkmd", p, v, precision=jax.lax.Precision.HIGHEST) / jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)
  return out, lse


def merge(out_a, lse_a, out_b, lse_b):
  """Attention over the union of two disjoint key sets from each part's (output, log-sum-exp)."""
  m = jnp.maximum(lse_a, lse_b)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
  total = wa + wb
  out = (out_a * wa[..., None] + out_b * wb[..., None]) / jnp.where(total > 0, total, 1.0)[..., None]
  return out, m + jnp.log(jnp.where(total > 0, total, 1.0))
