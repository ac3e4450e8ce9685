"""`sparse_attention`: the public op; picks an implementation by backend and runs it per shard.

  backend  default impl  notes
  tpu      "tpu"         Pallas Mosaic kernels (tpu.py)
  gpu      "gpu"         Pallas Triton kernels (gpu.py)
  cpu      "cpu"         the XLA block-gather path (cpu.py); with interpret=... the "tpu" kernels run
                         in the Pallas interpreter instead (tests, debugging)

`impl=` forces one of IMPLS ("reference" is the dense definition in reference.py).

Every call: validate, pad the sequences to whole blocks, build the block lists (block_lists.py),
run forward (and, under autodiff, backward) through one custom VJP, all inside `shard_kernel`
(a Mosaic kernel is never partitioned automatically), split over batch and heads.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.sharding import shard_kernel
from pallas_kernels.sparse_attention import block_lists as bl
from pallas_kernels.sparse_attention import cpu, gpu, reference, tpu
from pallas_kernels.sparse_attention.block_lists import BlockSizes, Mask, Problem

IMPLS = ("tpu", "gpu", "cpu", "reference")
_KERNELS = {"tpu": tpu, "gpu": gpu, "cpu": cpu}
DEFAULT_BLOCK_SIZES = {
  "tpu": tpu.DEFAULT_BLOCK_SIZES,
  "gpu": gpu.DEFAULT_BLOCK_SIZES,
  "cpu": cpu.DEFAULT_BLOCK_SIZES,
  "reference": cpu.DEFAULT_BLOCK_SIZES,
}


def default_impl(interpret=False) -> str:
  backend = jax.default_backend()
  if backend in ("tpu", "gpu"):
    return backend
  return "tpu" if interpret else "cpu"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def resolve_block_sizes(impl: str, seq_q: int, seq_kv: int, block_sizes: BlockSizes | None) -> BlockSizes:
  """The impl's defaults (or `block_sizes`), shrunk for short sequences and checked for the backend.

  Shrinking only happens when a sequence fits in one block, so it never changes what a
  `block_indices` entry means.
  """
  bs = block_sizes or DEFAULT_BLOCK_SIZES[impl]
  bq, bk = bs.block_q, bs.block_kv
  if impl == "tpu":  # Mosaic: second-minor block dims multiple of 8, lane dims multiple of 128
    if bq % 8 or bk % 128:
      raise ValueError(f"TPU sparse_attention needs block_q % 8 == 0 and block_kv % 128 == 0, got {bs}")
    bq, bk = min(bq, _round_up(seq_q, 8)), min(bk, _round_up(seq_kv, 128))
  elif impl == "gpu":  # Triton: power-of-two tiles, dot dims >= 16
    for name, b in (("block_q", bq), ("block_kv", bk)):
      if b < 16 or b & (b - 1):
        raise ValueError(f"GPU sparse_attention needs power-of-two {name} >= 16, got {b}")
    bq = min(bq, max(16, _next_pow2(seq_q)))
    bk = min(bk, max(16, _next_pow2(seq_kv)))
    sub = min(bs.block_q_dkv or bq, bq)
    if sub < 16 or sub & (sub - 1):
      raise ValueError(f"GPU sparse_attention needs power-of-two block_q_dkv >= 16, got {sub}")
    return BlockSizes(bq, bk, bs.num_warps, bs.num_stages, sub, bs.num_stages_dkv)
  else:
    bq, bk = min(bq, seq_q), min(bk, seq_kv)
  return BlockSizes(bq, bk, bs.num_warps, bs.num_stages)


def _positions(pos, batch: int, length: int, name: str):
  """[S] or [B, S] ints -> [S] (shared by the batch) or [B, S], int32."""
  pos = jnp.asarray(pos)
  if not jnp.issubdtype(pos.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers, got {pos.dtype}")
  if pos.ndim == 2 and pos.shape[0] == 1:
    pos = pos[0]
  if pos.shape not in ((length,), (batch, length)):
    raise ValueError(f"{name} must have shape [{length}] or [{batch}, {length}], got {pos.shape}")
  return pos.astype(jnp.int32)


def sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  causal: bool = True,
  window: int | None = None,
  sinks: int = 0,
  block_indices: jax.Array | None = None,
  sink_logits: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  block_sizes: BlockSizes | None = None,
  interpret: Any = False,
  impl: str | None = None,
  batch_axes=("data", "fsdp"),
  head_axes="tensor",
  mesh=None,
) -> jax.Array:
  """Block-sparse softmax attention; blocks outside the mask are never loaded.

  Args:
    q: [batch, heads, seq_q, d]; scores are scaled by 1/sqrt(d).
    k, v: [batch, kv_heads, seq_kv, d]; query head h reads kv head h // (heads // kv_heads).
    causal: keys at later positions are hidden.
    window: sliding window of W tokens: query i sees keys j with i - W < j <= i.
    sinks: the first `sinks` positions (StreamingLLM attention sinks) are always visible (still causal).
    block_indices: [batch, kv_heads, ceil(seq_q / block_q), k] ints: key blocks (of
      `block_sizes.block_kv` keys) each query block also sees, shared by a kv head's query heads
      (NSA's top-k selection; see `topk_block_indices`). Entries < 0 or >= the block count are
      padding. window, sinks and block_indices combine as a union; with none of them, every
      (causal) key is visible.
    sink_logits: [heads] learned per-head logits that join the softmax denominator (no value).
    q_positions, kv_positions: [seq] or [batch, seq] ints, default 0..n-1; with a KV cache, the
      cache's positions (decode: seq_q small).
    block_sizes: `BlockSizes`; default per implementation (tpu.py / gpu.py / cpu.py).
    interpret: False, True or `pltpu.InterpretParams(...)`: run the Pallas kernel in the
      interpreter (works on CPU).
    impl: one of IMPLS to force an implementation; None picks by backend (module docstring).
    batch_axes, head_axes: mesh axes the batch and head dimensions may be split over (the
      caller's logical-axis rules); axes that do not divide are dropped.
    mesh: default the context mesh (`jax.set_mesh`); without one the kernel runs unsplit.
  Returns:
    [batch, heads, seq_q, d] in q.dtype. A query that sees no key gets zeros.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, heads, seq, d], got {q.shape}, {k.shape}, {v.shape}")
  b, h, s, d = q.shape
  kvh, t = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k and v must be [{b}, kv_heads, seq_kv, {d}] and equal, got {k.shape}, {v.shape}")
  if kvh == 0 or h % kvh:
    raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kvh})")
  if not jnp.issubdtype(q.dtype, jnp.floating) or not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share one floating-point dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window must be a positive int or None, got {window!r}")
  if not isinstance(sinks, int) or sinks < 0:
    raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
  impl = impl or default_impl(interpret)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  bs = resolve_block_sizes(impl, s, t, block_sizes)
  nq = -(-s // bs.block_q)
  operands, dims = [q, k, v], ["bhsd", "bgtd", "bgtd"]
  if block_indices is not None:
    if block_indices.ndim != 4 or block_indices.shape[:3] != (b, kvh, nq):
      raise ValueError(
        f"block_indices must be [{b}, {kvh}, {nq}, k] (batch, kv_heads, query blocks of "
        f"{bs.block_q}, k), got {block_indices.shape}"
      )
    if not jnp.issubdtype(block_indices.dtype, jnp.integer):
      raise ValueError(f"block_indices must be integers, got {block_indices.dtype}")
    operands.append(block_indices.astype(jnp.int32))
    dims.append("bgij")
  if sink_logits is not None:
    if sink_logits.shape != (h,):
      raise ValueError(f"sink_logits must be [{h}] (one per query head), got {sink_logits.shape}")
    operands.append(sink_logits)
    dims.append("h")
  explicit = q_positions is not None or kv_positions is not None
  if explicit:
    qp = jnp.arange(s, dtype=jnp.int32) if q_positions is None else _positions(q_positions, b, s, "q_positions")
    kp = jnp.arange(t, dtype=jnp.int32) if kv_positions is None else _positions(kv_positions, b, t, "kv_positions")
    operands += [qp, kp]
    dims += ["bs"[2 - qp.ndim :], "bt"[2 - kp.ndim :]]
  mask = Mask(bool(causal), window, sinks, block_indices is not None)
  pb = Problem(
    mask,
    s,
    t,
    bs.block_q,
    bs.block_kv,
    h // kvh,
    bs.num_warps,
    bs.num_stages,
    bs.block_q_dkv,
    bs.num_stages_dkv,
    interpret,
  )
  flags = (block_indices is not None, sink_logits is not None, explicit)
  axes = (("b", batch_axes), ("h", head_axes), ("g", head_axes))
  return _sharded(tuple(operands), pb=pb, impl=impl, flags=flags, dims=tuple(dims), axes=axes, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("pb", "impl", "flags", "dims", "axes", "mesh"))
def _sharded(operands, *, pb, impl, flags, dims, axes, mesh):
  local = functools.partial(_local_attention, pb, impl, *flags)
  return shard_kernel(local, *operands, in_dims=dims, out_dims="bhsd", axes=dict(axes), mesh=mesh)


def _local_attention(pb: Problem, impl: str, has_indices: bool, has_sink: bool, explicit: bool, q, k, v, *rest):
  """One shard: pad, build the block lists, run the custom-VJP core."""
  rest = list(rest)
  block_indices = rest.pop(0) if has_indices else None
  sink = rest.pop(0) if has_sink else None
  b, h, s, d = q.shape
  t = k.shape[2]
  if impl == "reference":
    qp, kp = rest if explicit else (None, None)
    return reference.sparse_attention_reference(
      q,
      k,
      v,
      causal=pb.mask.causal,
      window=pb.mask.window,
      sinks=pb.mask.sinks,
      block_indices=block_indices,
      sink_logits=sink,
      q_positions=qp,
      kv_positions=kp,
      block_q=pb.block_q,
      block_kv=pb.block_kv,
    )
  if explicit:
    q_pos, kv_pos = (jnp.atleast_2d(p) for p in rest)
  else:
    q_pos, kv_pos = jnp.arange(s, dtype=jnp.int32)[None], jnp.arange(t, dtype=jnp.int32)[None]
  nq, nk = -(-s // pb.block_q), -(-t // pb.block_kv)
  sp, tp = nq * pb.block_q, nk * pb.block_kv
  q = jnp.pad(q, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  q_pos = jnp.pad(q_pos, ((0, 0), (0, sp - s)), mode="edge")
  kv_pos = jnp.pad(kv_pos, ((0, 0), (0, tp - t)), mode="edge")
  need, full, selected = bl.block_masks(
    pb.mask, q_pos, kv_pos, block_indices, seq_q=s, seq_kv=t, block_q=pb.block_q, block_kv=pb.block_kv
  )
  topk = 0 if block_indices is None else block_indices.shape[-1]
  maxb = bl.max_blocks(pb.mask, num_kv_blocks=nk, block_q=pb.block_q, block_kv=pb.block_kv, topk=topk)
  lists = bl.build_block_lists(need, full, selected, max_blocks=maxb)
  # The bound assumes positions that grow by one per index; other positions are checked at run time.
  fallback = bl.build_block_lists(need, full, selected, max_blocks=nk) if explicit and maxb < nk else None
  out = _core(pb, impl, q, k, v, sink, q_pos, kv_pos, lists, fallback)
  return out[:, :, :s]


def _run(pb, impl, lists, fallback, fn):
  if fallback is None:
    return fn(lists)
  return jax.lax.cond(lists.fits, lambda: fn(lists), lambda: fn(fallback))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(pb, impl, q, k, v, sink, q_pos, kv_pos, lists, fallback):
  return _core_fwd(pb, impl, q, k, v, sink, q_pos, kv_pos, lists, fallback)[0]


def _core_fwd(pb, impl, q, k, v, sink, q_pos, kv_pos, lists, fallback):
  kernel = _KERNELS[impl]
  out, lse = _run(pb, impl, lists, fallback, lambda l: kernel.forward(pb, q, k, v, sink, q_pos, kv_pos, l))
  return out, (q, k, v, sink, q_pos, kv_pos, lists, fallback, out, lse)


def _core_bwd(pb, impl, res, d_out):
  q, k, v, sink, q_pos, kv_pos, lists, fallback, out, lse = res
  kernel = _KERNELS[impl]
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # rowsum(dO * O) = rowsum(P * dP)
  dq, dk, dv = _run(
    pb, impl, lists, fallback, lambda l: kernel.backward(pb, q, k, v, sink, q_pos, kv_pos, l, out, lse, d_out, delta)
  )
  d_sink = None
  if sink is not None:
    # d softmax / d sink = -p_sink * rowsum(P * dP) with p_sink = e^{sink - lse}.
    p_sink = jnp.exp(sink.astype(jnp.float32)[None, :, None] - lse)
    d_sink = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sink.dtype)
  return dq, dk, dv, d_sink, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def block_stats(
  seq_q: int,
  seq_kv: int,
  *,
  causal: bool = True,
  window: int | None = None,
  sinks: int = 0,
  block_indices=None,
  q_positions=None,
  kv_positions=None,
  block_sizes: BlockSizes | None = None,
  impl: str | None = None,
) -> dict:
  """How much of the attention the block lists compute (jnp; for benchmarks and notebooks).

  Returns a dict of ints/floats: `computed` (query-block x key-block pairs in the lists, summed
  over batch and kv heads), `causal` (pairs a dense causal flash kernel computes: key blocks that
  start at or before the query block's end), `total` (all pairs) and the fractions
  `vs_causal` = computed / causal and `vs_full` = computed / total.
  """
  impl = impl or default_impl()
  bs = resolve_block_sizes(impl, seq_q, seq_kv, block_sizes)
  mask = Mask(bool(causal), window, sinks, block_indices is not None)
  q_pos = jnp.atleast_2d(jnp.arange(seq_q) if q_positions is None else jnp.asarray(q_positions))
  kv_pos = jnp.atleast_2d(jnp.arange(seq_kv) if kv_positions is None else jnp.asarray(kv_positions))
  computed, causal_pairs, copies = (
    int(x) for x in _block_counts(mask, bs.block_q, bs.block_kv, q_pos, kv_pos, block_indices)
  )
  total = -(-seq_q // bs.block_q) * -(-seq_kv // bs.block_kv) * copies
  causal_pairs *= copies
  return dict(
    computed=computed,
    causal=causal_pairs,
    total=total,
    vs_causal=computed / causal_pairs,
    vs_full=computed / total,
    block_q=bs.block_q,
    block_kv=bs.block_kv,
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_counts(mask, bq, bk, q_pos, kv_pos, block_indices):
  seq_q, seq_kv = q_pos.shape[-1], kv_pos.shape[-1]
  nq, nk = -(-seq_q // bq), -(-seq_kv // bk)
  q_pos = jnp.pad(q_pos, ((0, 0), (0, nq * bq - seq_q)), mode="edge")
  kv_pos = jnp.pad(kv_pos, ((0, 0), (0, nk * bk - seq_kv)), mode="edge")
  need, _, _ = bl.block_masks(mask, q_pos, kv_pos, block_indices, seq_q=seq_q, seq_kv=seq_kv, block_q=bq, block_kv=bk)
  dense, _, _ = bl.block_masks(Mask(True), q_pos, kv_pos, None, seq_q=seq_q, seq_kv=seq_kv, block_q=bq, block_kv=bk)
  return need.sum(), dense.sum(), need.shape[0] * need.shape[1]
