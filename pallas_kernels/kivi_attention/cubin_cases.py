"""The KIVI decode-attention GPU kernel, as cases `pallas_kernels.cubin` compiles to cubin: each bit
width of its block-size table at decode shapes (tests/test_cubin.py, `python -m jaxeff.bench
kernels`). Plain data: the cubin tool imports the kernels, never the reverse."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.kivi_attention.gpu import BLOCK_SIZES, quantized_attention_gpu


def cubin_cases() -> list[dict]:
  """One case (`pallas_kernels.cubin.KernelCase`'s fields) per bit width and batch: one sequence (B=1:
  the split over T fills the grid) and B=8; 8 kv heads, M=4 query rows (GQA 4), D=128, T=4096,
  group 32, bf16 queries and scales."""

  def make(batch, bits, group=32, kv_heads=8, m=4, d=128, t=4096):
    def args():
      s = jax.ShapeDtypeStruct
      codes = s((batch, kv_heads, t, d * bits // 8), jnp.uint8)
      key_scale = s((batch, kv_heads, t // group, d), jnp.bfloat16)
      value_scale = s((batch, kv_heads, t, d // min(group, d)), jnp.bfloat16)
      q = s((batch, kv_heads, m, d), jnp.bfloat16)
      return q, codes, key_scale, key_scale, codes, value_scale, value_scale, s((batch,), jnp.int32)

    return args

  cases = []
  for bits in (2, 4):
    _, warps, stages = BLOCK_SIZES[bits]
    for batch in (1, 8):
      cases.append(
        dict(
          label=f"kivi_attention decode int{bits} g32 B={batch}",
          fn=functools.partial(quantized_attention_gpu, bits=bits, group=32, sm_scale=128**-0.5),
          make_args=make(batch, bits),
          entry=bits,
          num_warps=warps,
          num_stages=stages,
        )
      )
  return cases
