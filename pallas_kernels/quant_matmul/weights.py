"""The quantized-weight format shared by every implementation, and how to make one.

W is [K, N] (in, out); N is the lane dimension on TPU and the contiguous one everywhere.

Storage (`QuantizedWeight`):
  qvalue  int8 [Ks, N]. bits=8: Ks = Kp, one value per byte.
          bits=4: Ks = Kp // 2, two values per byte packed along K: storage row i holds logical
          row 2i in the low nibble and row 2i+1 in the high nibble (both signed, two's complement).
  scale   f32 [G, N]: G = 1 (per output channel) or ceil(K / group_size) (per group along K).
  Kp      K padded with zero rows to a multiple of the group size (and to even for int4), so
          every group is whole and every byte holds two rows; `in_features` keeps the real K.

  dequant(W)[k, n] = q[k, n] * scale[k // group_size, n]      (symmetric, no zero point)

Why not qwix's `QArray`: it requires `qvalue.shape == original.shape` (int4 as the logical
`jnp.int4` dtype, whose packing XLA decides), so it cannot carry the explicit two-per-byte layout
a kernel unpacks with shifts, nor the K padding that makes odd shapes and partial groups whole.
`QuantizedWeight` is a plain pytree of two arrays, so it jits, vmaps, shards and checkpoints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

QMAX = {8: 127, 4: 7}  # symmetric ranges; -128 / -8 are never produced


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A weight-only quantized [K, N] matrix (see the module docstring for the layout).

  Leading dimensions are allowed (e.g. a scanned model's [layers, Ks, N]); kernels take 2-D ones.
  """

  qvalue: jax.Array  # int8 [..., Ks, N]
  scale: jax.Array  # f32 [..., G, N]
  bits: int = dataclasses.field(metadata=dict(static=True), default=8)
  group_size: int | None = dataclasses.field(metadata=dict(static=True), default=None)
  in_features: int = dataclasses.field(metadata=dict(static=True), default=0)

  @property
  def out_features(self) -> int:
    return self.qvalue.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    """The logical (unpadded) [K, N]."""
    return (self.in_features, self.out_features)

  @property
  def padded_in_features(self) -> int:
    """Kp: K after padding to whole groups (and to even for int4)."""
    return self.qvalue.shape[-2] * (8 // self.bits)

  @property
  def group_rows(self) -> int:
    """Storage rows (of `qvalue`) that share one scale row."""
    g = self.padded_in_features if self.group_size is None else self.group_size
    return g * self.bits // 8

  @property
  def nbytes(self) -> int:
    return self.qvalue.size * self.qvalue.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize


def _padded_k(k: int, bits: int, group_size: int | None) -> int:
  multiple = group_size or (2 if bits == 4 else 1)
  return -(-k // multiple) * multiple


def quantize_weight(w: jax.Array, bits: int = 8, group_size: int | None = None) -> QuantizedWeight:
  """Symmetric weight-only quantization of w [K, N] (in, out); jit- and vmap-friendly.

  group_size None: one scale per output column; otherwise one per `group_size` rows of K.
  A column (or group) of zeros gets scale 0 and q 0, so dequantizes to exact zeros, never NaN.
  """
  if bits not in QMAX:
    raise ValueError(f"bits must be 8 or 4, got {bits}")
  if w.ndim != 2:
    raise ValueError(f"quantize_weight expects a 2-D [in, out] weight (vmap for stacks), got {w.shape}")
  if group_size is not None and (group_size <= 0 or (bits == 4 and group_size % 2)):
    raise ValueError(f"group_size must be positive (and even for int4), got {group_size}")
  k, n = w.shape
  kp = _padded_k(k, bits, group_size)
  wf = jnp.pad(w.astype(jnp.float32), ((0, kp - k), (0, 0)))  # zero rows never change a max
  groups = wf.reshape(-1, group_size or kp, n)
  scale = jnp.max(jnp.abs(groups), axis=1) / QMAX[bits]  # [G, N]
  safe = jnp.where(scale > 0, scale, 1.0)[:, None, :]
  q = jnp.clip(jnp.round(groups / safe), -QMAX[bits], QMAX[bits]).astype(jnp.int8).reshape(kp, n)
  if bits == 4:
    q = pack_int4(q)
  return QuantizedWeight(q, scale, bits=bits, group_size=group_size, in_features=k)


def pack_int4(q: jax.Array) -> jax.Array:
  """int8 values in [-8, 7], [2R, N] -> int8 [R, N]: row 2i in the low nibble, 2i+1 in the high."""
  lo, hi = q[0::2].astype(jnp.int32), q[1::2].astype(jnp.int32)
  return ((lo & 0xF) | (hi << 4)).astype(jnp.int8)


def unpack_int4(p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int8 packed [R, N] -> (even rows, odd rows) as int32 [R, N] each.

  Only shifts on int32 (sign extension by arithmetic right shift), which Mosaic, Triton and XLA
  all lower; kernels call this on their block.
  """
  p = p.astype(jnp.int32)  # sign-extends the byte, so the high nibble keeps its sign
  lo = lax.shift_right_arithmetic(lax.shift_left(p, 28), 28)
  hi = lax.shift_right_arithmetic(p, 4)
  return lo, hi


def unpacked_qvalue(qw: QuantizedWeight) -> jax.Array:
  """int32 [Kp, N] quantized values (int4 un-interleaved back to row order)."""
  if qw.bits == 8:
    return qw.qvalue.astype(jnp.int32)
  lo, hi = unpack_int4(qw.qvalue)
  return jnp.stack([lo, hi], axis=-2).reshape(*lo.shape[:-2], 2 * lo.shape[-2], lo.shape[-1])


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """[K, N] in `dtype`: q * scale computed in f32, then cast (the kernels' rounding too)."""
  q = unpacked_qvalue(qw).astype(jnp.float32)
  kp, n = q.shape[-2:]
  g = qw.group_size or kp
  w = (q.reshape(*q.shape[:-2], kp // g, g, n) * qw.scale[..., :, None, :]).reshape(q.shape)
  return w[..., : qw.in_features, :].astype(dtype)


def activation_planes(x: jax.Array, qw: QuantizedWeight) -> list[jax.Array]:
  """x [M, K] -> the activation operands matching qvalue's storage rows.

  bits=8: [x padded to Kp]. bits=4: [x's even columns, x's odd columns], each [M, Kp // 2], so
  y = x_even @ low_nibbles + x_odd @ high_nibbles and no kernel has to interleave weights.
  Activations are small next to weights at decode, so this rearranging is cheap.
  """
  kp = qw.padded_in_features
  x = jnp.pad(x, ((0, 0), (0, kp - x.shape[-1])))
  if qw.bits == 8:
    return [x]
  pairs = x.reshape(x.shape[0], kp // 2, 2)
  return [pairs[..., 0], pairs[..., 1]]
