"""Pallas GPU (Triton) kernel: decode attention over the KIVI-quantized cache, flash-decoding style.

Grid (batch, kv head, split). Split s of a row walks its share of the token blocks, `block_t`
tokens each, with an in-kernel `fori_loop` that stops at lengths[b] (blocks past it are never
loaded); the blocks wholly inside the length run without masks, the one holding lengths[b] in a
second, masked loop (0 or 1 trips). Each split writes its normalized f32 output and log-sum-exp;
`combine` merges the splits in jnp. At decode B x KVH programs (8 for one sequence of an 8-kv-head
model) would leave most of ~132 SMs idle, so T is split until the grid has about
`TARGET_PROGRAMS` programs.

No dequantized tile is formed: the scales move to the small side of each dot. Keys are scaled per
channel per group, and a step (block_t divides the group) lies in one group, so per storage plane
(quantize.py: plane j of a code byte holds channels [j*P, (j+1)*P)) q . k = (q * scale) . codes +
q . min, with the plane's raw codes as the dot's [bt, P] operand. Values are scaled per token per
channel group: per piece of channels inside one plane and one value group, p . v = (p * scale) .
codes + p . min. Codes enter the dots in q's dtype (exact: < 256); f32 queries use IEEE dots
(HIGHEST); softmax and accumulators are f32. Only the masked step touches garbage past lengths[b]:
its scores and value scales are replaced (NaN cannot leak).

Triton tensors have power-of-two dims and `dot` needs every dim >= 16: M is padded to at least 16
query rows (zeros; sliced off), P = D*bits/8 must be a power of two >= 16 (D >= 64 at 2 bits),
block_t a power of two >= 16 dividing the group and T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kivi_attention.quantize import codes_per_byte, value_group

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_DOT_DIM = 16
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs
# bits -> (largest block_t, num_warps, num_stages); block_t is further capped by the group (one key
# scale row per step). Chosen by compiling to cubin for sm_80 and sm_90 at D=128, M=4 (padded to
# 16), bf16, group 32 (tests/test_cubin.py): 1 warp spills, 2 warps take 244-255 registers, 4 warps
# 128 (sm_90) / 168 (sm_80) with no spills and 3.5-6.4 KB of shared memory (2 stages; 3 only add
# shared memory), 8 warps no fewer. 128-token steps (group >= 128) reach 245-255 registers, 64 stay
# at 168. Not timed (no GPU here).
BLOCK_SIZES = {2: (64, 4, 2), 4: (64, 4, 2), 8: (32, 4, 2)}
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def check_shapes(head_dim: int, bits: int) -> None:
  p = head_dim * bits // 8
  if not _pow2(p) or p < MIN_DOT_DIM:
    raise ValueError(
      f"GPU kivi attention needs head_dim * bits / 8 a power of two >= {MIN_DOT_DIM} (Triton dot tiles), "
      f"got head_dim {head_dim} at {bits} bits ({p})"
    )


def choose_block_t(t: int, bits: int, group: int, block_t: int | None = None) -> int:
  """Tokens per loop step: the table's (or `block_t`), at most the largest power of two dividing
  `group` (one key scale row per step), shrunk until it divides T."""
  bt = BLOCK_SIZES[bits][0] if block_t is None else block_t
  if not _pow2(bt) or bt < MIN_DOT_DIM:
    raise ValueError(f"GPU block_t must be a power of two >= {MIN_DOT_DIM}, got {bt}")
  bt = min(bt, group & -group)
  while t % bt:
    bt //= 2
  if bt < MIN_DOT_DIM:
    raise ValueError(f"GPU kivi attention needs group ({group}) and T ({t}) to be multiples of {MIN_DOT_DIM}")
  return bt


def num_splits(batch: int, kv_heads: int, blocks: int) -> int:
  return max(1, min(blocks, -(-TARGET_PROGRAMS // (batch * kv_heads))))


def _dot(a, b, dims=None):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = dims or (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _chunks(head_dim: int, bits: int, group: int) -> list[tuple[int, int, int, int]]:
  """The value channels in pieces that share one storage plane and one value group:
  [(plane, first byte, width, value group)], in channel order."""
  p, vg = head_dim * bits // 8, value_group(group, head_dim)
  w = min(p, vg)
  return [(c * w // p, c * w % p, w, c * w // vg) for c in range(head_dim // w)]


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
  *,
  bits,
  group,
  bt,
  sm_scale,
  blocks_per_split,
  chunks,
):
  b, split = pl.program_id(0), pl.program_id(2)
  planes, p = codes_per_byte(bits), kc_ref.shape[-1]
  mp = q_ref.shape[0]
  mask = (1 << bits) - 1
  length = len_ref[b]
  cdt = q_ref.dtype
  qs = [q_ref[:, pl.ds(i * p, p)].astype(jnp.float32) for i in range(planes)]

  def body(masked: bool):
    def step(j, carry):
      accs, m_prev, l_prev = carry
      t0 = j * bt
      row = lax.div(t0, group)  # bt divides group: one key scale row per block
      kc = kc_ref[pl.ds(t0, bt), :].astype(jnp.int32)
      s = None
      for i in range(planes):
        # q . (c * scale + min) = (q * scale) . c + q . min: the codes enter the dot as they are.
        scale = ks_ref[row, pl.ds(i * p, p)].astype(jnp.float32)[None, :]
        lo = km_ref[row, pl.ds(i * p, p)].astype(jnp.float32)[None, :]
        codes = ((kc >> (i * bits)) & mask).astype(cdt)
        d = _dot((qs[i] * scale).astype(cdt), codes, NT) + (qs[i] * lo).sum(axis=-1, keepdims=True)
        s = d if s is None else s + d
      s = s * sm_scale
      if masked:  # garbage past the length (even NaN) is replaced, not propagated
        s = jnp.where(t0 + jnp.arange(bt)[None, :] < length, s, MASK_VALUE)
      m_next = jnp.maximum(m_prev, s.max(axis=-1))
      alpha = jnp.exp(m_prev - m_next)
      probs = jnp.exp(s - m_next[:, None])
      l_next = alpha * l_prev + probs.sum(axis=-1)
      new = []
      for c, (i, byte0, w, g) in enumerate(chunks):
        # sum_t p * (c * scale + min) = (p * scale) . c + p . min, scales per token.
        scale = vs_ref[pl.ds(t0, bt), g].astype(jnp.float32)
        lo = vm_ref[pl.ds(t0, bt), g].astype(jnp.float32)
        if masked:  # p is 0 there, but 0 * NaN is not
          live = t0 + jnp.arange(bt) < length
          scale, lo = jnp.where(live, scale, 0.0), jnp.where(live, lo, 0.0)
        vc = vc_ref[pl.ds(t0, bt), pl.ds(byte0, w)].astype(jnp.int32)
        codes = ((vc >> (i * bits)) & mask).astype(cdt)
        part = _dot((probs * scale[None, :]).astype(cdt), codes) + (probs * lo[None, :]).sum(axis=-1, keepdims=True)
        new.append(alpha[:, None] * accs[c] + part)
      return tuple(new), m_next, l_next

    return step

  first = split * blocks_per_split
  end = jnp.minimum(first + blocks_per_split, lax.div(length + bt - 1, bt))
  full_end = jnp.maximum(jnp.minimum(end, lax.div(length, bt)), first)
  accs = tuple(jnp.zeros((mp, w), jnp.float32) for _, _, w, _ in chunks)
  carry = (accs, jnp.full((mp,), MASK_VALUE, jnp.float32), jnp.zeros((mp,), jnp.float32))
  carry = lax.fori_loop(first, full_end, body(False), carry)
  accs, m, l = lax.fori_loop(full_end, end, body(True), carry)
  dead = l == 0.0  # no visible token in this split
  l_safe = jnp.where(dead, 1.0, l)
  for acc, (i, byte0, w, _) in zip(accs, chunks):
    o_ref[:, pl.ds(i * p + byte0, w)] = jnp.where(dead[:, None], 0.0, acc / l_safe[:, None])
  lse_ref[...] = jnp.where(dead, -jnp.inf, m + jnp.log(l_safe))


def combine(out, lse):
  """Merge per-split (out [.., S, M, D], lse [.., S, M]) into (out [.., M, D], lse [.., M])."""
  top = jnp.max(lse, axis=-2)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top[..., None, :])  # 0 for empty splits
  total = w.sum(axis=-2)
  alive = total > 0
  out = (out * w[..., None]).sum(axis=-3) / jnp.where(alive, total, 1.0)[..., None]
  return out, jnp.where(alive, top + jnp.log(jnp.where(alive, total, 1.0)), -jnp.inf)


def quantized_attention_gpu(
  q,
  k_codes,
  k_scale,
  k_min,
  v_codes,
  v_scale,
  v_min,
  lengths,
  *,
  bits,
  group,
  sm_scale,
  block_t=None,
  splits=None,
  interpret=False,
):
  """(out f32 [B, KVH, M, D], lse f32 [B, KVH, M]); shapes as `quantized_attention_reference`.

  `splits`: how many parts T is split into (default from `TARGET_PROGRAMS`)."""
  b, kvh, m, d = q.shape
  t = k_codes.shape[2]
  check_shapes(d, bits)
  bt = choose_block_t(t, bits, group, block_t)
  _, warps, stages = BLOCK_SIZES[bits]
  nb = t // bt
  n_splits = min(nb, splits or num_splits(b, kvh, nb))
  per_split = -(-nb // n_splits)
  n_splits = -(-nb // per_split)  # no split left without blocks
  mp = max(MIN_DOT_DIM, _next_pow2(m))
  q = jnp.pad(q, ((0, 0), (0, 0), (0, mp - m), (0, 0)))
  whole = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda b_, h, s: (b_, h, 0, 0))
  kernel = functools.partial(
    _kernel,
    bits=bits,
    group=group,
    bt=bt,
    sm_scale=float(sm_scale),
    blocks_per_split=per_split,
    chunks=_chunks(d, bits, group),
  )
  operands = (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min)
  out, lse = pl.pallas_call(
    kernel,
    grid=(b, kvh, n_splits),
    in_specs=[pl.BlockSpec(lengths.shape, lambda b_, h, s: (0,))] + [whole(a) for a in operands],
    out_specs=[
      pl.BlockSpec((None, None, None, mp, d), lambda b_, h, s: (b_, h, s, 0, 0)),
      pl.BlockSpec((None, None, None, mp), lambda b_, h, s: (b_, h, s, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, kvh, n_splits, mp, d), jnp.float32),
      jax.ShapeDtypeStruct((b, kvh, n_splits, mp), jnp.float32),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    interpret=interpret,
    name="kivi_attention",
  )(lengths.astype(jnp.int32), *operands)
  if n_splits > 1:
    out, lse = combine(out, lse)
  else:
    out, lse = out[:, :, 0], lse[:, :, 0]
  return out[:, :, :m], lse[:, :, :m]
