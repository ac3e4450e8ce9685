"""KIVI's 2/4-bit KV-cache format: keys quantized per channel, values per token (Liu et al. 2024,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Asymmetric quantization of a group x: scale = (max - min) / (2^bits - 1), code = round((x - min) /
scale) in [0, 2^bits), x ~= code * scale + min. A constant group (max == min) has scale 0 and every
code 0, so it dequantizes exactly (never a division by zero).

- Keys [..., T, D]: one (scale, min) per channel per group of `group` consecutive tokens (outlier
  channels keep their own range): scales [..., T // group, D].
- Values [..., T, D]: one (scale, min) per token per group of `value_group(group, D)` channels:
  scales [..., T, D // value_group].

Codes are packed along D, `8 // bits` per uint8 byte, in planes: byte i holds the codes of channels
i, i + P, i + 2P, ... (P = D * bits // 8) at bit offsets 0, bits, 2*bits, ...; unpacking is a shift
and a mask per plane, and q . k splits into one dot per plane (no interleaving in a kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
  return 8 // bits


def value_group(group: int, head_dim: int) -> int:
  """Channels per value scale: `group`, or the whole head when it is narrower."""
  return min(group, head_dim)


def check_format(bits: int, group: int, head_dim: int) -> None:
  """Raises ValueError naming the problem when (bits, group) cannot store heads of `head_dim`."""
  if bits not in BITS:
    raise ValueError(f"KIVI bits must be one of {BITS}, got {bits}")
  if group < 1:
    raise ValueError(f"KIVI group must be >= 1, got {group}")
  if head_dim % codes_per_byte(bits):
    raise ValueError(f"head_dim {head_dim} is not a multiple of {codes_per_byte(bits)} ({bits}-bit codes per byte)")
  if head_dim % value_group(group, head_dim):
    raise ValueError(f"head_dim {head_dim} is not a multiple of the value group {group}")


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """uint8 codes [..., D] in [0, 2^bits) -> packed uint8 [..., D * bits // 8] (planar)."""
  per = codes_per_byte(bits)
  planes = jnp.split(codes.astype(jnp.uint8), per, axis=-1)
  out = planes[0]
  for j, plane in enumerate(planes[1:], start=1):
    out = out | (plane << (j * bits))
  return out


def unpack(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack`: uint8 [..., P] -> uint8 codes [..., P * 8 // bits]."""
  mask = (1 << bits) - 1
  return jnp.concatenate([(packed >> (j * bits)) & mask for j in range(codes_per_byte(bits))], axis=-1)


def _quantize(x, bits, axis):
  """(codes uint8, scale, min) of x with min/max reduced over `axis` (kept as size 1)."""
  xf = x.astype(jnp.float32)
  lo = jnp.min(xf, axis=axis, keepdims=True)
  hi = jnp.max(xf, axis=axis, keepdims=True)
  scale = (hi - lo) / ((1 << bits) - 1)
  safe = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.where(scale > 0, jnp.round((xf - lo) / safe), 0.0)
  return jnp.clip(codes, 0, (1 << bits) - 1).astype(jnp.uint8), scale, lo


def quantize_keys(k: jax.Array, bits: int, group: int, dtype=None):
  """Keys [..., T, D] (T a multiple of `group`) -> (codes uint8 [..., T, D*bits/8], scale [..., T/group, D],
  min [..., T/group, D]); scale and min in `dtype` (default k's)."""
  *lead, t, d = k.shape
  check_format(bits, group, d)
  if t % group:
    raise ValueError(f"keys are quantized in whole groups of {group} tokens, got {t}")
  dtype = k.dtype if dtype is None else dtype
  grouped = k.reshape(*lead, t // group, group, d)
  codes, scale, lo = _quantize(grouped, bits, axis=-2)
  return pack(codes.reshape(*lead, t, d), bits), scale[..., 0, :].astype(dtype), lo[..., 0, :].astype(dtype)


def quantize_values(v: jax.Array, bits: int, group: int, dtype=None):
  """Values [..., T, D] -> (codes uint8 [..., T, D*bits/8], scale [..., T, D/g], min [..., T, D/g]),
  g = `value_group(group, D)`; scale and min in `dtype` (default v's)."""
  *lead, t, d = v.shape
  check_format(bits, group, d)
  g = value_group(group, d)
  dtype = v.dtype if dtype is None else dtype
  codes, scale, lo = _quantize(v.reshape(*lead, t, d // g, g), bits, axis=-1)
  return pack(codes.reshape(*lead, t, d), bits), scale[..., 0].astype(dtype), lo[..., 0].astype(dtype)


def dequantize_keys(codes, scale, lo, bits: int, group: int, dtype=jnp.float32) -> jax.Array:
  """(codes [..., T, P], scale/min [..., T/group, D]) -> keys [..., T, D] in `dtype`."""
  c = unpack(codes, bits).astype(jnp.float32)
  s = jnp.repeat(scale.astype(jnp.float32), group, axis=-2)
  m = jnp.repeat(lo.astype(jnp.float32), group, axis=-2)
  return (c * s + m).astype(dtype)


def dequantize_values(codes, scale, lo, bits: int, group: int, dtype=jnp.float32) -> jax.Array:
  """(codes [..., T, P], scale/min [..., T, D/g]) -> values [..., T, D] in `dtype`."""
  c = unpack(codes, bits).astype(jnp.float32)
  g = value_group(group, c.shape[-1])
  s = jnp.repeat(scale.astype(jnp.float32), g, axis=-1)
  m = jnp.repeat(lo.astype(jnp.float32), g, axis=-1)
  return (c * s + m).astype(dtype)
