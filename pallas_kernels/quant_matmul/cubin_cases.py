"""The quantized matmul's GPU kernel, as cases `pallas_kernels.cubin` compiles to cubin: every entry
of its block-size table at the shapes it serves (tests/test_cubin.py, `python -m jaxeff.bench kernels`).
Plain data: the cubin tool imports the kernels, never the reverse."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul.gpu import BLOCK_SIZES, quant_matmul_gpu
from pallas_kernels.quant_matmul.weights import quantize_weight


def cubin_cases() -> list[dict]:
  """One case (`pallas_kernels.cubin.KernelCase`'s fields) per `BLOCK_SIZES` entry and scaling (per-channel; groups
  of 128, one scale row per sub-block; at decode also groups of 32, a broadcast scale tile), at
  Llama-7B-like K = N = 4096: decode M = 1 (split-K on), prefill M = 512."""

  def make(m, bits, group, zero_point=False):
    def args():
      qw = jax.eval_shape(
        lambda w: quantize_weight(w, bits, group, zero_point=zero_point),
        jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
      )
      return jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16), qw

    return args

  cases = []
  for (kind, bits), (_, _, _, warps, stages) in BLOCK_SIZES.items():
    m = 1 if kind == "decode" else 512
    for group in (None, 128) + ((32,) if kind == "decode" else ()):
      cases.append(
        dict(
          label=f"quant_matmul {kind} int{bits} {f'g{group}' if group else 'per-channel'}",
          fn=quant_matmul_gpu,
          make_args=make(m, bits, group),
          entry=(kind, bits),
          num_warps=warps,
          num_stages=stages,
        )
      )
    if bits == 4:  # the zero point's extra tiles (offsets) and row sums, where 4-bit needs them
      group = 32 if kind == "decode" else 128
      cases.append(
        dict(
          label=f"quant_matmul {kind} int4 g{group} zero point",
          fn=quant_matmul_gpu,
          make_args=make(m, 4, group, True),
          entry=(kind, bits),
          num_warps=warps,
          num_stages=stages,
        )
      )
  return cases
