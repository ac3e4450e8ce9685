"""Attention implementations, chosen by `ModelConfig.attention`.

Every implementation has the signature
  fn(q [B, S, H, D], k [B, T, KVH, D], v [B, T, KVH, D], *, q_positions [B, S], kv_positions [B, T],
     sliding_window: int | None) -> [B, S, H, D]
and applies causal masking by position (a key is visible when kv_pos <= q_pos, and with a sliding
window also q_pos - kv_pos < sliding_window). Grouped-query
attention: query head h reads kv head h // (H // KVH). A kernel (e.g. Pallas sparse attention)
plugs in with `register_attention(name, fn)` and `model.attention=name`; the model code does not change.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
ATTENTION_IMPLS: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> AttentionFn:
  ATTENTION_IMPLS[name] = fn
  return fn


def get_attention(name: str) -> AttentionFn:
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; available: {', '.join(sorted(ATTENTION_IMPLS))}")
  return ATTENTION_IMPLS[name]


def dense_attention(q, k, v, *, q_positions, kv_positions, sliding_window=None):
  """Reference softmax attention in XLA; scores and softmax in f32."""
  b, s, h, d = q.shape
  kvh = k.shape[2]
  q = q.reshape(b, s, kvh, h // kvh, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  kv_pos, q_pos = kv_positions[:, None, None, None, :], q_positions[:, None, None, :, None]
  visible = kv_pos <= q_pos
  if sliding_window is not None:
    visible &= q_pos - kv_pos < sliding_window
  # A large finite value, not -inf: a fully masked row then gives a uniform softmax, not NaN.
  scores = jnp.where(visible, scores, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, h, d)


register_attention("dense", dense_attention)
