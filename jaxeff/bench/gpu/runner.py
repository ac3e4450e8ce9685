"""`python -m jaxeff.bench gpu`: runs the chosen sections in order, records each (a section that
raises is recorded and the next one runs), judges the goals and prints the summary table.

A section is a module here with `measure(run) -> rows` and `summary(rows) -> lines of the table`,
and optionally `goals(rows) -> [(goal, value, target, met)]` and `failures(rows) -> [what failed]`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import traceback
import warnings
from typing import Any

import jax

from jaxeff.bench import common
from jaxeff.bench.gpu import (
  attention,
  ceilings,
  correctness,
  decode,
  long_context,
  paged_attention,
  quant,
  serve,
  speculative,
  train,
)
from jaxeff.bench.gpu.harness import Run, fmt, one_line
from jaxeff.bench.gpu.plan import DRY, FULL, QUICK

SECTIONS = {
  "ceilings": ceilings,
  "correctness": correctness,
  "quant": quant,
  "attention": attention,
  "paged_attention": paged_attention,
  "decode": decode,
  "serve": serve,
  "speculative": speculative,
  "long_context": long_context,
  "train": train,
}


def goals(record: dict, dry: bool) -> list[dict]:
  """The issue's goals on the GPU, each met / missed / not measured (never decided on a dry run)."""
  out = []
  for name, section in SECTIONS.items():
    if not hasattr(section, "goals"):
      continue
    for goal, value, target, ok in section.goals(record["sections"].get(name, {}).get("rows", [])):
      state = "not measured" if value is None else ("dry run" if dry else ("met" if ok else "missed"))
      out.append(dict(goal=goal, value=value, target=target, state=state))
  return out


def failures(record: dict) -> list[str]:
  """What makes the run fail: section errors and the checks of a section that did not pass."""
  out = [f"section {name}: {sec['error']}" for name, sec in record["sections"].items() if sec.get("error")]
  for name, section in SECTIONS.items():
    if hasattr(section, "failures"):
      out += section.failures(record["sections"].get(name, {}).get("rows", []))
  return out


def table(record: dict) -> str:
  """The compact summary printed last."""
  meta = record["meta"]
  lines = [
    f"## jaxeff GPU bench: {meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}"
    f"{' -- DRY RUN (toy sizes, interpreted kernels: no speed meaning)' if meta['dry_run'] else ''}",
    "",
  ]
  for name, section in SECTIONS.items():
    sec = record["sections"].get(name)
    if sec is None:
      continue
    head = f"### {name} ({sec.get('seconds', 0):.0f} s)"
    if sec.get("error"):
      lines += [head, f"FAILED: {sec['error']}", ""]
      continue
    lines += [head, *section.summary(sec.get("rows", [])), ""]
  lines.append("### goals")
  for g in record.get("goals", []):
    lines.append(f"- {g['goal']}: {fmt(g['value'], '.2f')} (target {g['target']}): {g['state']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(
    prog="python -m jaxeff.bench gpu",
    description="Every accelerator path, proved and measured in one command: `python -m jaxeff.bench gpu`.",
  )
  p.add_argument("--quick", action="store_true", help="sections 1 and 2, one row each of 3-5 (budget 150 s)")
  p.add_argument("--dry-run", action="store_true", help="the whole plan at toy sizes on CPU (kernels interpreted)")
  p.add_argument("--out", default="runs/bench_gpu", help="directory for gpu_bench.json (default runs/bench_gpu)")
  p.add_argument(
    "--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --quick: all but train)"
  )
  p.add_argument("--budget", type=float, help="seconds after which nothing new starts (default 450; quick 150)")
  p.add_argument("--seed", type=int, help="input seed (default: fresh; recorded in the JSON)")
  args = p.parse_args(argv)
  args.argv = argv
  default = [name for name in SECTIONS if not (args.quick and name == "train")]
  chosen = [s for s in args.sections.split(",") if s] if args.sections else default
  unknown = [s for s in chosen if s not in SECTIONS]
  if unknown:
    return common.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
  if args.dry_run and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # A dry run's timings mean nothing: compile with XLA:CPU's cheapest settings (-O0: a third
    # faster; the classic emitters instead of the MLIR fusion emitters: 95 -> 52 s in the suite).
    # Takes effect when the backend has not started yet (a command line's own process).
    flags = (
      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    )
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
  backend = jax.default_backend()
  if not args.dry_run and backend != "gpu":
    return common.error(f"no GPU here (jax backend {backend!r}); --dry-run runs the plan at toy sizes on CPU")
  if args.budget is None:
    args.budget = None if args.dry_run else (150.0 if args.quick else 450.0)
  sizes = DRY if args.dry_run else (QUICK if args.quick else FULL)
  run = Run(args, sizes, pathlib.Path(args.out))
  print(
    f"jaxeff GPU bench: {run.record['meta']['device']}, jax {jax.__version__}, seed {run.seed}, "
    f"out {run.out / 'gpu_bench.json'}",
    file=sys.stderr,
    flush=True,
  )
  seen_warnings: list[str] = []
  run.record["meta"]["warnings"] = seen_warnings
  for name, section in SECTIONS.items():
    if name not in chosen:
      continue
    t0 = time.perf_counter()
    run.log(f"{name} ...")
    entry: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        entry["rows"] = section.measure(run)
      except Exception as e:
        entry.update(error=one_line(e), traceback=traceback.format_exc(limit=12))
    for w in caught:
      text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
      if text not in seen_warnings:
        seen_warnings.append(text)
    entry["seconds"] = time.perf_counter() - t0
    run.record["sections"][name] = entry
    run.record["goals"] = goals(run.record, run.dry)
    run.record["failures"] = failures(run.record)
    run.save()
  run.record["meta"]["seconds"] = run.elapsed()
  run.save()
  print(table(run.record))
  bad = run.record["failures"]
  if bad:
    print(f"\n{len(bad)} failure(s): " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""), file=sys.stderr)
  return 1 if bad else 0
