"""Section serve: the decode section's model (bf16) behind `jaxeff.serve.Engine` (continuous
batching), 64 concurrent requests of mixed lengths, with the paged KV cache and
with the dense one (`kv_cache=Dense()`) side by side: output tokens/s, TTFT, inter-token latency,
compiled programs; and whether the paged cache's steps run the Pallas kernel (on a GPU they must)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.bench.gpu.harness import Run, decode_model, fmt, one_line
from jaxeff.inference import Dense, Paged
from jaxeff.inference.cache import PackedLayout, RaggedLayout
from jaxeff.models.attention import bind
from jaxeff.serve import Engine

# Custom-call targets of a Pallas kernel in lowered StableHLO: Triton on GPU, Mosaic on TPU.
PALLAS_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


def kernel_calls(model, policy, platform: str | None = None) -> int:
  """Pallas custom calls in the lowered text of one step of `model` through `policy`'s cache as the
  engine runs it (2 sequences' tokens in one row: packed, or the gather path's RaggedLayout; a
  scanned model's layers share one body): 0 when attention runs in XLA. `platform`: lower for that
  platform (default: the backend's)."""
  graphdef, state = nnx.split(model)
  cache = jax.eval_shape(lambda: policy.init(model.cfg, 2, 4 * policy.block_size))
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  cu_q_lens = jax.ShapeDtypeStruct((3,), jnp.int32)

  packed = policy.uses_kernel(bind(model.cfg), tree=False)  # else the engine runs the gather path's steps

  def step(state, cache, tokens, cu_q_lens):
    model = nnx.merge(graphdef, state)
    layout = PackedLayout(cu_q_lens) if packed else RaggedLayout(decode=1, prefill=1, chunk=3)
    return model.forward_with_cache(tokens, tokens, cache, layout=layout).hidden

  traced = jax.jit(step).trace(state, cache, tokens, cu_q_lens)
  lowered = traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()
  text = lowered.as_text()
  return sum(text.count(f"@{target}(") + text.count(f'call_target_name = "{target}"') for target in PALLAS_TARGETS)


def measure(run: Run) -> list[dict]:
  """`serve_clients` requests at once, prompt and output lengths drawn from [half, full] of the
  decode section's, through an engine per cache (the paged one first: the goal's row). A first
  round on other prompts of the same lengths compiles the buckets the traffic reaches; the timed
  round's prompts share no prefix with it, so prefix caching finds nothing to reuse."""
  s = run.sizes
  model = decode_model(run)
  n = s.serve_clients
  lengths = run.rng.integers(max(1, s.decode_prompt // 2), s.decode_prompt + 1, n)
  new = run.rng.integers(max(1, s.decode_new // 2), s.decode_new + 1, n)
  rounds = [[run.rng.integers(0, model.cfg.vocab_size, int(k)).tolist() for k in lengths] for _ in range(2)]
  chunk = 1 << max(0, int(lengths.max()) - 1).bit_length()
  rows = run.rows()
  for label, kv_cache in (("paged", Paged()), ("dense", Dense())):
    if run.over_budget():
      rows.append(dict(cache=label, clients=n, skipped="time budget"))
      continue
    try:
      rows.append(_serve(run, model, label, kv_cache, rounds, new, chunk))
    except Exception as e:
      rows.append(dict(cache=label, clients=n, error=one_line(e)))
  return rows


def _serve(run: Run, model, label: str, kv_cache, rounds, new, chunk: int) -> dict:
  s = run.sizes
  n = s.serve_clients
  engine = Engine(
    model,
    max_batch=n,
    max_seq_len=s.decode_prompt + s.decode_new,
    prefill_chunk=chunk,
    kv_cache=kv_cache,
    token_budget=max(256, 4 * chunk),  # the paged steps' budget; the dense engine ignores it
  )
  row = dict(cache=label, clients=n, backend=jax.default_backend())
  if label == "paged":
    row["uses_kernel"] = engine.kv_cache.uses_kernel(bind(model.cfg), tree=False)
    row["kernel_calls"] = kernel_calls(model, engine.kv_cache)
  with engine:

    def round_trip(prompts):
      requests = [engine.submit(p, max_tokens=int(m), stop_tokens=()) for p, m in zip(prompts, new)]
      t0 = time.perf_counter()
      for r in requests:
        r.result()
      return requests, time.perf_counter() - t0

    round_trip(rounds[0])  # compiles the buckets this traffic reaches
    compiled = len(engine.traces)
    blocks = engine.blocks
    before = (blocks.queried_tokens, blocks.hit_tokens) if blocks else None
    requests, seconds = round_trip(rounds[1])
  tokens = sum(len(r.tokens) for r in requests)
  ttft = [r.token_times[0] - r.submitted_at for r in requests]
  itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
  row.update(
    tok_s=tokens / seconds,
    seconds=seconds,
    ttft_p50_ms=1e3 * float(np.percentile(ttft, 50)),
    itl_p50_ms=1e3 * float(np.percentile(itl, 50)),
    itl_p99_ms=1e3 * float(np.percentile(itl, 99)),
    programs=len(engine.traces),
    timed_round_compiles=len(engine.traces) - compiled,
  )
  if blocks:  # the paged engine's own counters
    row.update(running_peak=engine.totals.running_peak, preemptions=engine.totals.preemptions)
    queried = blocks.queried_tokens - before[0]
    row["prefix_hit_rate"] = (blocks.hit_tokens - before[1]) / queried if queried else 0.0
  return row


def summary(rows: list[dict]) -> list[str]:
  lines = []
  for r in rows:
    head = f"- {r['cache']} cache, {r['clients']} concurrent requests"
    if "tok_s" not in r:
      lines.append(f"{head}: {r.get('error') or r.get('skipped')}")
      continue
    paged = ""
    if r["cache"] == "paged":
      paged = (
        f", peak {r['running_peak']} running, {r['preemptions']} preemptions; attention: "
        f"{'the ragged op' if r['uses_kernel'] else 'gathered blocks'} ({r['kernel_calls']} Pallas calls in a "
        "lowered step)"
      )
    lines.append(
      f"{head}: {r['tok_s']:.0f} output tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, ITL p50/p99 "
      f"{r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f} ms, {r['programs']} programs compiled "
      f"({r['timed_round_compiles']} in the timed round){paged}"
    )
  by_cache = {r["cache"]: r for r in rows if "tok_s" in r}
  if len(by_cache) == 2:
    lines.append(f"- paged / dense output tok/s: {by_cache['paged']['tok_s'] / by_cache['dense']['tok_s']:.2f}x")
  return lines


def goals(rows: list[dict]) -> list[tuple]:
  paged = next((r for r in rows if r.get("cache") == "paged" and "tok_s" in r), None)
  dense = next((r for r in rows if r.get("cache") == "dense" and "tok_s" in r), None)
  ratio = paged["tok_s"] / dense["tok_s"] if paged and dense else None
  return [
    (
      f"serve {paged['clients'] if paged else 64} clients, paged cache: output tok/s",
      paged["tok_s"] if paged else None,
      ">= 20000",
      bool(paged) and paged["tok_s"] >= 20000,
    ),
    ("serve: paged / dense output tok/s", ratio, ">= 1", ratio is not None and ratio >= 1),
  ]


def failures(rows: list[dict]) -> list[str]:
  out = [f"serve {r['cache']}: {r['error']}" for r in rows if r.get("error")]
  for r in rows:
    # On an accelerator the paged cache's default (kernel="auto") must take the Pallas kernel.
    on_accelerator = r.get("cache") == "paged" and r.get("backend") in ("gpu", "tpu")
    if on_accelerator and not (r.get("uses_kernel") and r.get("kernel_calls", 0) > 0):
      out.append(
        f"serve paged: attention does not run the Pallas kernel on {r['backend']} (uses_kernel="
        f"{r.get('uses_kernel')}, {fmt(r.get('kernel_calls'), 'd')} kernel calls in a lowered step)"
      )
  return out
