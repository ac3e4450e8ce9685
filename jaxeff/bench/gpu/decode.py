"""Section 5, decode: a Llama-3.2-1B-shaped model (random bf16 weights) through `Generator` at batch
1, 16, 64 in bf16, int8, int4 g128: tokens/s, bytes read per step, % of copy bandwidth."""

from __future__ import annotations

import statistics

from flax import nnx

from jaxeff.bench import common
from jaxeff.bench.gpu import harness
from jaxeff.bench.gpu.harness import Run, decode_model, nbytes, one_line
from jaxeff.generate import Generator
from jaxeff.quantization import quantize


def measure(run: Run) -> list[dict]:
  s = run.sizes
  model = decode_model(run)
  cfg = model.cfg
  rows = run.rows()
  for fmt in s.decode_formats:
    if run.over_budget():
      rows.append(dict(format=fmt, skipped="time budget"))
      continue
    try:
      served = {"bf16": model, "int8": None, "int4": None}[fmt] or quantize(
        model, bits=8 if fmt == "int8" else 4, group_size=None if fmt == "int8" else 128
      )
    except Exception as e:
      rows.append(dict(format=fmt, error=one_line(e)))
      continue
    weight_bytes = nbytes(nnx.state(served))
    for batch in s.decode_batches:
      if run.over_budget():
        rows.append(dict(format=fmt, batch=batch, skipped="time budget"))
        continue
      prompts = run.rng.integers(0, cfg.vocab_size, (batch, s.decode_prompt)).tolist()
      try:
        gen = Generator(served, max_batch=batch, max_seq_len=s.decode_prompt + s.decode_new)
        gen.generate(prompts, max_new_tokens=4)  # compiles prefill and the decode loop
        rates = []
        for _ in range(max(1, s.repeats // 2)):
          gen.generate(prompts, max_new_tokens=s.decode_new)
          rates.append(gen.stats.decode_steps / gen.stats.decode_seconds)
        steps_s = statistics.median(rates)
        step_bytes = weight_bytes + gen.cache_bytes
        rows.append(
          dict(
            format=fmt,
            batch=batch,
            tok_s=steps_s * batch,
            steps_s=steps_s,
            bytes_per_step=step_bytes,
            weight_bytes=weight_bytes,
            cache_bytes=gen.cache_bytes,
            pct_copy=100 * step_bytes * steps_s / run.copy_bw if run.copy_bw else None,
          )
        )
        del gen
      except Exception as e:
        rows.append(dict(format=fmt, batch=batch, error=one_line(e)))
    del served
  return rows


def summary(rows: list[dict]) -> list[str]:
  cells = [
    (r["format"], r.get("batch", "-"), r.get("error") or r.get("skipped"), "", "")
    if "tok_s" not in r
    else (
      r["format"],
      r.get("batch", "-"),
      f"{r['tok_s']:.0f}",
      f"{r['bytes_per_step'] / 1e6:.0f} MB",
      harness.fmt(r["pct_copy"], ".0f"),
    )
    for r in rows
  ]
  return common.markdown_table(("format", "batch", "tok/s", "bytes/step", "% copy"), cells)


def goals(rows: list[dict]) -> list[tuple]:
  dec = [r for r in rows if r.get("format") == "bf16" and r.get("batch") == 1 and r.get("pct_copy")]
  return [
    (
      "1B decode bf16 batch 1: % of copy bandwidth",
      dec[0]["pct_copy"] if dec else None,
      ">= 80",
      bool(dec) and dec[0]["pct_copy"] >= 80,
    )
  ]
