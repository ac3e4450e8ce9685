"""Speculative decoding on a real model: `python -m jaxeff.bench speculative [--medusa DIR] [--json PATH]`.

SmolLM2-135M-Instruct in f32 at batch 1, greedy, up to `--new-tokens` (128) new tokens (ending early
at the end-of-turn token), three prompt kinds:
- grounded: rewrite a given passage (the answer copies most of its input),
- code: complete a Python module (plain text, no chat template),
- chat: an open-ended request.
Contenders, timed in alternating rounds in one process (medians): jaxeff's plain decode (the
on-device loop), prompt lookup (8 and 3 draft tokens), a self-draft (the first layers), Medusa
heads (`--medusa DIR`, trained with `python -m jaxeff.train medusa.base=...`) on a chain and on
Sequoia trees (one with the chain's node budget, one chosen from step times measured here), and
transformers' greedy `generate` without and with its prompt lookup (`prompt_lookup_num_tokens`).
No assistant model fits: SmolLM2-135M is the smallest model with this vocabulary here.

Every jaxeff speculator's tokens are compared with plain greedy decoding (the table says "exact");
tokens/s is new tokens over the whole call (prefill included), so the speed-up is end to end.
`--quick` runs a tiny random model (smoke test, jaxeff only).
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
from jaxeff.generate import Generator, speculative
from jaxeff.generate.speculative import medusa_heads

PASSAGE = (
  "The old lighthouse keeper climbed the narrow stairs every evening at dusk. He carried a lantern, a tin of oil "
  "and a small notebook in which he wrote down the name of every ship that passed. In winter the wind came off the "
  "sea so hard that the windows rattled in their frames, and he sat by the lamp until morning, listening to the "
  "waves break against the rocks below. In summer the nights were short and calm, and he liked to watch the "
  "fishing boats leave the harbour before sunrise, their lights moving slowly across the dark water like "
  "a line of small stars."
)
CODE = """import dataclasses


@dataclasses.dataclass
class Account:
    owner: str
    balance: float = 0.0

    def deposit(self, amount: float) -> None:
        if amount <= 0:
            raise ValueError("amount must be positive")
        self.balance += amount

    def withdraw(self, amount: float) -> None:
        if amount <= 0:
            raise ValueError("amount must be positive")
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount

    def transfer(self, other: "Account", amount: float) -> None:
"""
CHAT = "Write a short story about a robot who learns to paint."


def prompts(tokenizer) -> dict[str, list[int]]:
  def chat(text):
    messages = [{"role": "user", "content": text}]
    return tokenizer.encode(
      tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )

  return {
    "grounded": chat("Rewrite the following passage in the present tense, keeping every detail:\n\n" + PASSAGE),
    "code": tokenizer.encode(CODE),
    "chat": chat(CHAT),
  }


@dataclasses.dataclass
class Row:
  name: str
  kind: str
  seconds: list = dataclasses.field(default_factory=list)
  new_tokens: int = 0
  tokens_per_forward: float = float("nan")
  forwards: int = 0
  ms_per_forward: float = float("nan")
  draft_share: float = float("nan")
  exact: bool | None = None
  histogram: dict = dataclasses.field(default_factory=dict)

  @property
  def tok_s(self) -> float:
    return self.new_tokens / statistics.median(self.seconds)


def jaxeff_contender(gen, ids, new_tokens, stop_tokens):
  """run() -> (seconds, tokens, stats) for one prompt on a Generator (its programs compiled here)."""
  gen.generate([ids], max_new_tokens=new_tokens, stop_tokens=stop_tokens)  # compile this prompt's bucket

  def run():
    t0 = time.perf_counter()
    out = gen.generate([ids], max_new_tokens=new_tokens, stop_tokens=stop_tokens)[0]
    return time.perf_counter() - t0, out, gen.stats

  return run


def transformers_contender(model, ids, new_tokens, stop_tokens, lookup: int | None):
  import torch

  x = torch.tensor([ids], dtype=torch.long)
  kw = dict(do_sample=False, eos_token_id=list(stop_tokens) or None, pad_token_id=0, attention_mask=torch.ones_like(x))
  if lookup:
    kw["prompt_lookup_num_tokens"] = lookup

  def run():
    t0 = time.perf_counter()
    with torch.no_grad():
      out = model.generate(x, max_new_tokens=new_tokens, **kw)[0, len(ids) :].tolist()
    seconds = time.perf_counter() - t0
    while out and out[-1] in stop_tokens:  # jaxeff returns tokens without the stop token
      out.pop()
    return seconds, out, None

  run()  # warm-up
  return run


def quick_model():
  """The `--quick` run's tiny random model."""
  return common.tiny_model(128)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench speculative", description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--medusa", metavar="DIR", help="Medusa heads for SmolLM2 (python -m jaxeff.train medusa.base=...)")
  p.add_argument("--self-layers", type=int, default=15, help="SelfDraft depth")
  p.add_argument("--no-transformers", action="store_true")
  p.add_argument("--quick", action="store_true", help="tiny random model, jaxeff only (smoke test)")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = p.parse_args(argv)

  if args.quick:
    model = quick_model()
    rng = np.random.default_rng(0)
    kinds = {k: (rng.integers(0, 128, 12).tolist() * 2) for k in ("grounded", "code", "chat")}
    stop_tokens, args.new_tokens, args.self_layers = (), 16, 1
    hf_model = None
  else:
    path = common.require_smollm2("speculative")
    print(f"loading {path.name} ...", flush=True)
    model, tokenizer = jaxeff.load(path)
    kinds = prompts(tokenizer)
    stop_tokens = tokenizer.stop_tokens
    hf_model = None
    if not args.no_transformers:
      import torch
      import transformers

      from jaxeff import gguf  # needs the gguf package

      torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
      hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.converted_checkpoint(path), dtype=torch.float32
      ).eval()
  max_seq_len = max(len(ids) for ids in kinds.values()) + args.new_tokens + 64

  speculators = {
    "lookup k=8": lambda: speculative.PromptLookup(num_draft=8),
    "lookup k=3": lambda: speculative.PromptLookup(num_draft=3),
    f"self-draft L={args.self_layers} k=2": lambda: speculative.SelfDraft(layers=args.self_layers, num_draft=2),
  }
  step_seconds = common.cached_forward_seconds(
    model, (1, 2, 3, 4, 5, 6, 8, 12, 16), max_seq_len, start=max_seq_len // 2
  )
  print("verification step (ms) by tokens: " + ", ".join(f"{n}: {1e3 * s:.1f}" for n, s in step_seconds.items()))
  medusa_note = "no --medusa DIR: Medusa rows skipped"
  if args.medusa:
    heads, info = medusa_heads.load_heads(args.medusa)
    acc = np.asarray(info.acceptance)
    chain = speculative.Tree.chain(heads.num_heads)
    same_budget = speculative.sequoia_tree(acc, chain.size, max_depth=heads.num_heads)
    # Hardware-aware (Sequoia): the size maximizing expected tokens per second of verification.
    hw = speculative.best_tree(acc, step_seconds, max_depth=heads.num_heads)
    trees = {f"medusa chain ({chain.size} nodes)": chain, f"medusa tree ({same_budget.size} nodes)": same_budget}
    trees[f"medusa tree ({hw.size} nodes, hardware-aware)"] = hw
    for name, tree in trees.items():
      speculators[name] = lambda tree=tree: speculative.Medusa(args.medusa, tree=tree)
    training = info.training or {}
    medusa_note = (
      f"Medusa: {heads.num_heads} heads x {heads.num_layers} layer, trained {training.get('steps', '?')} steps in "
      f"{training.get('seconds', float('nan')) / 60:.1f} min on this CPU; top-1 acceptance per head "
      + ", ".join(f"{a:.2f}" for a in acc[:, 0])
    )
    for name, tree in trees.items():
      medusa_note += f"; {name}: expected {tree.expected_tokens(acc):.2f} tokens/forward"

  # One Generator per contender, shared by the prompts (programs compile once; prefill per bucket).
  gens = {"jaxeff plain": Generator(model, max_batch=1, max_seq_len=max_seq_len)}
  for name, make in speculators.items():
    gens[f"jaxeff {name}"] = Generator(model, max_batch=1, max_seq_len=max_seq_len, speculator=make())
  runs: dict[tuple[str, str], object] = {}
  for kind, ids in kinds.items():
    print(f"compiling for {kind} ({len(ids)} prompt tokens) ...", flush=True)
    for name, gen in gens.items():
      runs[name, kind] = jaxeff_contender(gen, ids, args.new_tokens, stop_tokens)
    if hf_model is not None:
      runs["transformers plain", kind] = transformers_contender(hf_model, ids, args.new_tokens, stop_tokens, None)
      runs["transformers lookup k=8", kind] = transformers_contender(hf_model, ids, args.new_tokens, stop_tokens, 8)
  rows = {key: Row(*key) for key in runs}
  reference: dict[tuple[str, str], list] = {}
  for r in range(args.rounds):
    for (name, kind), run in runs.items():
      seconds, out, stats = run()
      row = rows[name, kind]
      row.seconds.append(seconds)
      row.new_tokens = len(out)
      engine = name.split()[0]
      reference.setdefault((engine, kind), out) if name.endswith("plain") else None
      if not name.endswith("plain"):
        same = out == reference[engine, kind]
        row.exact = same if row.exact is None else (row.exact and same)
      if stats is not None:
        row.tokens_per_forward, row.forwards = stats.tokens_per_forward, stats.target_forwards
        row.ms_per_forward = 1e3 * stats.decode_seconds / max(stats.target_forwards, 1)
        row.draft_share = stats.draft_share
        row.histogram = dict(sorted(stats.accepted_histogram.items()))
      print(f"  round {r + 1}/{args.rounds}: {name} on {kind}: {len(out) / seconds:.1f} tok/s", flush=True)

  speedups: dict[str, list[float]] = {}
  cells = []
  for (name, kind), row in rows.items():
    base = rows[f"{name.split()[0]} plain", kind]
    speedup = row.tok_s / base.tok_s
    speedups.setdefault(name, []).append(speedup)
    exact = "" if row.exact is None else ("yes" if row.exact else "**no**")
    cells.append(
      (
        name,
        kind,
        row.new_tokens,
        f"{row.tok_s:.1f}",
        f"{speedup:.2f}x",
        f"{row.tokens_per_forward:.2f}",
        f"{row.ms_per_forward:.1f}",
        f"{100 * row.draft_share:.0f}%",
        exact,
      )
    )
  header = (
    "contender",
    "prompt",
    "new tokens",
    "tok/s",
    "speed-up",
    "tokens/forward",
    "ms/forward",
    "draft share",
    "exact",
  )
  lines = [
    f"speculative: {'tiny random model' if args.quick else 'SmolLM2-135M-Instruct f32'}, batch 1, greedy, up to "
    f"{args.new_tokens} new tokens, median of {args.rounds} alternating rounds ({common.machine()})",
    medusa_note,
    "verification forward (ms) by tokens verified: "
    + ", ".join(f"{n}: {1e3 * s:.1f}" for n, s in step_seconds.items()),
    "",
    *common.markdown_table(header, cells, "llrrrrrrl"),
    "",
    *common.markdown_table(
      ("contender", "mean speed-up over the three prompts"),
      [(name, f"{statistics.mean(v):.2f}x") for name, v in speedups.items()],
      "lr",
    ),
  ]
  print("\n".join(lines))
  if args.json:
    common.write_json(
      args.json,
      dict(
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        verify_step_seconds=step_seconds,
        medusa=medusa_note,
        rows=[{**dataclasses.asdict(r), "tok_s": r.tok_s} for r in rows.values()],
      ),
    )
  return 0 if all(r.exact is not False for r in rows.values() if r.name.startswith("jaxeff")) else 1
