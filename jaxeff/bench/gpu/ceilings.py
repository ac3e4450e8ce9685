"""Section 1, ceilings: the device's copy bandwidth (`a + 1`, bytes read + written) and a large
bf16 `jnp.dot`, what the later sections are measured against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run


def measure(run: Run) -> list[dict]:
  s = run.sizes
  run.copy_bw = common.copy_bandwidth(s.copy_bytes, s.repeats)
  n = s.matmul_n
  a, b = run.normal((n, n), jnp.bfloat16), run.normal((n, n), jnp.bfloat16)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  t_dot = common.median_seconds(lambda: dot(a, b), s.repeats)
  run.bf16_flops = 2 * n**3 / t_dot
  return [
    dict(name="copy bandwidth", bytes=2 * s.copy_bytes, seconds=2 * s.copy_bytes / run.copy_bw, gb_s=run.copy_bw / 1e9),
    dict(name=f"bf16 dot {n}^3", seconds=t_dot, tflop_s=run.bf16_flops / 1e12),
  ]


def summary(rows: list[dict]) -> list[str]:
  return [
    f"- {r['name']}: " + (f"{r['gb_s']:.0f} GB/s" if "gb_s" in r else f"{r['tflop_s']:.1f} TFLOP/s") for r in rows
  ]
