"""A 2/4-bit KV cache with a full-precision residual (KIVI's layout).

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
in full precision, over the ring plus itself (causal); the two are merged by log-sum-exp. Then the
oldest whole groups are quantized until at most R tokens remain in full precision. A prompt read
in one chunk is attended in full precision, as the paper's prefill, and quantized afterwards.

Versus the paper: keys and values leave the residual together, a group at a time, so between
R - group + 1 and R of the newest tokens are full precision for both (the paper keeps exactly R
values and 0..R-1 keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxeff.models.attention import _MASKED
from jaxeff.models.kv_cache import CACHE_AXES, cache_dtype, layer_buffers
from jaxeff.sharding import BATCH, constrain
from pallas_kernels.kivi_attention import merge, quantize_keys, quantize_values
from pallas_kernels.kivi_attention import quantized_attention as quantized_attention_op
from pallas_kernels.kivi_attention.quantize import check_format, codes_per_byte, value_group

ROW_AXES = (BATCH,)


@struct.dataclass
class KIVICache:
  """Quantized keys/values and the full-precision residual ring per layer (tuples of per-layer
  arrays or stacked with a leading layer axis), and the per-row counters."""

  k_codes: tuple[jax.Array, ...] | jax.Array
  k_scale: tuple[jax.Array, ...] | jax.Array
  k_min: tuple[jax.Array, ...] | jax.Array
  v_codes: tuple[jax.Array, ...] | jax.Array
  v_scale: tuple[jax.Array, ...] | jax.Array
  v_min: tuple[jax.Array, ...] | jax.Array
  residual_k: tuple[jax.Array, ...] | jax.Array
  residual_v: tuple[jax.Array, ...] | jax.Array
  quantized: jax.Array  # [B] int32
  end: jax.Array  # [B] int32
  bits: int = struct.field(pytree_node=False)
  group: int = struct.field(pytree_node=False)
  residual: int = struct.field(pytree_node=False)
  impl: str | None = struct.field(pytree_node=False, default=None)  # the quantized-attention op's
  interpret: bool = struct.field(pytree_node=False, default=False)

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k_codes, (tuple, list))

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def layers(self):
    return (
      self.k_codes,
      self.k_scale,
      self.k_min,
      self.v_codes,
      self.v_scale,
      self.v_min,
      self.residual_k,
      self.residual_v,
    )

  def with_layers(self, layers):
    names = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "residual_k", "residual_v")
    return self.replace(**dict(zip(names, layers)))


def check_settings(cfg, bits: int, group: int, residual: int) -> None:
  check_format(bits, group, cfg.head_dim)
  if residual < group or residual % group:
    raise ValueError(f"KIVI's residual must be a positive multiple of the group {group}, got {residual}")


def quantized_slots(length: int, group: int) -> int:
  """Quantized slots for `length` positions: whole groups."""
  return -(-length // group) * group


def init_kivi_cache(
  cfg, batch_size: int, length: int, *, bits: int, group: int, residual: int, dtype=None, impl=None, interpret=False
) -> KIVICache:
  """An empty cache for `length` positions per row; `impl`/`interpret` choose the quantized-attention
  op's implementation (`pallas_kernels.kivi_attention.quantized_attention`; default by backend)."""
  check_settings(cfg, bits, group, residual)
  dtype = cache_dtype(cfg) if dtype is None else jnp.dtype(dtype)
  b, h, d = batch_size, cfg.num_kv_heads, cfg.head_dim
  t = quantized_slots(length, group)
  shapes = (
    ((b, h, t, d // codes_per_byte(bits)), jnp.uint8),
    ((b, h, t // group, d), dtype),
    ((b, h, t // group, d), dtype),
    ((b, h, t, d // codes_per_byte(bits)), jnp.uint8),
    ((b, h, t, d // value_group(group, d)), dtype),
    ((b, h, t, d // value_group(group, d)), dtype),
    ((b, h, residual, d), dtype),
    ((b, h, residual, d), dtype),
  )

  rows = constrain(jnp.zeros((b,), jnp.int32), ROW_AXES)
  arrays = (layer_buffers(cfg, shape, 0, dt, CACHE_AXES) for shape, dt in shapes)
  return KIVICache(*arrays, rows, rows, bits=bits, group=group, residual=residual, impl=impl, interpret=interpret)


def advance(cache: KIVICache, positions):
  """(quantized, end) after a chunk at `positions` [B, C] (negative: padding): at most `residual`
  tokens stay in full precision, whole groups leave."""
  end = jnp.maximum(cache.end, jnp.max(positions, axis=1) + 1)
  over = jnp.maximum(end - cache.residual, 0)
  quantized = jnp.maximum(cache.quantized, -(-over // cache.group) * cache.group)
  return quantized, end


def kivi_attention(q, k_new, v_new, positions, layer, counters, *, bits: int, group: int, impl=None, interpret=False):
  """One layer's attention for a chunk through the KIVI cache, and the layer after it.

  q [B, C, H, D], k_new/v_new [B, C, KVH, D] (rotated at their positions), positions [B, C]: each
  row's positions end.. (negative: padding). layer: `KIVICache.layers()` of one layer.
  counters: (quantized, end, new_quantized, new_end), [B] each. Returns (out [B, C, H, D], layer)."""
  kc, ks, km, vc, vs, vm, rk, rv = layer
  quantized, end, new_quantized, new_end = counters
  b, c, h, d = q.shape
  kvh, r = rk.shape[1], rk.shape[2]
  g = h // kvh
  qg = q.reshape(b, c, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, C, D]
  scale = float(d) ** -0.5
  # Quantized part: every token there precedes every query of the chunk.
  out_q, lse_q = quantized_attention_op(
    qg.reshape(b, kvh, g * c, d), kc, ks, km, vc, vs, vm, quantized,
    bits=bits, group=group, sm_scale=scale, impl=impl, interpret=interpret,
  )  # fmt: skip
  # Full-precision part: the ring (positions quantized..end-1) and the chunk, causal by position.
  slot = jnp.arange(r, dtype=jnp.int32)[None]
  ring_pos = quantized[:, None] + (slot - quantized[:, None]) % r  # [B, R]
  ring_pos = jnp.where(ring_pos < end[:, None], ring_pos, -1)
  k_new_t, v_new_t = (x.transpose(0, 2, 1, 3).astype(rk.dtype) for x in (k_new, v_new))  # [B, KVH, C, D]
  keys = jnp.concatenate([rk, k_new_t], axis=2)
  values = jnp.concatenate([rv, v_new_t], axis=2)
  kpos = jnp.concatenate([ring_pos, positions], axis=1)  # [B, R + C]
  s = jnp.einsum("bkgcd,bktd->bkgct", qg, keys, preferred_element_type=jnp.float32) * scale
  qp, kp = positions[:, None, None, :, None], kpos[:, None, None, None, :]
  visible = (kp >= 0) & (kp <= qp) & (qp >= 0)
  s = jnp.where(visible, s, _MASKED)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - m), 0.0)
  denom = jnp.sum(p, axis=-1)
  out_r = jnp.einsum("bkgct,bktd->bkgcd", p, values.astype(jnp.float32)) / jnp.maximum(denom, 1e-30)[..., None]
  lse_r = jnp.where(denom > 0, m[..., 0] + jnp.log(jnp.maximum(denom, 1e-30)), -jnp.inf)
  out, _ = merge(out_q.reshape(b, kvh, g, c, d), lse_q.reshape(b, kvh, g, c), out_r, lse_r)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, c, h, d).astype(q.dtype)

  # Pending full-precision tokens in position order: index i holds position quantized + i.
  i = jnp.arange(r + c, dtype=jnp.int32)[None]
  pos_i = quantized[:, None] + i
  from_ring = pos_i < end[:, None]
  src = jnp.where(from_ring, pos_i % r, r + jnp.clip(pos_i - end[:, None], 0, c - 1))  # [B, R + C]
  pending_k = jnp.take_along_axis(keys, src[:, None, :, None], axis=2)
  pending_v = jnp.take_along_axis(values, src[:, None, :, None], axis=2)
  # Whole groups leave for the quantized part: quantize every candidate group, write the leaving ones.
  groups = -(-(r + c) // group)
  pad = groups * group - (r + c)
  pad4 = ((0, 0), (0, 0), (0, pad), (0, 0))
  qk = quantize_keys(jnp.pad(pending_k, pad4), bits, group, dtype=ks.dtype)
  qv = quantize_values(jnp.pad(pending_v, pad4), bits, group, dtype=vs.dtype)
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
  return out, layer


def _put_if(go, buf, new, at):
  """`buf` with `new` written at `at` when `go`, else unchanged (always one in-place slice)."""
  old = jax.lax.dynamic_slice(buf, at, new.shape)
  return jax.lax.dynamic_update_slice(buf, jnp.where(go, new.astype(buf.dtype), old), at)


def reset(cache: KIVICache) -> KIVICache:
  """An empty cache (a new request); the buffers are reused."""
  return cache.replace(quantized=jnp.zeros_like(cache.quantized), end=jnp.zeros_like(cache.end))
