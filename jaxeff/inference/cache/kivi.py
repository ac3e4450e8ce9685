"""KIVI: a 2/4-bit KV cache with a full-precision residual of the newest tokens.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache": keys have
outlier channels, so they are quantized per channel (one scale and minimum per channel per group
of `group` tokens); values per token; the newest tokens stay in full precision until a whole group
of them can be quantized. Storage format: `pallas_kernels.kivi_attention.quantize`.

Layout per layer: quantized keys and values for slots 0..T-1 (slot = position; codes [B, KVH, T,
D*bits/8], key scales/minimums [B, KVH, T/group, D], value ones [B, KVH, T, D/g]) and a ring of
`residual` full-precision keys and values [B, KVH, R, D] (position p in slot p mod R). Two
per-row counters shared by all layers: `quantized` [B] (positions 0..quantized-1 live in the
quantized part, a multiple of `group`) and `end` [B] (the next position; end - quantized <= R).

A chunk at positions end.. attends over the quantized part (`pallas_kernels.kivi_attention`'s op:
the Pallas kernel on TPU/GPU, the XLA path on CPU; every quantized token precedes every query) and,
through the model's registry implementation, over the ring plus itself (causal); the two are
merged by log-sum-exp. Then the oldest whole groups are quantized until at most R tokens remain in
full precision. A prompt read in one chunk is attended in full precision, as the paper's prefill,
and quantized afterwards.

Versus the paper: keys and values leave the residual together, a group at a time, so between
R - group + 1 and R of the newest tokens are full precision for both (the paper keeps exactly R
values and 0..R-1 keys).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxeff.errors import GenerationError
from jaxeff.inference.cache.base import (
  CACHE_AXES,
  ROW_AXES,
  Buffer,
  CachePolicy,
  cache_dtype,
  hide_empty,
  merge_attention,
)
from jaxeff.sharding import constrain
from pallas_kernels.kivi_attention import quantize_keys, quantize_values
from pallas_kernels.kivi_attention import quantized_attention as quantized_attention_op
from pallas_kernels.kivi_attention.quantize import check_format, codes_per_byte, value_group


def quantized_slots(length: int, group: int) -> int:
  """Quantized slots for `length` positions: whole groups."""
  return -(-length // group) * group


def _put_if(go, buf, new, at):
  """`buf` with `new` written at `at` when `go`, else unchanged (always one in-place slice)."""
  old = jax.lax.dynamic_slice(buf, at, new.shape)
  return jax.lax.dynamic_update_slice(buf, jnp.where(go, new.astype(buf.dtype), old), at)


@dataclasses.dataclass(frozen=True)
class KIVI(CachePolicy):
  """Low-bit cache (KIVI): keys quantized per channel over groups of `group` tokens, values per
  token, to `bits` bits; the newest `residual` tokens (at least residual - group + 1) stay in full
  precision. Every token is kept, in about bits/16 of a 16-bit cache's bytes plus scales.

  With a driver, `max_seq_len` is the positions per row, as with the dense cache; a prompt of up to
  `prefill_chunk` tokens is prefilled in one chunk in full precision, then quantized (the paper's
  prefill).

  Args:
    bits: 2 or 4 (8 also works).
    group: tokens per key scale, channels per value scale (the paper: 32).
    residual: full-precision tokens, a multiple of `group` (the paper: 128).
    prefill_chunk: longer prompts are read in chunks of this many tokens (each attends in full
      precision to itself and the residual, to the older tokens quantized), which bounds prefill's
      attention memory.
    impl, interpret: the quantized-attention op's implementation
      (`pallas_kernels.kivi_attention.quantized_attention`; default: the Pallas kernel on TPU and
      GPU, the XLA path on CPU).
  """

  bits: int = 2
  group: int = 32
  residual: int = 128
  prefill_chunk: int = 2048
  impl: str | None = None
  interpret: bool = False

  name = "KIVI"
  layer_resets = (None,) * 8
  row_resets = (0, 0)

  def __post_init__(self):
    if self.prefill_chunk < 1:
      raise GenerationError(f"KIVI's prefill_chunk must be >= 1, got {self.prefill_chunk}")
    if self.bits not in (2, 4, 8) or self.group < 1 or self.residual < self.group or self.residual % self.group:
      raise GenerationError(
        f"KIVI needs bits in (2, 4, 8), group >= 1 and residual a positive multiple of group, got "
        f"bits={self.bits}, group={self.group}, residual={self.residual}"
      )

  def layer_buffers(self, cfg, batch_size, length):
    try:
      check_format(self.bits, self.group, cfg.head_dim)
    except ValueError as e:
      raise GenerationError(str(e)) from None
    dtype = cache_dtype(cfg)
    b, h, d = batch_size, cfg.num_kv_heads, cfg.head_dim
    t = quantized_slots(length, self.group)
    codes = (b, h, t, d // codes_per_byte(self.bits))
    keys_per_group = (b, h, t // self.group, d)
    values_per_token = (b, h, t, d // value_group(self.group, d))
    ring = (b, h, self.residual, d)
    return tuple(
      Buffer(shape, 0, dt, CACHE_AXES)
      for shape, dt in (
        (codes, jnp.uint8),
        (keys_per_group, dtype),
        (keys_per_group, dtype),
        (codes, jnp.uint8),
        (values_per_token, dtype),
        (values_per_token, dtype),
        (ring, dtype),
        (ring, dtype),
      )
    )

  def row_buffers(self, cfg, batch_size, length):
    return (Buffer((batch_size,), 0, jnp.int32, ROW_AXES),) * 2

  def begin(self, cache, positions, *, rope=None, tree=None, partial=False):
    super().begin(cache, positions, tree=tree, partial=partial)
    quantized, end = cache.rows
    new_end = jnp.maximum(end, jnp.max(positions, axis=1) + 1)
    over = jnp.maximum(new_end - self.residual, 0)
    new_quantized = jnp.maximum(quantized, -(-over // self.group) * self.group)
    return positions, (quantized, end, new_quantized, new_end)

  def finish(self, cache, layers, step):
    _, (_, _, quantized, end) = step
    return cache.replace(layers=layers, rows=(constrain(quantized, ROW_AXES), constrain(end, ROW_AXES)))

  def attend(self, step, q, k, v, rope, layer, attention):
    attention.require("lse", "the KIVI cache (quantized and full-precision parts merged)")
    positions, (quantized, end, new_quantized, new_end) = step
    kc, ks, km, vc, vs, vm, rk, rv = layer
    q, k = rope.apply(q), rope.apply(k)
    b, c, h, d = q.shape
    kvh, r = rk.shape[1], rk.shape[2]
    g = h // kvh
    group = self.group
    # Quantized part: every token there precedes every query of the chunk.
    qg = q.reshape(b, c, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, C, D]
    out_q, lse_q = quantized_attention_op(
      qg.reshape(b, kvh, g * c, d), kc, ks, km, vc, vs, vm, quantized,
      bits=self.bits, group=group, sm_scale=float(d) ** -0.5, impl=self.impl, interpret=self.interpret,
    )  # fmt: skip
    out_q = out_q.reshape(b, kvh, g, c, d).transpose(0, 3, 1, 2, 4).reshape(b, c, h, d)
    lse_q = lse_q.reshape(b, kvh, g, c).transpose(0, 3, 1, 2).reshape(b, c, h)
    # Full-precision part: the ring (positions quantized..end-1) and the chunk, causal by position.
    slot = jnp.arange(r, dtype=jnp.int32)[None]
    ring_pos = quantized[:, None] + (slot - quantized[:, None]) % r  # [B, R]
    ring_pos = jnp.where(ring_pos < end[:, None], ring_pos, -1)
    k_new, v_new = (x.transpose(0, 2, 1, 3).astype(rk.dtype) for x in (k, v))  # [B, KVH, C, D]
    keys = jnp.concatenate([rk, k_new], axis=2)
    values = jnp.concatenate([rv, v_new], axis=2)
    kpos = jnp.concatenate([ring_pos, positions], axis=1)  # [B, R + C]
    part = attention(
      q,
      keys.transpose(0, 2, 1, 3),
      values.transpose(0, 2, 1, 3),
      q_positions=positions,
      kv_positions=hide_empty(kpos),
      return_lse=True,
    )
    out, _ = merge_attention(out_q.astype(part.out.dtype), lse_q, part.out, part.lse)

    # Pending full-precision tokens in position order: index i holds position quantized + i.
    i = jnp.arange(r + c, dtype=jnp.int32)[None]
    pos_i = quantized[:, None] + i
    from_ring = pos_i < end[:, None]
    src = jnp.where(from_ring, pos_i % r, r + jnp.clip(pos_i - end[:, None], 0, c - 1))  # [B, R + C]
    pending_k = jnp.take_along_axis(keys, src[:, None, :, None], axis=2)
    pending_v = jnp.take_along_axis(values, src[:, None, :, None], axis=2)
    # Whole groups leave for the quantized part: quantize every candidate group, write the leaving ones.
    groups = -(-(r + c) // group)
    pad4 = ((0, 0), (0, 0), (0, groups * group - (r + c)), (0, 0))
    qk = quantize_keys(jnp.pad(pending_k, pad4), self.bits, group, dtype=ks.dtype)
    qv = quantize_values(jnp.pad(pending_v, pad4), self.bits, group, dtype=vs.dtype)
    leaving = (new_quantized - quantized) // group  # [B] groups
    if c == 1:
      # Decode: at most one group leaves; one in-place slice per row and array, the old content where none.
      for row in range(b):
        go = leaving[row] > 0
        tok, grp = quantized[row], quantized[row] // group
        kc, vc, vs, vm = (
          _put_if(go, buf, new[row : row + 1, :, :group], (row, 0, tok, 0))
          for buf, new in ((kc, qk[0]), (vc, qv[0]), (vs, qv[1]), (vm, qv[2]))
        )
        ks, km = (
          _put_if(go, buf, new[row : row + 1, :, :1], (row, 0, grp, 0)) for buf, new in ((ks, qk[1]), (km, qk[2]))
        )
    else:
      rows = jnp.arange(b)[:, None]
      t = kc.shape[2]
      tok_idx = jnp.arange(groups * group, dtype=jnp.int32)[None]
      tok_slot = jnp.where(tok_idx < leaving[:, None] * group, quantized[:, None] + tok_idx, t)
      grp_idx = jnp.arange(groups, dtype=jnp.int32)[None]
      grp_slot = jnp.where(grp_idx < leaving[:, None], quantized[:, None] // group + grp_idx, t // group)
      put = lambda buf, new, at: buf.at[rows, :, at].set(new.transpose(0, 2, 1, 3), mode="drop")
      kc, vc, vs, vm = (put(buf, new, tok_slot) for buf, new in ((kc, qk[0]), (vc, qv[0]), (vs, qv[1]), (vm, qv[2])))
      ks, km = (put(buf, new, grp_slot) for buf, new in ((ks, qk[1]), (km, qk[2])))
    # The ring keeps positions new_quantized..new_end-1, position p in slot p mod R.
    ring_src = (new_quantized - quantized)[:, None] + (slot - new_quantized[:, None]) % r  # pending index
    ring_src = jnp.clip(ring_src, 0, r + c - 1)
    rk = jnp.take_along_axis(pending_k, ring_src[:, None, :, None], axis=2)
    rv = jnp.take_along_axis(pending_v, ring_src[:, None, :, None], axis=2)
    layer = tuple(constrain(x, CACHE_AXES) for x in (kc, ks, km, vc, vs, vm, rk, rv))
    return out.astype(q.dtype), layer

  def max_chunk(self, length):
    return self.prefill_chunk

  def describe(self, batch_size, length):
    return f"{batch_size} x {length} positions at {self.bits} bits, {self.residual} newest in full precision, KIVI"

  def as_filled(self, cache, context):
    quantized = -(-(context - self.residual) // self.group) * self.group
    rows = tuple(jnp.full_like(x, value) for x, value in zip(cache.rows, (quantized, context)))
    return cache.replace(rows=rows)
