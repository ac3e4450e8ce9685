"""Pallas GPU kernels compiled to cubin without a GPU: `python -m jaxeff.bench kernels`.

Options: `--targets sm_80,sm_90`, `--only SUBSTRING` (cases whose label contains it), `--json PATH`.

For every entry of every Pallas GPU kernel's block-size table (`pallas_kernels.cubin.kernel_cases`)
lowers the op for CUDA, compiles each Triton kernel for A100 (sm_80) and H100 (sm_90) with the
pinned `triton` and its `ptxas`, and prints registers per thread, spill bytes, shared memory,
cubin size and the theoretical occupancy with what limits it. Then, per case, a one-line reading
of what that predicts for a batch-1 (decode) call: whether the grid fills the SMs and how many
weight bytes each SM keeps in flight. No timing: compile-time facts only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from jaxeff.bench import common

SMS = {"sm_80": 108, "sm_90": 132}  # A100 SXM, H100 SXM


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench kernels", description=__doc__.split("\n")[0])
  p.add_argument("--targets", default="sm_80,sm_90", help="comma-separated compute capabilities")
  p.add_argument("--only", default="", help="run the cases whose label contains this")
  p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  args = p.parse_args(argv)
  try:
    import triton  # noqa: F401

    from pallas_kernels import cubin
  except ImportError as e:
    return common.error(f"{e} (install jaxeff's test extras: pip install -e '.[test]')")
  targets = [t for t in args.targets.split(",") if t]
  unknown = [t for t in targets if t not in cubin.TARGETS]
  if unknown:
    return common.error(f"unknown targets {unknown}; choose from {', '.join(cubin.TARGETS)}")
  cases = [c for c in cubin.kernel_cases() if args.only in c.label]
  if not cases:
    return common.error(f"no kernel case matches {args.only!r}")
  rows, labels, notes = [], [], []
  t0 = time.perf_counter()
  for case in cases:
    print(f"compiling {case.label} ...", file=sys.stderr, flush=True)
    got = cubin.kernel_resources(case.fn, *case.make_args(), targets=targets)
    rows += got
    labels += [case.label] * len(got)
    for r in got:
      blocks = r.grid[0] * r.grid[1] * r.grid[2]
      resident = r.occupancy.warps_per_sm // r.num_warps
      waves = blocks / (resident * SMS[r.target]) if resident else float("inf")
      notes.append(
        f"{case.label}, {r.target}: {blocks} blocks, {resident} resident per SM x {SMS[r.target]} SMs "
        f"= {waves:.2f} waves; limited by {r.occupancy.limiter}"
      )
  print(
    f"## Pallas GPU kernels compiled to cubin ({', '.join(targets)}), "
    f"{len(cases)} block-size table entries, {time.perf_counter() - t0:.0f} s\n"
  )
  print(cubin.resource_table(rows, labels))
  print()
  for note in notes:
    print(f"- {note}")
  if args.json:
    common.write_json(args.json, [dict(label=l, **dataclasses.asdict(r)) for l, r in zip(labels, rows)])
  return 0
