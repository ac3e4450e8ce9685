"""Section speculative: the decode section's model at batch 1: a forward over 1-16 tokens against
one (what bounds any speculator's speed-up) and prompt lookup against plain decoding."""

from __future__ import annotations

import statistics
import time

from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run, decode_model
from jaxeff.generate import Generator
from jaxeff.generate.speculative import PromptLookup


def measure(run: Run) -> list[dict]:
  """Speculative decoding's hardware side on the decode model (bf16, batch 1): how much a forward
  over n tokens costs against a one-token step (what bounds every speculator's speed-up), and
  prompt lookup against plain decoding end to end (random weights: greedy text loops, which the
  lookup predicts; trained drafts need a real model)."""
  s = run.sizes
  model = decode_model(run)
  max_len = s.decode_prompt + s.decode_new + 16
  rows = run.rows()
  seconds = common.cached_forward_seconds(model, (1, 2, 4, 8, 16), max_len, start=s.decode_prompt, repeats=s.repeats)
  for n, t in seconds.items():
    rows.append(dict(check="verify forward", tokens=n, ms=1e3 * t, vs_one=t / seconds[1]))
  prompt = [run.rng.integers(0, model.cfg.vocab_size, s.decode_prompt).tolist()]
  reference = None
  for name, speculator in (("plain", None), ("lookup k=8", PromptLookup(num_draft=8))):
    gen = Generator(model, max_batch=1, max_seq_len=max_len, speculator=speculator)
    gen.generate(prompt, max_new_tokens=s.decode_new)  # compiles
    times = []
    for _ in range(max(1, s.repeats // 2)):
      t0 = time.perf_counter()
      out = gen.generate(prompt, max_new_tokens=s.decode_new)
      times.append(time.perf_counter() - t0)
    reference = out if reference is None else reference
    rows.append(
      dict(
        check="decode",
        contender=name,
        tok_s=s.decode_new / statistics.median(times),
        tokens_per_forward=gen.stats.tokens_per_forward,
        exact=out == reference,  # bf16: a verification and a one-token step may round apart
      )
    )
  plain = next(r for r in rows if r.get("contender") == "plain")
  for r in rows:
    if r.get("check") == "decode":
      r["speedup"] = r["tok_s"] / plain["tok_s"]
  return rows


def summary(rows: list[dict]) -> list[str]:
  lines = []
  for r in rows:
    if r.get("check") == "verify forward":
      lines.append(f"- forward over {r['tokens']} tokens: {r['ms']:.2f} ms ({r['vs_one']:.2f}x one token)")
    elif r.get("check") == "decode":
      lines.append(
        f"- {r['contender']}: {r['tok_s']:.0f} tok/s ({r['speedup']:.2f}x), "
        f"{r['tokens_per_forward']:.2f} tokens/forward, same tokens as plain: {r['exact']}"
      )
    else:
      lines.append(f"- {r.get('error') or r.get('skipped')}")
  return lines
