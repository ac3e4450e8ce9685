"""The quantized-weight format shared by every implementation, and how to make one.

W is [K, N] (in, out); N is the lane dimension on TPU and the contiguous one everywhere.

Storage (`QuantizedWeight`):
  qvalue  int8 [Ks, N]. bits=8: Ks = Kp, one value per byte.
          bits=4: Ks = Kp // 2, two values per byte. K is cut into tiles of 2H rows (H =
          `half_rows`, 128 when K allows); storage row r of tile t holds logical row 2Ht + r in its
          low nibble and row 2Ht + H + r in its high nibble (both signed, two's complement). So a
          block of whole tiles needs two contiguous slices of x per tile, never an even/odd gather,
          and a shard of whole tiles is a contiguous range of K.
  scale   f32 [G, N]: G = 1 (per output channel) or Kp / group_size (per group along K).
  Kp      K padded with zero rows: to a multiple of the group size, and for int4 to a multiple of
          32 as well (tiles of at least 2 x 16 rows, the smallest GPU dot); `in_features` keeps K.

  minimum f32 [G, N] or None: the zero point (asymmetric quantization).

  dequant(W)[k, n] = q[k, n] * scale[g, n]                          (symmetric: minimum None)
  dequant(W)[k, n] = (q[k, n] + 2^(bits-1)) * scale[g, n] + minimum[g, n]   (asymmetric)
  with g = k // group_size, every product and sum in f32.

Asymmetric values use the whole unsigned range (0..15 for int4, 0..255 for int8), stored shifted
by 2^(bits-1) into the same signed storage, so every kernel unpacks them unchanged; this is
llama.cpp's Q4_1 grid (w = d * q + m), and GGUF's Q4_1 blocks load into it bit for bit. Kernels
use the offset z = 2^(bits-1) * scale + minimum (`zero_point_offsets`): dequant = q * scale + z.
The TPU and GPU kernels apply it in their body (a group's partial product gains its x row sums
times z, or a multi-group tile is dequantized as q * s + z); the CPU and XLA paths add the same
rank-G term after their symmetric matmul (`zero_point_correction`).

int4 group sizes are powers of two, so each half tile lies inside one group or holds whole groups.

Why not qwix's `QArray`: it requires `qvalue.shape == original.shape` (int4 as the logical
`jnp.int4` dtype, whose packing XLA decides), so it cannot carry an explicit nibble layout a
kernel unpacks with shifts, nor the K padding that makes odd shapes and partial groups whole.
`QuantizedWeight` is a plain pytree of two arrays, so it jits, vmaps, shards and checkpoints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

QMAX = {8: 127, 4: 7}  # symmetric ranges; -128 / -8 are never produced
ZERO_SHIFT = {8: 128, 4: 8}  # asymmetric: unsigned 0..2^bits-1 stored as q - 2^(bits-1)
INT4_HALF_ROWS = 128  # the largest int4 half tile: a TPU lane width of x per slice
INT4_K_MULTIPLE = 32  # int4 K padding: half tiles of >= 16 rows


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
  minimum: jax.Array | None = None  # f32 [..., G, N]: the zero point; None: symmetric

  @property
  def zero_point(self) -> bool:
    return self.minimum is not None

  @property
  def out_features(self) -> int:
    return self.qvalue.shape[-1]

  @property
  def shape(self) -> tuple[int, int]:
    """The logical (unpadded) [K, N]."""
    return (self.in_features, self.out_features)

  @property
  def padded_in_features(self) -> int:
    """Kp: K after padding (see the module docstring)."""
    return self.qvalue.shape[-2] * (8 // self.bits)

  @property
  def planes(self) -> int:
    """Values per byte of `qvalue`: 1 (int8) or 2 (int4)."""
    return 8 // self.bits

  @property
  def half_rows(self) -> int:
    """H: storage rows per int4 half tile (the tile is 2H logical rows); Kp for int8."""
    if self.bits == 8:
      return self.padded_in_features
    return int4_half_rows(self.padded_in_features)

  @property
  def nbytes(self) -> int:
    extra = 0 if self.minimum is None else self.minimum.size * self.minimum.dtype.itemsize
    return self.qvalue.size * self.qvalue.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize + extra


def int4_half_rows(kp: int) -> int:
  """The largest power of two H <= INT4_HALF_ROWS with Kp a multiple of 2H."""
  h = INT4_HALF_ROWS
  while kp % (2 * h):
    h //= 2
  return h


def padded_k(k: int, bits: int, group_size: int | None) -> int:
  multiple = group_size or 1
  if bits == 4:
    multiple = max(multiple, INT4_K_MULTIPLE)  # group sizes are powers of two: max == lcm
  return -(-k // multiple) * multiple


def check_group_size(bits: int, group_size: int | None) -> None:
  if bits not in QMAX:
    raise ValueError(f"bits must be 8 or 4, got {bits}")
  if group_size is None:
    return
  if group_size <= 0:
    raise ValueError(f"group_size must be positive or None, got {group_size}")
  if bits == 4 and group_size & (group_size - 1):
    raise ValueError(
      f"int4 group_size must be a power of two (the int4 tiles split K in powers of two), got {group_size}"
    )


def quantize_weight(
  w: jax.Array, bits: int = 8, group_size: int | None = None, *, zero_point: bool = False
) -> QuantizedWeight:
  """Weight-only quantization of w [K, N] (in, out); jit- and vmap-friendly.

  Args:
    w: the float weight, [in, out].
    bits: 8 or 4.
    group_size: None for one scale per output column; otherwise one per `group_size` rows of K
      (any positive size for int8, a power of two for int4).
    zero_point: False: symmetric, q = round(w / s) in [-(2^(bits-1) - 1), 2^(bits-1) - 1] with
      s = max|w| / that bound (15 of int4's 16 levels, no offset). True: asymmetric, per group
      minimum m and s = (max - min) / (2^bits - 1), q = round((w - m) / s) in [0, 2^bits - 1]
      (all 16 int4 levels spread over the group's actual range; llama.cpp's Q4_1 grid).

  A column (or group) of zeros gets scale 0 and q 0, so dequantizes to exact zeros, never NaN;
  a constant group dequantizes to its value exactly (asymmetric). K's padding rows never widen
  a group's range.
  """
  check_group_size(bits, group_size)
  if w.ndim != 2:
    raise ValueError(f"quantize_weight expects a 2-D [in, out] weight (vmap for stacks), got {w.shape}")
  k, n = w.shape
  kp = padded_k(k, bits, group_size)
  wf = jnp.pad(w.astype(jnp.float32), ((0, kp - k), (0, 0)))  # zero rows never change a max
  groups = wf.reshape(-1, group_size or kp, n)
  minimum = None
  if zero_point:
    real = (jnp.arange(kp) < k).reshape(-1, group_size or kp, 1)  # padding rows stay out of min and max
    lo = jnp.min(jnp.where(real, groups, jnp.inf), axis=1)  # [G, N]
    hi = jnp.max(jnp.where(real, groups, -jnp.inf), axis=1)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    safe = jnp.where(scale > 0, scale, 1.0)[:, None, :]
    q = jnp.clip(jnp.round((groups - lo[:, None, :]) / safe), 0, levels) - ZERO_SHIFT[bits]
    minimum = lo
  else:
    scale = jnp.max(jnp.abs(groups), axis=1) / QMAX[bits]  # [G, N]
    safe = jnp.where(scale > 0, scale, 1.0)[:, None, :]
    q = jnp.clip(jnp.round(groups / safe), -QMAX[bits], QMAX[bits])
  q = q.astype(jnp.int8).reshape(kp, n)
  if bits == 4:
    q = pack_int4(q)
  return QuantizedWeight(q, scale, bits=bits, group_size=group_size, in_features=k, minimum=minimum)


def pack_int4(q: jax.Array) -> jax.Array:
  """int8 values in [-8, 7], logical rows [Kp, N] -> int8 [Kp // 2, N] in the tiled nibble layout."""
  kp, n = q.shape
  h = int4_half_rows(kp)
  tiles = q.reshape(kp // (2 * h), 2, h, n).astype(jnp.int32)
  lo, hi = tiles[:, 0], tiles[:, 1]
  return ((lo & 0xF) | (hi << 4)).astype(jnp.int8).reshape(kp // 2, n)


def unpack_int4(p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int8 packed [R, N] -> (low nibbles, high nibbles) as int32 [R, N] each.

  Only shifts on int32 (sign extension by arithmetic right shift), which Mosaic, Triton and XLA
  all lower; kernels call this on their block.
  """
  p = p.astype(jnp.int32)  # sign-extends the byte, so the high nibble keeps its sign
  lo = lax.shift_right_arithmetic(lax.shift_left(p, 28), 28)
  hi = lax.shift_right_arithmetic(p, 4)
  return lo, hi


def logical_row(storage_row: int, plane: int, half_rows: int) -> int:
  """The logical K row of an int4 storage row's nibble `plane` (0 low, 1 high)."""
  tile, r = divmod(storage_row, half_rows)
  return 2 * half_rows * tile + plane * half_rows + r


def unpacked_qvalue(qw: QuantizedWeight) -> jax.Array:
  """int32 [..., Kp, N] quantized values in logical row order."""
  if qw.bits == 8:
    return qw.qvalue.astype(jnp.int32)
  lo, hi = unpack_int4(qw.qvalue)
  *lead, ks, n = lo.shape
  h = qw.half_rows
  tiles = jnp.stack([lo.reshape(*lead, ks // h, h, n), hi.reshape(*lead, ks // h, h, n)], axis=-3)
  return tiles.reshape(*lead, 2 * ks, n)


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
  """[K, N] in `dtype`: q * scale (+ the zero point) computed in f32, then cast (the kernels'
  rounding too)."""
  q = unpacked_qvalue(qw).astype(jnp.float32)
  kp, n = q.shape[-2:]
  g = qw.group_size or kp
  q = q.reshape(*q.shape[:-2], kp // g, g, n)
  if qw.minimum is None:
    w = q * qw.scale[..., :, None, :]
  else:
    w = (q + ZERO_SHIFT[qw.bits]) * qw.scale[..., :, None, :] + qw.minimum[..., :, None, :]
  return w.reshape(*w.shape[:-3], kp, n)[..., : qw.in_features, :].astype(dtype)


def zero_point_offsets(qw: QuantizedWeight) -> jax.Array:
  """f32 [..., G, N]: what each group adds per unit of x, 2^(bits-1) * scale + minimum."""
  return ZERO_SHIFT[qw.bits] * qw.scale + qw.minimum


def zero_point_correction(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
  """x [M, K] -> f32 [M, N]: the asymmetric weight's term beyond the symmetric matmul of its
  stored values, sum over groups of (sum of x over the group's rows) * offset (one [M, G] x
  [G, N] dot; G = 1 for per-channel scales)."""
  kp = qw.padded_in_features
  xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kp - x.shape[-1])))
  sums = xf.reshape(x.shape[0], -1, qw.group_size or kp).sum(-1)  # [M, G]
  return jnp.dot(sums, zero_point_offsets(qw), precision=jax.lax.Precision.HIGHEST)


def plane_scales(s: jax.Array, rows: int, qw: QuantizedWeight) -> list[jax.Array]:
  """Per nibble plane, [rows, N] scales for `rows` storage rows of whole tiles and whole groups.

  `s` is their [groups, N] scale rows. int8: each group's row repeated over its rows. int4 with
  groups no longer than a half tile: the two halves of a tile take alternate runs of groups; with
  longer groups both halves of a tile share one.
  """
  n = s.shape[-1]
  if qw.bits == 8:
    return [jnp.broadcast_to(s[:, None, :], (s.shape[0], qw.group_size, n)).reshape(rows, n)]
  h, g = qw.half_rows, qw.group_size
  if g <= h:
    runs = s.reshape(rows // h, 2, h // g, 1, n)
    return [jnp.broadcast_to(runs[:, p], (rows // h, h // g, g, n)).reshape(rows, n) for p in (0, 1)]
  both = jnp.broadcast_to(s[:, None, :], (s.shape[0], g // 2, n)).reshape(rows, n)
  return [both, both]


def activation_planes(x: jax.Array, qw: QuantizedWeight) -> list[jax.Array]:
  """x [M, K] -> one activation operand per nibble plane, each [M, Ks] in storage-row order.

  bits=8: [x padded to Kp]. bits=4: [x's low-nibble columns, x's high-nibble columns], so
  y = x_lo @ low_nibbles + x_hi @ high_nibbles. The CPU path and the reference use this; the
  Pallas kernels slice x per tile instead.
  """
  kp = qw.padded_in_features
  x = jnp.pad(x, ((0, 0), (0, kp - x.shape[-1])))
  if qw.bits == 8:
    return [x]
  h = qw.half_rows
  tiles = x.reshape(x.shape[0], kp // (2 * h), 2, h)
  return [tiles[:, :, 0].reshape(x.shape[0], kp // 2), tiles[:, :, 1].reshape(x.shape[0], kp // 2)]
