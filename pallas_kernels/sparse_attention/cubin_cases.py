"""Block-sparse attention's GPU kernels, as cases `pallas_kernels.cubin` compiles to cubin (forward,
dq and dk/dv at the default block sizes). Plain data: the cubin tool imports the kernels, never
the reverse."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention.gpu import DEFAULT_BLOCK_SIZES
from pallas_kernels.sparse_attention.ops import sparse_attention


def cubin_cases() -> list[dict]:
  """Cases (`pallas_kernels.cubin.KernelCase`'s fields) for `DEFAULT_BLOCK_SIZES` at head dim 128, bf16, GQA 4:
  the forward alone (its launch parameters checked), and forward + backward (the dq and dk/dv
  kernels too), at 4096 tokens with a 1024-token window and 4 sinks."""
  mask = dict(window=1024, sinks=4, impl="gpu")

  def args():
    q = jax.ShapeDtypeStruct((1, 8, 4096, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 4096, 128), jnp.bfloat16)
    return q, kv, kv

  def forward_and_backward(q, k, v):
    return jax.grad(lambda q, k, v: sparse_attention(q, k, v, **mask).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
      q, k, v
    )

  bs = DEFAULT_BLOCK_SIZES
  return [
    dict(
      label="sparse_attention forward d128 window+sinks",
      fn=functools.partial(sparse_attention, **mask),
      make_args=args,
      entry="forward",
      num_warps=bs.num_warps,
      num_stages=bs.num_stages,
    ),
    dict(
      label="sparse_attention forward+backward d128 window+sinks",
      fn=forward_and_backward,
      make_args=args,
      entry="backward",
    ),
  ]
