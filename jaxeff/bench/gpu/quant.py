"""Section 3, quant: x @ W for W of 4096x4096, 4096x14336, 14336x4096 (and 11008x4096: a prime
split-K step count) at M = 1, 16, 128 (and 2048: the prefill tiles), bf16 `jnp.dot` vs int8 vs
int4 g128: time, weight GB/s, % of the copy bandwidth, TFLOP/s."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run, copies_for, fmt, nbytes, one_line, rotating


def measure(run: Run) -> list[dict]:
  s = run.sizes
  rows = run.rows()
  shapes = [
    (kn, s.quant_perf_ms + ((s.prefill_m,) if s.prefill_m and i == 0 else ())) for i, kn in enumerate(s.quant_shapes)
  ]
  for (k, n), ms in shapes:
    w = run.normal((k, n), jnp.float32, scale=0.05)
    formats = {"bf16": w.astype(jnp.bfloat16)}
    for name, bits, group in (("int8", 8, None), ("int4 g128", 4, 128)):
      formats[name] = jax.jit(lambda w, bits=bits, group=group: pk.quantize_weight(w, bits, group))(w)
    del w
    ops = {
      "bf16": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
      "int8": lambda x, w: pk.quant_matmul(x, w, impl=run.impl, interpret=run.interpret),
      "int4 g128": lambda x, w: pk.quant_matmul(x, w, impl=run.impl, interpret=run.interpret),
    }
    for m in ms:
      bf16_t = None
      for name, weight in formats.items():
        if run.over_budget():
          rows.append(dict(shape=f"{k}x{n}", m=m, format=name, skipped="time budget"))
          continue
        weight_nbytes = nbytes(weight)
        reps = copies_for(weight_nbytes)
        # Rotating copies: the weight plus a fresh offset (a distinct buffer of the same values).
        weights = [weight] + [jax.tree.map(lambda a: a.copy(), weight) for _ in range(reps - 1)]
        sets = [(run.normal((m, k), jnp.bfloat16), wi) for wi in weights]
        try:
          t = common.median_seconds(rotating(ops[name], sets), s.repeats, calls_per_run=reps)
        except Exception as e:
          rows.append(dict(shape=f"{k}x{n}", m=m, format=name, error=one_line(e)))
          continue
        finally:
          del weights, sets
        bf16_t = t if name == "bf16" else bf16_t
        rows.append(
          dict(
            shape=f"{k}x{n}",
            m=m,
            format=name,
            us=t * 1e6,
            weight_bytes=weight_nbytes,
            gb_s=weight_nbytes / t / 1e9,
            pct_copy=100 * weight_nbytes / t / run.copy_bw if run.copy_bw else None,
            tflop_s=2 * m * k * n / t / 1e12,
            speedup_vs_bf16=(bf16_t / t) if bf16_t else None,
            rotating_copies=reps,
          )
        )
  return rows


def summary(rows: list[dict]) -> list[str]:
  cells = [
    (r["shape"], r["m"], r["format"], r.get("error") or r.get("skipped"), "", "", "", "")
    if "us" not in r
    else (
      r["shape"],
      r["m"],
      r["format"],
      f"{r['us']:.1f}",
      f"{r['gb_s']:.0f}",
      fmt(r["pct_copy"], ".0f"),
      f"{r['tflop_s']:.2f}",
      f"{fmt(r['speedup_vs_bf16'], '.2f')}x",
    )
    for r in rows
  ]
  return common.markdown_table(("W [K x N]", "M", "format", "us", "GB/s", "% copy", "TFLOP/s", "vs bf16"), cells)


def goals(rows: list[dict]) -> list[tuple]:
  int8 = [r["pct_copy"] for r in rows if r.get("format") == "int8" and r.get("m") == 1 and r.get("pct_copy")]
  int4 = [
    r["speedup_vs_bf16"]
    for r in rows
    if r.get("format") == "int4 g128" and r.get("m") == 1 and r.get("speedup_vs_bf16")
  ]
  return [
    (
      "quant_matmul int8 at M=1: % of copy bandwidth (worst shape)",
      min(int8) if int8 else None,
      ">= 70",
      bool(int8) and min(int8) >= 70,
    ),
    (
      "quant_matmul int4 g128 at M=1: speed-up over bf16 jnp.dot (worst shape)",
      min(int4) if int4 else None,
      ">= 2",
      bool(int4) and min(int4) >= 2,
    ),
  ]
