"""`quant_matmul`: the public op; picks an implementation by backend and runs it per shard.

  backend  default impl    notes
  tpu      "tpu"           Pallas Mosaic kernel (tpu.py)
  gpu      "gpu"           Pallas Triton kernel (gpu.py)
  cpu      "cpu"           chunked f32 XLA path (cpu.py); with interpret=... the "tpu" kernel
                           runs in the Pallas interpreter instead (tests, debugging)

`impl=` forces one of IMPLS ("reference" is the dequantize-then-dot definition; "xla" the same
in storage-row order, which GSPMD partitions without moving a weight: xla.py).

On a mesh (`jax.set_mesh` or `mesh=`), `axes` says which mesh axes each matmul letter may be split
over: "m" (rows of x), "k" (the contraction) and "n" (output columns); the caller derives them
from the weight's logical axes. The op then runs its kernel with `pallas_kernels.sharding.
shard_kernel`: a column-parallel layer splits N, a row-parallel one splits K and sums the f32
partial products (`psum`), rows of x split over data/fsdp. Group scales are split with K. An int4
weight splits K only into whole tiles; where that fails K stays whole (`partition` reports the
split actually used, so a caller can see whether a weight would have to move).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import cpu, gpu, reference, tpu, xla
from pallas_kernels.quant_matmul.weights import QuantizedWeight, zero_point_correction
from pallas_kernels.sharding import current_mesh, free_axes, resolve_axes, shard_kernel

IMPLS = ("tpu", "gpu", "cpu", "xla", "reference")


def default_impl(interpret=False) -> str:
  backend = jax.default_backend()
  if backend in ("tpu", "gpu"):
    return backend
  return "tpu" if interpret else "cpu"


def default_compute_dtype(x_dtype, impl: str, interpret=False):
  """bf16 for f32 activations in the TPU/GPU kernels on hardware (an f32 dot at HIGHEST precision
  runs 3-6 passes on the MXU and on CUDA cores on GPU); otherwise the activation dtype. Interpret
  mode keeps f32, so tests compare against the f32 reference tightly."""
  if impl in ("tpu", "gpu") and not interpret and jnp.dtype(x_dtype) == jnp.float32:
    return jnp.dtype(jnp.bfloat16)
  return jnp.dtype(x_dtype)


def _dims(qw: QuantizedWeight) -> tuple[str, ...]:
  # x, qvalue, scale (and minimum). Per-channel scales ([1, N]) have a letter ("o") that is never split.
  s = "on" if qw.group_size is None else "gn"
  return ("mk", "kn", s, s) if qw.zero_point else ("mk", "kn", s)


def partition(x_shape, qw: QuantizedWeight, axes: dict, mesh=None) -> dict[str, tuple[str, ...]]:
  """letter ("m", "k", "n") -> the mesh axes `quant_matmul(x, qw, axes=axes)` splits it over.

  Mesh axes that do not divide a dimension are dropped; so is a K split that would cut an int4
  tile or a scale group. {} without a (multi-device) mesh.
  """
  mesh = current_mesh(mesh)
  if mesh is None or math.prod(mesh.shape[a] for a in free_axes(mesh)) == 1:
    return {}
  axes = {k: v for k, v in axes.items() if k in "mkn"}
  if qw.group_size is not None and "k" in axes:
    axes = {**axes, "g": axes["k"]}  # groups split with K (resolve_axes ties letters sharing an axis)
  m = math.prod(x_shape[:-1])
  shapes = [jax.ShapeDtypeStruct((m, qw.padded_in_features), jnp.float32), qw.qvalue, qw.scale]
  if qw.zero_point:
    shapes.append(qw.minimum)
  split = resolve_axes(shapes, _dims(qw), axes, mesh, out_dims="mn")
  if "k" in split:
    parts = math.prod(mesh.shape[a] for a in split["k"])
    if qw.bits == 4 and (qw.qvalue.shape[0] // parts) % qw.half_rows:
      axes = {k: v for k, v in axes.items() if k not in "kg"}
      split = resolve_axes(shapes, _dims(qw), axes, mesh, out_dims="mn")
  return {k: v for k, v in split.items() if k in "mkn"}


def _local(x, qvalue, scale, minimum=None, *, bits, group_size, impl, interpret, block_sizes, cdt, out_dtype):
  """One device's matmul: x [M, K_local] @ dequant([K_local, N_local]).

  A zero point (asymmetric weight): the TPU and GPU kernels dequantize it in their body; the CPU
  and XLA paths run on the stored values as if symmetric and add `zero_point_correction` (x's
  group sums times the offsets, f32) on the same shard; "reference" dequantizes it whole.
  """
  qw = QuantizedWeight(qvalue, scale, bits=bits, group_size=group_size, in_features=x.shape[-1], minimum=minimum)
  if impl == "tpu":
    return tpu.quant_matmul_tpu(
      x, qw, interpret=interpret, block_sizes=block_sizes, compute_dtype=cdt, out_dtype=out_dtype
    )
  if impl == "gpu":
    return gpu.quant_matmul_gpu(
      x, qw, interpret=interpret, block_sizes=block_sizes, compute_dtype=cdt, out_dtype=out_dtype
    )
  if impl == "reference":
    return reference.quant_matmul_reference(x.astype(jnp.float32), qw, cdt).astype(out_dtype)
  symmetric = dataclasses.replace(qw, minimum=None)
  if impl == "cpu":
    y = cpu.quant_matmul_cpu(x.astype(jnp.float32), symmetric, rows_per_step=block_sizes)
  else:  # "xla"
    y = xla.quant_matmul_xla(x.astype(jnp.float32 if qw.zero_point else out_dtype), symmetric, cdt)
  if qw.zero_point:  # the activations as the dot saw them (rounded to compute_dtype), summed in f32
    y = y.astype(jnp.float32) + zero_point_correction(x.astype(cdt).astype(jnp.float32), qw)
  return y.astype(out_dtype)


def quant_matmul(
  x: jax.Array,
  qw: QuantizedWeight,
  *,
  interpret=False,
  impl: str | None = None,
  block_sizes=None,
  compute_dtype=None,
  axes: dict | None = None,
  mesh=None,
) -> jax.Array:
  """x [..., K] @ dequant(qw) [K, N] -> [..., N] in x.dtype, f32 accumulation.

  Args:
    x: activations; leading dims are flattened into M (M = 1 is a decode step).
    qw: from `quantize_weight` (2-D: index a stacked weight first).
    interpret: False, True, or `pltpu.InterpretParams(...)`: run the Pallas kernel in the
      interpreter (works on CPU).
    impl: one of IMPLS to force an implementation; None picks by backend (module docstring).
    block_sizes: override the kernel's block-size table entry (a tuple, see tpu.py / gpu.py), or
      the CPU path's rows per step (an int).
    compute_dtype: dtype x and the quantized values enter the dot in (`default_compute_dtype`).
    axes: on a mesh, {"m": mesh axes, "k": ..., "n": ...} the letters may be split over (module
      docstring); None runs unsharded (fine for one device; a multi-device Mosaic call needs it).
    mesh: the mesh for `axes`; default the one set with `jax.set_mesh`.
  """
  if qw.qvalue.ndim != 2:
    raise ValueError(f"quant_matmul takes a 2-D QuantizedWeight, got qvalue {qw.qvalue.shape}")
  if x.shape[-1] != qw.in_features:
    raise ValueError(f"x [..., {x.shape[-1]}] does not match weight [{qw.in_features}, {qw.out_features}]")
  impl = impl or default_impl(interpret)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  cdt = jnp.dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype(x.dtype, impl, interpret)
  x2 = x.reshape(-1, x.shape[-1])
  kwargs = dict(
    bits=qw.bits, group_size=qw.group_size, impl=impl, interpret=interpret, block_sizes=block_sizes, cdt=cdt
  )
  split = partition(x.shape, qw, axes, mesh) if axes is not None else {}
  operands = (qw.qvalue, qw.scale) + ((qw.minimum,) if qw.zero_point else ())
  if not split:
    y = _local(x2, *operands, out_dtype=x.dtype, **kwargs)
  else:
    k_split = "k" in split
    if k_split:  # shards of x must line up with shards of the padded weight
      x2 = jnp.pad(x2, ((0, 0), (0, qw.padded_in_features - x2.shape[-1])))
    letters = dict(split)
    if k_split and qw.group_size is not None:
      letters["g"] = split["k"]
    # Partial products are summed over K's shards in f32, then cast.
    fn = lambda xl, *wl: _local(xl, *wl, out_dtype=jnp.float32 if k_split else x.dtype, **kwargs)
    y = shard_kernel(fn, x2, *operands, in_dims=_dims(qw), out_dims="mn", axes=letters, mesh=mesh).astype(x.dtype)
  return y.reshape(*x.shape[:-1], qw.out_features)
