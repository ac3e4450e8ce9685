"""The ragged paged-attention GPU kernel, as cases `pallas_kernels.cubin` compiles to cubin: one
mixed batch per head shape (tests/test_cubin.py, `python -m jaxeff.bench kernels`). Each case lowers
two kernels: the decode items (G query rows padded to 16) and the prefill items (BLOCK_ROWS rows).
Plain data: the cubin tool imports the kernels, never the reverse."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.gpu import NUM_STAGES, NUM_WARPS
from pallas_kernels.ragged_paged_attention.ops import ragged_paged_attention


def cubin_cases() -> list[dict]:
  """A 512-token step of up to 64 sequences over a 2048-page pool (8 kv heads, 64 pages of
  context a sequence), bf16: head_dim 128 with GQA 4 and 16-token pages (Llama-style), head_dim 64
  with GQA 3 and 32-token pages (SmolLM2-style); and a 64-token step of 4 sequences, where the
  pages are split over several programs (flash-decoding: f32 partial outputs)."""

  def make(d, group, page, t, seqs, pages=2048, pages_per_seq=64, kv_heads=8):
    def args():
      s = jax.ShapeDtypeStruct
      pool = s((pages, kv_heads, page, d), jnp.bfloat16)
      return (
        s((t, kv_heads * group, d), jnp.bfloat16),
        pool,
        pool,
        s((seqs,), jnp.int32),
        s((seqs, pages_per_seq), jnp.int32),
        s((seqs + 1,), jnp.int32),
        s((1,), jnp.int32),
      )

    return args

  return [
    dict(
      label=f"ragged_paged_attention d{d} GQA{group} page{page} bf16 T={t} S={seqs}",
      fn=functools.partial(ragged_paged_attention, impl="gpu"),
      make_args=make(d, group, page, t, seqs),
      entry=(d, group, page, t, seqs),
      num_warps=NUM_WARPS,
      num_stages=NUM_STAGES,
    )
    for d, group, page, t, seqs in ((128, 4, 16, 512, 64), (64, 3, 32, 512, 64), (128, 4, 16, 64, 4))
  ]
