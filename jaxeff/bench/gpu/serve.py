"""Section serve: the decode section's model (bf16) behind `jaxeff.serve.Engine` (continuous
batching), 64 concurrent requests of mixed lengths: output tokens/s, TTFT, inter-token latency."""

from __future__ import annotations

import time

import numpy as np

from jaxeff.bench.gpu.harness import Run, decode_model
from jaxeff.serve import Engine


def measure(run: Run) -> list[dict]:
  """The decode model (bf16) behind `jaxeff.serve.Engine`: `serve_clients` requests at once, prompt
  and output lengths drawn from [half, full] of the decode section's; a first round compiles."""
  s = run.sizes
  model = decode_model(run)
  cfg = model.cfg
  n = s.serve_clients
  lengths = run.rng.integers(max(1, s.decode_prompt // 2), s.decode_prompt + 1, n)
  new = run.rng.integers(max(1, s.decode_new // 2), s.decode_new + 1, n)
  prompts = [run.rng.integers(0, cfg.vocab_size, int(k)).tolist() for k in lengths]
  chunk = 1 << max(0, int(lengths.max()) - 1).bit_length()
  with Engine(model, max_batch=n, max_seq_len=s.decode_prompt + s.decode_new, prefill_chunk=chunk) as engine:

    def round_trip():
      requests = [engine.submit(p, max_tokens=int(m), stop_tokens=()) for p, m in zip(prompts, new)]
      t0 = time.perf_counter()
      for r in requests:
        r.result()
      return requests, time.perf_counter() - t0

    round_trip()  # compiles the buckets this traffic reaches
    requests, seconds = round_trip()
  tokens = sum(len(r.tokens) for r in requests)
  ttft = [r.token_times[0] - r.submitted_at for r in requests]
  itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
  return [
    dict(
      clients=n,
      tok_s=tokens / seconds,
      seconds=seconds,
      ttft_p50_ms=1e3 * float(np.percentile(ttft, 50)),
      itl_p50_ms=1e3 * float(np.percentile(itl, 50)),
      itl_p99_ms=1e3 * float(np.percentile(itl, 99)),
      programs=len(engine.traces),
    )
  ]


def summary(rows: list[dict]) -> list[str]:
  return [
    f"- {r['clients']} concurrent requests: {r['tok_s']:.0f} output tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} "
    f"ms, ITL p50/p99 {r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f} ms ({r['programs']} programs compiled)"
    for r in rows
  ]
