"""`quantized_attention`: the public op; picks an implementation by backend and runs it per shard.

  backend  default impl  notes
  tpu      "tpu"         Pallas Mosaic kernel (tpu.py)
  gpu      "gpu"         Pallas Triton kernel, split over T (gpu.py)
  cpu      "xla"         chunked f32 XLA path (xla.py); with interpret=... the "tpu" kernel runs in
                         the Pallas interpreter instead (tests, debugging)

`impl=` forces one of IMPLS ("reference" is the dequantize-everything definition, reference.py).
Every call validates, then runs the implementation through `shard_kernel`, split over batch and
kv heads (a Mosaic kernel is never partitioned automatically).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.kivi_attention import gpu, tpu, xla
from pallas_kernels.kivi_attention.quantize import check_format, value_group
from pallas_kernels.kivi_attention.reference import quantized_attention_reference
from pallas_kernels.sharding import shard_kernel

IMPLS = ("tpu", "gpu", "xla", "reference")
_DIMS = ("bkmd", "bktp", "bkgd", "bkgd", "bktp", "bktn", "bktn", "b")


def default_impl(interpret=False) -> str:
  backend = jax.default_backend()
  if backend in ("tpu", "gpu"):
    return backend
  return "tpu" if interpret else "xla"


def _check(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths, bits, group):
  if q.ndim != 4 or not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be floating [batch, kv_heads, M, head_dim], got {q.dtype}{list(q.shape)}")
  b, kvh, _, d = q.shape
  check_format(bits, group, d)
  if k_codes.ndim != 4 or k_codes.shape[:2] != (b, kvh) or k_codes.shape[3] != d * bits // 8:
    raise ValueError(f"k_codes must be [{b}, {kvh}, T, {d * bits // 8}] (D*bits/8 bytes a token), got {k_codes.shape}")
  t = k_codes.shape[2]
  if t % group:
    raise ValueError(f"the cache length T ({t}) must be a multiple of group ({group})")
  if k_codes.dtype != jnp.uint8 or v_codes.dtype != jnp.uint8:
    raise ValueError(f"k_codes and v_codes must be uint8, got {k_codes.dtype}, {v_codes.dtype}")
  if v_codes.shape != k_codes.shape:
    raise ValueError(f"v_codes must have k_codes' shape {k_codes.shape}, got {v_codes.shape}")
  key_scales = (b, kvh, t // group, d)
  if k_scale.shape != key_scales or k_min.shape != key_scales:
    raise ValueError(f"k_scale and k_min must be {list(key_scales)}, got {k_scale.shape}, {k_min.shape}")
  value_scales = (b, kvh, t, d // value_group(group, d))
  if v_scale.shape != value_scales or v_min.shape != value_scales:
    raise ValueError(f"v_scale and v_min must be {list(value_scales)}, got {v_scale.shape}, {v_min.shape}")
  dtypes = {a.dtype for a in (k_scale, k_min, v_scale, v_min)}
  if len(dtypes) != 1 or not jnp.issubdtype(k_scale.dtype, jnp.floating):
    raise ValueError(f"scales and minimums must share one floating dtype, got {sorted(map(str, dtypes))}")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integers [{b}], got {lengths.dtype}{list(lengths.shape)}")


def quantized_attention(
  q: jax.Array,
  k_codes: jax.Array,
  k_scale: jax.Array,
  k_min: jax.Array,
  v_codes: jax.Array,
  v_scale: jax.Array,
  v_min: jax.Array,
  lengths: jax.Array,
  *,
  bits: int,
  group: int,
  sm_scale: float,
  impl: str | None = None,
  interpret: Any = False,
  block_t: int | None = None,
  batch_axes=("data", "fsdp"),
  head_axes="tensor",
  mesh=None,
) -> tuple[jax.Array, jax.Array]:
  """Attention of q over the first lengths[b] tokens of a KIVI-quantized cache (all visible).

  Args:
    q: [B, KVH, M, D] (a kv head's query heads times the chunk's tokens as M rows).
    k_codes, v_codes: uint8 [B, KVH, T, D*bits/8] (quantize.py's packed planes).
    k_scale, k_min: [B, KVH, T/group, D]; v_scale, v_min: [B, KVH, T, D/value_group(group, D)].
    lengths: [B] ints, tokens of each row to attend over (clipped to [0, T]).
    bits, group: the cache's format; sm_scale: the scores' scale (usually D**-0.5).
    impl: one of IMPLS; None picks by backend (module docstring).
    interpret: False, True or `pltpu.InterpretParams(...)`: run the Pallas kernel in the interpreter.
    block_t: tokens per step instead of the implementation's table (the "xla" chunk size).
    batch_axes, head_axes: mesh axes batch and kv heads may be split over; axes that do not
      divide are dropped. mesh: default the context mesh (`jax.set_mesh`).
  Returns:
    (out f32 [B, KVH, M, D] normalized, lse f32 [B, KVH, M]); lse -inf and out 0 where lengths is 0.
  """
  _check(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths, bits, group)
  impl = impl or default_impl(interpret)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if block_t is not None and (not isinstance(block_t, int) or block_t < 1):
    raise ValueError(f"block_t must be a positive int or None, got {block_t!r}")
  d, t = q.shape[3], k_codes.shape[2]
  if impl == "tpu":
    tpu.choose_block_t(t, bits, d, group, block_t)
  elif impl == "gpu":
    gpu.check_shapes(d, bits)
    gpu.choose_block_t(t, bits, group, block_t)
  operands = (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, lengths)
  static = dict(bits=bits, group=group, sm_scale=float(sm_scale))
  hashable = lambda a: a if a is None or isinstance(a, str) else tuple(a)  # jit's static arguments
  axes = (("b", hashable(batch_axes)), ("k", hashable(head_axes)))
  return _sharded(
    operands, impl=impl, static=tuple(static.items()), interpret=interpret, block_t=block_t, axes=axes, mesh=mesh
  )


@functools.partial(jax.jit, static_argnames=("impl", "static", "interpret", "block_t", "axes", "mesh"))
def _sharded(operands, *, impl, static, interpret, block_t, axes, mesh):
  *cache, lengths = operands
  operands = (*cache, jnp.clip(lengths.astype(jnp.int32), 0, cache[1].shape[2]))
  local = functools.partial(_local, impl, dict(static), interpret, block_t)
  return shard_kernel(local, *operands, in_dims=_DIMS, out_dims=("bkmd", "bkm"), axes=dict(axes), mesh=mesh)


def _local(impl, static, interpret, block_t, *operands):
  if impl == "tpu":
    return tpu.quantized_attention_tpu(*operands, **static, block_t=block_t, interpret=interpret)
  if impl == "gpu":
    return gpu.quantized_attention_gpu(*operands, **static, block_t=block_t, interpret=interpret)
  if impl == "xla":
    return xla.quantized_attention_xla(*operands, **static, chunk=block_t)
  return quantized_attention_reference(*operands, **static)
