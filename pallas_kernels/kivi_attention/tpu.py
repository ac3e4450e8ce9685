"""Pallas TPU (Mosaic) kernel: decode attention over the KIVI-quantized cache, dequantized in VMEM.

Grid (batch, kv head, token block), the last axis "arbitrary". `lengths` is scalar-prefetched into
SMEM: a block at or past lengths[b] skips its compute (`pl.when`), and every cache index_map clamps
the block index to the row's last needed block, so the pipeline issues no DMA for skipped blocks.
Only the block holding lengths[b] pays for the token masks (on the scores, and on the dequantized
values so that garbage past the length, even NaN scales, cannot reach the sum). m, l (lane-
replicated [M, 128], as splash attention keeps them) and the accumulator are f32 VMEM scratch.

Dequantization follows the storage planes (quantize.py): plane j of a code byte holds channels
[j*P, (j+1)*P), so each plane is a shift and a mask of the whole [bt, P] code block, and q . k is
one dot per plane against q's matching channels. The wrapper hands q, the key scales and the
output over in plane-major form ([.., planes, M, P], [.., groups, planes, P]: the key scales only
need a free reshape), so neither q, the key scales nor the accumulator is sliced along lanes. Key
scale rows are broadcast down their group's tokens (a sublane broadcast, then a tile-aligned
reshape when group % 8 == 0); value scales are per token: each value group's lane column of the
[bt, D/g] block is broadcast across its channels.
Codes are dequantized in f32 (exact), then cast to q's dtype for the MXU; scores, softmax and the
accumulator stay f32 (f32 queries: HIGHEST-precision dots).

Block size: `block_t` tokens per step, from `BLOCK_CODE_BYTES` (64 KiB of key codes per step, at
most `MAX_BLOCK_T` tokens: 2048 for 2-bit D=128, 1024 for 4-bit), a multiple of `group` and of 32 (uint8 sublane
tiles), or all of T when T is smaller. T need not be a multiple of it: the last block is ragged
and its tokens past T are masked like any past lengths[b].

Not checkable without a TPU (the CPU lowering test checks block shapes, not Mosaic's layout
passes): the per-plane dots contract only P = D*bits/8 lanes (32 for 2-bit D=128, below the MXU's
depth); the [bt, P] planes fill P of 128 lanes, so the VPU dequantization, not the DMA, likely
bounds a step at 2 bits; speed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kivi_attention.quantize import codes_per_byte, value_group

LANES = 128
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASK_VALUE - m) is 0, never NaN
BLOCK_CODE_BYTES = 64 << 10  # key codes per grid step (the values move as much again, plus scales)
MAX_BLOCK_T = 2048  # lane-padded [bt, P] f32 planes bound the VMEM temporaries
VMEM_LIMITS = (16 << 20, 64 << 20)  # the default scoped limit .. v7x's 64 MiB per core
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def alignment(group: int) -> int:
  """block_t must be a multiple of this unless it is all of T."""
  return math.lcm(group, 32)


def choose_block_t(t: int, bits: int, head_dim: int, group: int, block_t: int | None = None) -> int:
  """Tokens per grid step: the table's (or `block_t`), aligned down, all of T if T is smaller."""
  align = alignment(group)
  if block_t is None:
    block_t = min(MAX_BLOCK_T, BLOCK_CODE_BYTES // (head_dim * bits // 8))
    block_t = max(align, block_t // align * align)
  elif block_t % align and block_t < t:
    raise ValueError(f"TPU block_t must be a multiple of {align} (group {group}, 32-row uint8 tiles), got {block_t}")
  return min(block_t, t)


def vmem_bytes(m: int, head_dim: int, bits: int, group: int, bt: int, dtype, scale_dtype) -> int:
  """VMEM of one step: double-buffered blocks (lane/sublane padded), scratch and temporaries."""
  planes, p = codes_per_byte(bits), head_dim * bits // 8
  lanes = -(-p // LANES) * LANES
  m8 = -(-m // 8) * 8
  isz, ssz = jnp.dtype(dtype).itemsize, jnp.dtype(scale_dtype).itemsize
  nvg = head_dim // value_group(group, head_dim)
  blocks = (
    planes * m8 * lanes * isz  # q
    + 2 * bt * lanes  # key and value codes
    + 2 * -(-bt // group) * 16 * lanes * ssz  # key scale/min [groups, planes, P]: a tile per group
    + 2 * bt * -(-nvg // LANES) * LANES * ssz  # value scale/min [bt, D/g]
    + planes * m8 * lanes * 4
    + m8 * LANES * 4  # outputs
  )
  scratch = 2 * m8 * LANES * 4 + planes * m8 * lanes * 4
  temporaries = 6 * bt * lanes * 4 + 3 * m8 * bt * 4
  return 2 * blocks + scratch + temporaries


def _expand(x, n: int):
  """A lane-replicated [rows, 128] tile as [rows, n]."""
  if n <= LANES:
    return x[:, :n]
  return jnp.tile(x, (1, -(-n // LANES)))[:, :n]


def _dot(a, b, dims=None):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = dims or (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _key_rows(ref, plane: int, group: int, bt: int):
  """[bt, P] f32: each token's row of the key scale (or min) for `plane`'s channels."""
  rows = ref[:, plane : plane + 1, :].astype(jnp.float32)  # [bt / group, 1, P]
  return jnp.broadcast_to(rows, (rows.shape[0], group, rows.shape[2])).reshape(bt, rows.shape[2])


def _value_cols(x, plane: int, p: int, vg: int):
  """[bt, P]: each token's value scale (or min) for `plane`'s channels, from x [bt, D / vg]."""
  lo, hi = plane * p, (plane + 1) * p
  groups = range(lo // vg, -(-hi // vg))
  pick = lambda g: jnp.broadcast_to(x[:, g : g + 1], (x.shape[0], p))
  out = pick(groups[0])
  if len(groups) > 1:  # the plane spans several value groups: pick each lane's group
    group_of = lax.div(lo + lax.broadcasted_iota(jnp.int32, (1, p), 1), vg)
    for g in groups[1:]:
      out = jnp.where(group_of == g, pick(g), out)
  return out


def _kernel(
  len_ref,
  q_ref,
  kc_ref,
  ks_ref,
  km_ref,
  vc_ref,
  vs_ref,
  vm_ref,
  o_ref,
  lse_ref,
  m_ref,
  l_ref,
  acc_ref,
  *,
  bits,
  group,
  vg,
  bt,
  sm_scale,
  steps,
):
  b, j = pl.program_id(0), pl.program_id(2)
  planes, p = codes_per_byte(bits), kc_ref.shape[-1]
  mask = (1 << bits) - 1
  length = len_ref[b]
  start = j * bt

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    cdt = q_ref.dtype
    kc = kc_ref[...].astype(jnp.int32)
    s = None
    for i in range(planes):
      codes = ((kc >> (i * bits)) & mask).astype(jnp.float32)
      k = codes * _key_rows(ks_ref, i, group, bt) + _key_rows(km_ref, i, group, bt)
      d = _dot(q_ref[i], k.astype(cdt), NT)
      s = d if s is None else s + d
    s = s * sm_scale
    if masked:  # NaN scores from garbage past the length are replaced, not propagated
      s = jnp.where(start + lax.broadcasted_iota(jnp.int32, (1, bt), 1) < length, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    probs = jnp.exp(s - m_next[:, :1])
    l_ref[...] = alpha * l_ref[...] + probs.sum(axis=-1, keepdims=True)
    m_ref[...] = m_next
    probs = probs.astype(cdt)
    vc = vc_ref[...].astype(jnp.int32)
    vs, vm = vs_ref[...].astype(jnp.float32), vm_ref[...].astype(jnp.float32)
    for i in range(planes):
      codes = ((vc >> (i * bits)) & mask).astype(jnp.float32)
      v = codes * _value_cols(vs, i, p, vg) + _value_cols(vm, i, p, vg)
      if masked:  # p is 0 there, but 0 * NaN is not
        v = jnp.where(start + lax.broadcasted_iota(jnp.int32, (bt, 1), 0) < length, v, 0.0)
      acc_ref[i] = _expand(alpha, p) * acc_ref[i] + _dot(probs, v.astype(cdt))

  full = start + bt <= length
  pl.when(full)(lambda: step(False))
  pl.when(jnp.logical_and(start < length, jnp.logical_not(full)))(lambda: step(True))

  @pl.when(j == steps - 1)
  def _finish():
    l = l_ref[...]
    dead = l == 0.0  # lengths[b] == 0: nothing was visible
    l_safe = jnp.where(dead, 1.0, l)
    for i in range(planes):
      o_ref[i] = jnp.where(_expand(dead, p), 0.0, acc_ref[i] / _expand(l_safe, p))
    lse_ref[...] = jnp.where(dead, -jnp.inf, m_ref[...] + jnp.log(l_safe))


def quantized_attention_tpu(
  q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths, *, bits, group, sm_scale, block_t=None, interpret=False
):
  """(out f32 [B, KVH, M, D], lse f32 [B, KVH, M]); shapes as `quantized_attention_reference`."""
  b, kvh, m, d = q.shape
  t, p = k_codes.shape[2], k_codes.shape[3]
  planes, vg = codes_per_byte(bits), value_group(group, d)
  bt = choose_block_t(t, bits, d, group, block_t)
  steps = pl.cdiv(t, bt)
  gb = bt // group
  q_planes = q.reshape(b, kvh, m, planes, p).transpose(0, 1, 3, 2, 4)
  ks = k_scale.reshape(b, kvh, t // group, planes, p)
  km = k_min.reshape(b, kvh, t // group, planes, p)

  def last_needed(b_, lens):  # lax.div: jnp's floor division lowers through sign, which needs a TPU to lower
    return jnp.maximum(lax.div(lens[b_] + bt - 1, bt) - 1, 0)

  def tok_map(b_, h, j, lens):
    return b_, h, jnp.minimum(j, last_needed(b_, lens)), 0

  def group_map(b_, h, j, lens):
    return b_, h, jnp.minimum(j, last_needed(b_, lens)), 0, 0

  head = lambda b_, h, j, lens: (b_, h, 0, 0, 0)
  nvg = d // vg
  planes_block = pl.BlockSpec((None, None, planes, m, p), head)
  codes_block = pl.BlockSpec((None, None, bt, p), tok_map)
  key_scale_block = pl.BlockSpec((None, None, gb, planes, p), group_map)
  value_scale_block = pl.BlockSpec((None, None, bt, nvg), tok_map)
  kernel = functools.partial(_kernel, bits=bits, group=group, vg=vg, bt=bt, sm_scale=float(sm_scale), steps=steps)
  need = vmem_bytes(m, d, bits, group, bt, q.dtype, k_scale.dtype)
  vmem_limit = min(VMEM_LIMITS[1], max(VMEM_LIMITS[0], int(need * 1.25) + (2 << 20)))
  out, lse = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, kvh, steps),
      in_specs=[
        planes_block,
        codes_block,
        key_scale_block,
        key_scale_block,
        codes_block,
        value_scale_block,
        value_scale_block,
      ],
      out_specs=[planes_block, pl.BlockSpec((None, None, m, LANES), lambda b_, h, j, lens: (b_, h, 0, 0))],
      scratch_shapes=[
        pltpu.VMEM((m, LANES), jnp.float32),
        pltpu.VMEM((m, LANES), jnp.float32),
        pltpu.VMEM((planes, m, p), jnp.float32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct((b, kvh, planes, m, p), jnp.float32),
      jax.ShapeDtypeStruct((b, kvh, m, LANES), jnp.float32),
    ],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=vmem_limit
    ),
    interpret=interpret,
    name="kivi_attention",
  )(lengths.astype(jnp.int32), q_planes, k_codes, ks, km, v_codes, v_scale, v_min)
  return out.transpose(0, 1, 3, 2, 4).reshape(b, kvh, m, d), lse[..., 0]
