"""XLA path (CPU decode): online softmax over token chunks, each dequantized in f32 as it is used.

A `fori_loop` walks chunks of `chunk` tokens up to the longest row's length (a cache allocated for
T tokens but filled to fewer costs only what is filled), dequantizing one chunk of keys and values
to f32 at a time (unpack, scale and min fuse into one pass; the chunk stays cache-sized instead of
two f32 copies of the whole cache), and runs the dots in f32: XLA:CPU's bf16 matmuls are far
slower than f32 (/work/shared/notes/kernels.md). Tokens past a row's length are masked in the
scores and zeroed in the values, so garbage (even NaN) there cannot leak.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.kivi_attention.quantize import dequantize_keys, dequantize_values

CHUNK_BYTES = 2 << 20  # f32 keys of one chunk across the local batch and heads: about an L2
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def choose_chunk(batch: int, kv_heads: int, t: int, head_dim: int, group: int, chunk: int | None = None) -> int:
  """Tokens per step: a multiple of `group` that divides T (dynamic slices must not overlap)."""
  if chunk is None:
    chunk = CHUNK_BYTES // (4 * batch * kv_heads * head_dim)
  if chunk % group:
    chunk = chunk // group * group
  chunk = min(max(group, chunk), t)
  while t % chunk:
    chunk -= group
  return chunk


def quantized_attention_xla(
  q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths, *, bits, group, sm_scale, chunk=None
):
  """(out f32 [B, KVH, M, D], lse f32 [B, KVH, M]); shapes as `quantized_attention_reference`."""
  b, kvh, m, d = q.shape
  t = k_codes.shape[2]
  c = choose_chunk(b, kvh, t, d, group, chunk)
  qf = q.astype(jnp.float32)
  lengths = lengths.astype(jnp.int32)
  hi = lax.Precision.HIGHEST  # f32 dots; on CPU the same kernel as the default

  def step(i, carry):
    m_prev, l_prev, acc = carry
    t0 = i * c
    take = lambda a, n, at: lax.dynamic_slice_in_dim(a, at, n, axis=2)
    k = dequantize_keys(
      take(k_codes, c, t0), take(k_scale, c // group, t0 // group), take(k_min, c // group, t0 // group), bits, group
    )
    visible = (t0 + jnp.arange(c))[None, :] < lengths[:, None]  # [B, c]
    s = jnp.einsum("bhmd,bhcd->bhmc", qf, k, precision=hi) * sm_scale
    s = jnp.where(visible[:, None, None, :], s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp(m_prev - m_next)
    # A row with nothing visible yet has m_next == MASK_VALUE: its masked exps would be 1.
    p = jnp.where(visible[:, None, None, :], jnp.exp(s - m_next[..., None]), 0.0)
    v = dequantize_values(take(v_codes, c, t0), take(v_scale, c, t0), take(v_min, c, t0), bits, group)
    v = jnp.where(visible[:, None, :, None], v, 0.0)
    acc = alpha[..., None] * acc + jnp.einsum("bhmc,bhcd->bhmd", p, v, precision=hi)
    return m_next, alpha * l_prev + p.sum(axis=-1), acc

  steps = jnp.minimum((jnp.max(lengths, initial=0) + c - 1) // c, t // c)
  init = (
    jnp.full((b, kvh, m), MASK_VALUE, jnp.float32),
    jnp.zeros((b, kvh, m), jnp.float32),
    jnp.zeros((b, kvh, m, d), jnp.float32),
  )
  m_run, l, acc = lax.fori_loop(0, steps, step, init)
  dead = l == 0.0
  l_safe = jnp.where(dead, 1.0, l)
  out = jnp.where(dead[..., None], 0.0, acc / l_safe[..., None])
  return out, jnp.where(dead, -jnp.inf, m_run + jnp.log(l_safe))
