"""XLA path (used on CPU, where interpret mode is for correctness only): the same block lists,
with the listed key blocks gathered so each query block attends to [maxb * block_kv] keys.

Work and memory scale with the listed blocks, not with S x T: for a mask that skips 90% of the
blocks this computes about a tenth of dense attention's scores. Backward: recompute the
probabilities from the saved log-sum-exp (flash style), dq directly, dk/dv as the transpose
(scatter-add) of the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.block_lists import (
  DEAD_LSE,
  FLAG_BITS,
  MASK_VALUE,
  SELECTED,
  BlockSizes,
  token_visible,
)

# The XLA path has no per-step overhead, so smaller blocks (less masked work) pay off; 64 measured
# faster than 128 at 4k-8k on the 2-core CPU (BENCHMARKS.md).
DEFAULT_BLOCK_SIZES = BlockSizes(block_q=64, block_kv=64)


def _gather_blocks(x, ids, bk: int):
  """x [B, KVH, T', D], ids [B, KVH, nq, maxb] -> [B, KVH, nq, maxb, bk, D]."""
  b, kvh, t, d = x.shape
  x = x.reshape(b, kvh, t // bk, bk, d)
  return jax.vmap(jax.vmap(lambda xb, i: xb[i]))(x, ids)


def _setup(pb, q, k, kv_pos, q_pos, lists):
  b, h, s, d = q.shape
  kvh, t = k.shape[1], k.shape[2]
  bq, bk = pb.block_q, pb.block_kv
  nq, nk = s // bq, t // bk
  ids = jnp.broadcast_to(lists.ids, (b, kvh, *lists.ids.shape[2:]))
  counts = jnp.broadcast_to(lists.counts, (b, kvh, nq))
  kb = ids >> FLAG_BITS
  maxb = kb.shape[-1]
  kv_pos_b = jnp.broadcast_to(kv_pos, (b, t)).reshape(b, nk, bk)
  kp = jax.vmap(lambda p, i: p[i])(kv_pos_b, kb)  # [B, KVH, nq, maxb, bk]
  qp = jnp.broadcast_to(q_pos, (b, s)).reshape(b, 1, 1, nq, bq, 1, 1)
  key_idx = kb[..., None] * bk + jnp.arange(bk)
  entry_ok = (jnp.arange(maxb) < counts[..., None])[..., None]
  selected = ((ids & SELECTED) != 0)[..., None]
  vis = token_visible(pb.mask, qp, kp[:, :, None, :, None], selected[:, :, None, :, None])
  vis = vis & (entry_ok & (key_idx < pb.seq_kv))[:, :, None, :, None]  # [B, KVH, 1|G, nq, bq, maxb, bk]
  return kb, vis


def _scores(pb, q, kg, vis):
  b, h, s, d = q.shape
  kvh = kg.shape[1]
  qg = q.reshape(b, kvh, pb.groups, s // pb.block_q, pb.block_q, d)
  sc = jnp.einsum("bkgiqd,bkijtd->bkgiqjt", qg, kg, preferred_element_type=jnp.float32) * (d**-0.5)
  return jnp.where(vis, sc, MASK_VALUE)


def forward(pb, q, k, v, sink, q_pos, kv_pos, lists):
  """(out [B, H, S', D] in q.dtype, lse [B, H, S'] f32)."""
  b, h, s, d = q.shape
  kb, vis = _setup(pb, q, k, kv_pos, q_pos, lists)
  kg, vg = _gather_blocks(k, kb, pb.block_kv), _gather_blocks(v, kb, pb.block_kv)
  sc = _scores(pb, q, kg, vis)
  m = sc.max(axis=(-2, -1))
  if sink is not None:
    sink_g = sink.astype(jnp.float32).reshape(1, k.shape[1], pb.groups, 1, 1)
    m = jnp.maximum(m, sink_g)
  p = jnp.where(vis, jnp.exp(sc - m[..., None, None]), 0.0)
  l = p.sum(axis=(-2, -1))
  if sink is not None:
    l = l + jnp.exp(sink_g - m)
  o = jnp.einsum("bkgiqjt,bkijtd->bkgiqd", p.astype(v.dtype), vg, preferred_element_type=jnp.float32)
  dead = l == 0
  o = jnp.where(dead[..., None], 0.0, o / jnp.where(dead, 1.0, l)[..., None])
  lse = jnp.where(dead, DEAD_LSE, m + jnp.log(jnp.where(dead, 1.0, l)))
  return o.reshape(b, h, s, d).astype(q.dtype), lse.reshape(b, h, s)


def backward(pb, q, k, v, sink, q_pos, kv_pos, lists, out, lse, d_out, delta):
  """(dq, dk, dv) given dO and delta = rowsum(dO * O) [B, H, S']."""
  del sink, out
  b, h, s, d = q.shape
  kvh = k.shape[1]
  nq, bq, g = s // pb.block_q, pb.block_q, pb.groups
  kb, vis = _setup(pb, q, k, kv_pos, q_pos, lists)
  kg, vg = _gather_blocks(k, kb, pb.block_kv), _gather_blocks(v, kb, pb.block_kv)
  # dk/dv: the transpose of the gather (a scatter-add), accumulated in f32.
  scatter = jax.linear_transpose(
    lambda x: _gather_blocks(x, kb, pb.block_kv), jax.ShapeDtypeStruct(k.shape, jnp.float32)
  )
  sc = _scores(pb, q, kg, vis)
  shape6 = (b, kvh, g, nq, bq)
  p = jnp.exp(sc - lse.reshape(shape6)[..., None, None])  # masked scores give exactly 0
  do = d_out.reshape(*shape6, d)
  dvg = jnp.einsum("bkgiqjt,bkgiqd->bkijtd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dp = jnp.einsum("bkgiqd,bkijtd->bkgiqjt", do, vg, preferred_element_type=jnp.float32)
  ds = p * (dp - delta.reshape(shape6)[..., None, None]) * (d**-0.5)
  qg = q.reshape(*shape6, d)
  dq = jnp.einsum("bkgiqjt,bkijtd->bkgiqd", ds.astype(k.dtype), kg, preferred_element_type=jnp.float32)
  dkg = jnp.einsum("bkgiqjt,bkgiqd->bkijtd", ds.astype(q.dtype), qg, preferred_element_type=jnp.float32)
  (dk,), (dv,) = scatter(dkg), scatter(dvg)
  return dq.reshape(b, h, s, d).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
