"""`quant_matmul`: the public op; picks an implementation by backend.

  backend  default impl    notes
  tpu      "tpu"           Pallas Mosaic kernel (tpu.py)
  gpu      "gpu"           Pallas Triton kernel (gpu.py)
  cpu      "cpu"           chunked f32 XLA path (cpu.py); with interpret=... the "tpu" kernel
                           runs in the Pallas interpreter instead (tests, debugging)

`impl=` forces one of IMPLS ("reference" is the dequantize-then-dot definition).
"""

from __future__ import annotations

import jax

from pallas_kernels.quant_matmul import cpu, gpu, reference, tpu
from pallas_kernels.quant_matmul.weights import QuantizedWeight

IMPLS = ("tpu", "gpu", "cpu", "reference")


def default_impl(interpret=False) -> str:
  backend = jax.default_backend()
  if backend in ("tpu", "gpu"):
    return backend
  return "tpu" if interpret else "cpu"


def quant_matmul(x: jax.Array, qw: QuantizedWeight, *, interpret=False, impl: str | None = None,
                 block_sizes=None) -> jax.Array:
  """x [..., K] @ dequant(qw) [K, N] -> [..., N] in x.dtype, f32 accumulation.

  Args:
    x: activations; leading dims are flattened into M (M = 1 is a decode step).
    qw: from `quantize_weight` (2-D: index a stacked weight first).
    interpret: False, True, or `pltpu.InterpretParams(...)`: run the Pallas kernel in the
      interpreter (works on CPU).
    impl: one of IMPLS to force an implementation; None picks by backend (module docstring).
    block_sizes: override the kernel's block-size table entry (a tuple, see tpu.py / gpu.py).
  """
  if qw.qvalue.ndim != 2:
    raise ValueError(f"quant_matmul takes a 2-D QuantizedWeight, got qvalue {qw.qvalue.shape}")
  if x.shape[-1] != qw.in_features:
    raise ValueError(f"x [..., {x.shape[-1]}] does not match weight [{qw.in_features}, {qw.out_features}]")
  impl = impl or default_impl(interpret)
  x2 = x.reshape(-1, x.shape[-1])
  if impl == "tpu":
    y = tpu.quant_matmul_tpu(x2, qw, interpret=interpret, block_sizes=block_sizes)
  elif impl == "gpu":
    y = gpu.quant_matmul_gpu(x2, qw, interpret=interpret, block_sizes=block_sizes)
  elif impl == "cpu":
    y = cpu.quant_matmul_cpu(x2, qw, rows_per_step=block_sizes)
  elif impl == "reference":
    y = reference.quant_matmul_reference(x2, qw)
  else:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  return y.reshape(*x.shape[:-1], qw.out_features)
