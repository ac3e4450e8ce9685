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
chunks since it selects once per chunk, and SnapKV (budget entries, observation window 32, pool
7, compressing after each `--chunk` of the text). KIVI keeps every token, so it has its own rows:
2 and 4 bits, group 32, residual 128, read in `--kivi-chunk` (16) token chunks (each chunk and the
residual attend in full precision, everything older quantized), with its cache bytes against the
dense cache's in f32 and in bf16.
4. `passkey`: a five-digit pass key hidden at 10/50/90% depth of filler text of `--passkey-contexts`
   tokens, then "What is the pass key? The pass key is": retrieved when the greedy continuation
   holds the key; dense, StreamingLLM, H2O and SnapKV at each of `--passkey-budgets`, and KIVI-2/4.
`--sections` picks measurements; `--quick` runs a tiny random model.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import numpy as np

import jaxeff
from jaxeff.bench import common
from jaxeff.data.sources import default_corpus_files
from jaxeff.generate import Generator
from jaxeff.inference import H2O, KIVI, Dense, SnapKV, StreamingLLM, token_nll


def _text(path: str | None) -> tuple[str, str]:
  if path:
    return pathlib.Path(path).read_text(errors="replace"), path
  shared = common.shared_text()
  if shared is not None:
    return shared.read_text(), str(shared)
  files = default_corpus_files(4 << 20)
  return "\n".join(f.read_text(errors="replace") for f in files), "the embedded corpus (Python's standard library)"


def segment_perplexities(model, tokens, policy, chunk: int, segment: int) -> list[float]:
  """Perplexity of each `segment` tokens of `tokens` as a decoder with `policy` reads the text."""
  nll = token_nll(model, tokens, kv_cache=policy, chunk=chunk)[0]
  return [float(np.exp(nll[i : i + segment].mean())) for i in range(0, len(nll), segment)]


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tok, context: int, depth: float, key: int) -> list[int]:
  """`context` tokens of filler with the pass key stated at `depth` (0-1), ending in the question.
  `tok` None (the quick run's byte model): bytes."""
  encode = (lambda s: list(s.encode())) if tok is None else tok.encode
  needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
  question = encode("What is the pass key? The pass key is")
  filler = encode(PASSKEY_FILLER)
  room = context - len(needle) - len(question)
  hay = (filler * (room // len(filler) + 1))[:room]
  at = int(depth * room)
  return hay[:at] + needle + hay[at:] + question


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
  p.add_argument(
    "--sections", default="budget,long,decode,passkey", help="comma-separated: budget, long, decode, passkey"
  )
  p.add_argument("--h2o-chunk", type=int, default=16, help="tokens per forward for H2O (it selects once per chunk)")
  p.add_argument("--kivi-chunk", type=int, default=16, help="tokens per forward for KIVI")
  p.add_argument(
    "--policies", default="streaming,window,h2o,snapkv,kivi", help="budget section: which policies to measure"
  )
  p.add_argument("--passkey-contexts", default="1024,4096")
  p.add_argument("--passkey-budgets", default="512")
  p.add_argument("--quick", action="store_true", help="tiny random model, small sizes (smoke test)")
  p.add_argument("--json", metavar="PATH")
  args = p.parse_args(argv)

  text, source = _text(args.text)
  if args.quick:
    model = common.tiny_model(256)
    cfg = model.cfg
    all_tokens = np.frombuffer(text.encode()[:20000], np.uint8).astype(np.int32)
    args.context, args.budgets, args.long, args.segment = 256, "32,64", 512, 128
    args.decode_contexts, args.decode_tokens, args.chunk, sinks, window = "64,256", 16, 32, 4, 28
    args.h2o_chunk = args.kivi_chunk = 16
    args.passkey_contexts, args.passkey_budgets = "128", "48"
    tok = None
    name = "tiny random model (bytes)"
  else:
    path = common.require_smollm2("kv_cache")
    model, tok = jaxeff.load(path, scan_layers=True)
    cfg = model.cfg
    all_tokens = np.asarray(tok.encode(text[: 40 * args.long]), np.int32)
    sinks, window = 4, 1020
    name = "SmolLM2-135M-Instruct f32"
  record = dict(model=name, text=source, date=common.today(), jax=jax.__version__)
  lines = [f"kv_cache: {name}, text {source}, {common.machine()}", ""]

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
      f"{args.h2o_chunk}-token chunks; SnapKV: window 32, pool 7, {args.chunk}-token chunks",
      "",
    ]
    names = dict(streaming="StreamingLLM (4 sinks)", window="window only", h2o="H2O", snapkv="SnapKV")
    shown = [n for k, n in names.items() if k in args.policies.split(",")]
    header = ["budget"] + [c for n in shown for c in (n, "vs dense")]
    lines += common.markdown_table(header, align="r" * len(header))
    budgets = [int(b) for b in args.budgets.split(",")]
    fifth = round(0.2 * len(tokens))  # the paper's 20% budget
    chosen = set(args.policies.split(","))
    columns = {
      "streaming": lambda b: (StreamingLLM(4, b - 4), args.chunk),
      "window_only": lambda b: (StreamingLLM(0, b), args.chunk),
      "h2o": lambda b: (H2O(b // 2, b - b // 2), args.h2o_chunk),
      "snapkv": lambda b: (SnapKV(b, min(32, b // 2)), args.chunk),
    }
    columns = {k: v for k, v in columns.items() if k.split("_")[0] in chosen}
    for budget in sorted(set(budgets + [fifth])):
      row = dict(budget=budget, dense=dense)
      cells = []
      for key, make in columns.items():
        policy, chunk = make(budget)
        row[key] = segment_perplexities(model, tokens, policy, chunk, len(tokens))[0]
        cells += [f"{row[key]:.3f}", f"{100 * (row[key] / dense - 1):+.1f}%"]
      rows.append(row)
      lines.append(common.markdown_row([f"{budget}{' (20%)' if budget == fifth else ''}", *cells]))
      print(lines[-1], flush=True)
    record["budget"] = rows
    dense_f32 = Dense().cache_bytes(cfg, 1, len(tokens))
    lines += [
      "",
      f"KIVI (group 32, residual 128, {args.kivi_chunk}-token chunks) over the same {len(tokens)} tokens",
      "",
      *common.markdown_table(
        ("cache", "perplexity", "vs dense", "cache bytes", "smaller than dense f32", "than dense bf16"), align="lrrrrr"
      ),
    ]
    kivi_rows = []
    for bits in (4, 2) if "kivi" in chosen else ():
      policy = KIVI(bits=bits, group=32, residual=128) if not args.quick else KIVI(bits=bits, group=8, residual=16)
      ppl = segment_perplexities(model, tokens, policy, args.kivi_chunk, len(tokens))[0]
      nbytes = policy.cache_bytes(cfg, 1, len(tokens))
      kivi_rows.append(dict(bits=bits, perplexity=ppl, dense=dense, cache_bytes=nbytes, dense_f32_bytes=dense_f32))
      lines.append(
        common.markdown_row(
          (
            f"KIVI-{bits}",
            f"{ppl:.3f}",
            f"{100 * (ppl / dense - 1):+.2f}%",
            f"{nbytes / 2**20:.1f} MiB",
            f"{dense_f32 / nbytes:.1f}x",
            f"{dense_f32 / 2 / nbytes:.1f}x",
          )
        )
      )
      print(lines[-1], flush=True)
    record["kivi"] = kivi_rows

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
    lines += common.markdown_table(
      ["tokens", *policies],
      ([f"{s}-{s + args.segment}", *(f"{segs[k][i]:.2f}" for k in policies)] for i, s in enumerate(starts)),
      "l" + "r" * len(policies),
    )
    record["long"] = dict(segment=args.segment, starts=starts, perplexity=segs)

  # 3. decode speed and cache bytes against context
  if "decode" in sections:
    lines += ["", *common.markdown_table(("context", "cache", "cache MiB", "decode tok/s"), align="rlrr")]
    decode_rows = []
    for context in [int(c) for c in args.decode_contexts.split(",")]:
      prompt = all_tokens[:context].tolist()
      for label, policy in (
        ("dense", None),
        (f"StreamingLLM {sinks}+{window}", StreamingLLM(sinks, window)),
        (f"H2O {(sinks + window) // 2}+{(sinks + window) // 2}", H2O((sinks + window) // 2, (sinks + window) // 2)),
        ("KIVI-2", KIVI(bits=2, group=8, residual=16) if args.quick else KIVI(bits=2)),
      ):
        gen = Generator(model, max_batch=1, max_seq_len=context + args.decode_tokens, kv_cache=policy)
        gen.generate([prompt], max_new_tokens=args.decode_tokens)  # compiles
        gen.generate([prompt], max_new_tokens=args.decode_tokens)
        s = gen.stats
        decode_rows.append(dict(context=context, cache=label, cache_bytes=gen.cache_bytes, tok_s=s.decode_tokens_per_s))
        lines.append(
          common.markdown_row((context, label, f"{gen.cache_bytes / 2**20:.1f}", f"{s.decode_tokens_per_s:.1f}"))
        )
        print(lines[-1], flush=True)
    record["decode"] = decode_rows

  # 4. passkey retrieval
  if "passkey" in sections:
    contexts = [int(c) for c in args.passkey_contexts.split(",")]
    policies = {"dense": None}
    for b in [int(x) for x in args.passkey_budgets.split(",")]:
      policies[f"StreamingLLM 4+{b - 4}"] = StreamingLLM(4, b - 4)
      policies[f"H2O {b // 2}+{b - b // 2}"] = H2O(b // 2, b - b // 2)
      policies[f"SnapKV {b}"] = SnapKV(b, min(32, b // 2))
    for bits in (4, 2):
      policies[f"KIVI-{bits}"] = KIVI(bits=bits, group=8, residual=16) if args.quick else KIVI(bits=bits)
    depths = (0.1, 0.5, 0.9)
    found = {label: {} for label in policies}
    for label, policy in policies.items():
      for context in contexts:
        gen = None
        for depth in depths:
          key = 10000 + int(np.random.default_rng(context + int(100 * depth)).integers(0, 90000))
          ids = passkey_prompt(tok, context, depth, key)
          if gen is None:
            length = (policy or Dense()).length_for(len(ids), 8)
            gen = Generator(model, max_batch=1, max_seq_len=max(length, 8), kv_cache=policy)
          out = gen.generate([ids], max_new_tokens=8)[0]
          hit = str(key) in (tok.decode(out) if tok is not None else "")
          found[label][context] = found[label].get(context, 0) + int(hit)
        print(f"passkey {label} at {context}: {found[label][context]}/{len(depths)}", flush=True)
    lines += ["", f"passkey retrieved (of {len(depths)} depths: 10/50/90%)", ""]
    lines += common.markdown_table(
      ["cache", *(f"{c} tokens" for c in contexts)],
      ([label, *(f"{found[label][c]}/{len(depths)}" for c in contexts)] for label in policies),
      "l" + "r" * len(contexts),
    )
    record["passkey"] = dict(depths=depths, contexts=contexts, found=found)
  print("\n".join(lines))
  if args.json:
    common.write_json(args.json, record)
  return 0
