"""Building blocks: Linear, Embed, RMSNorm, RoPE. Parameters carry logical axis names.

`Linear` is the one place a weight meets an activation, so quantized weights
(`jaxeff.quantize` (`jaxeff.quantization.quantize`)) plug in by swapping a `Linear` for a module with the same call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.sharding import EMBED, NORM, VOCAB


def param(value, axes) -> nnx.Param:
  """A parameter with logical axis names (`jaxeff.sharding`'s constants); the rules table decides
  its sharding."""
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias), kernel [in, out] with logical axes `axes`, math in `dtype`."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes: Sequence[str],
    use_bias: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    init_std: float = 0.02,
    rngs: nnx.Rngs,
  ):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = dtype
    w = init_std * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = param(w, axes)
    self.bias = param(jnp.zeros((out_features,), param_dtype), axes[-1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding [vocab, embed]; `attend` reuses it as a tied LM head."""

  def __init__(
    self,
    vocab_size: int,
    features: int,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    init_std: float = 0.02,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    self.embedding = param(
      init_std * jax.random.normal(rngs.params(), (vocab_size, features), param_dtype), (VOCAB, EMBED)
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in f32 (as Llama does) and returned in the input dtype."""

  def __init__(self, features: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(jnp.ones((features,), param_dtype), (NORM,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * y).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """Inverse frequencies [head_dim // 2], with optional linear or Llama-3 scaling."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling["factor"])
  if kind == "linear":
    return inv_freq / factor
  if kind == "llama3":
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [batch, seq, head_dim // 2] for integer positions [batch, seq]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


class Rope(NamedTuple):
  """Rotary embedding at some positions: what a KV-cache policy rotates queries and keys with.
  `apply(x)` rotates [B, S, heads, D] at the positions it was made for; `at(positions)` gives the
  embedding at other positions (StreamingLLM's cache-relative ones)."""

  cos: jax.Array  # [B, S, D // 2]
  sin: jax.Array
  inv_freq: jax.Array  # [D // 2]

  @classmethod
  def make(cls, positions: jax.Array, inv_freq: jax.Array) -> Rope:
    return cls(*rope_cos_sin(positions, inv_freq), inv_freq)

  def apply(self, x: jax.Array) -> jax.Array:
    return apply_rope(x, self.cos, self.sin)

  def at(self, positions: jax.Array) -> Rope:
    return Rope.make(positions, self.inv_freq)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates halves (the Llama/HF layout, not interleaved pairs). x: [batch, seq, heads, dim]."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
