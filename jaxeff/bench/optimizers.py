"""Optimizer comparison: `python -m jaxeff.bench optimizers [--steps 200] [--quick] [--out DIR]`.

Trains the same small byte-level model (../shared/data/tinyshakespeare.txt when present, else the
embedded corpus) with every optimizer in `jaxeff.optim` for the same number of steps, each at a
small learning-rate sweep, through `jaxeff.train.train` itself (clipping, warmup + cosine,
weight decay on matrices). Every run uses the same 8-device data-parallel CPU mesh, because
Distributed Lion needs one (8 workers, majority vote); the others see the all-reduced gradient.

Per optimizer (its best learning rate by final validation loss) it reports: final validation
loss; the first evaluation step whose validation loss is <= AdamW's final one (evaluations every
`--eval-every` steps, no interpolation) as a fraction of AdamW's own; the median step time
relative to AdamW (the same train step, timed in alternating rounds after the runs); optimizer-state bytes per device relative
to AdamW.
It also times one Online Subspace Descent projector step against one GaLore SVD refresh on the
model's matrices, and saves the validation curves as a PNG and everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

DEVICES = 8
SHAKESPEARE = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"

# Learning-rate grids around each method's usual setting (Lion ~3-10x below AdamW; Muon's
# Moonlight recipe uses AdamW's lr; GaLore/OSD the AdamW lr on the projected moments).
SWEEP = {
    "adamw": [3e-3, 1e-2],
    "c_adamw": [3e-3, 1e-2],
    "lion": [3e-4, 1e-3],
    "c_lion": [3e-4, 1e-3],
    "distributed_lion": [3e-4, 1e-3],
    "muon": [3e-3, 1e-2],
    "c_muon": [3e-3, 1e-2],
    "galore": [3e-3, 1e-2],
    "osd": [3e-3, 1e-2],
}
MODEL = ["model.hidden_size=128", "model.intermediate_size=384", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2"]


def _hyper(name: str, args) -> dict:
  if name == "galore":
    return {"rank": args.rank, "update_proj_gap": args.gap}
  if name == "osd":
    return {"rank": args.rank}
  return {}


def _low_rank(name: str, rank: int, gap: int) -> list[str]:
  h = _hyper(name, argparse.Namespace(rank=rank, gap=gap))
  return [f"optimizer.hyperparams={{{', '.join(f'{k}: {v}' for k, v in h.items())}}}"] if h else []


def run_one(name: str, lr: float, args, data_path: str | None) -> dict:
  from jaxeff import train as train_lib

  out = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
  overrides = MODEL + [
      f"steps={args.steps}", f"batch_size={args.batch_size}", f"seq_len={args.seq_len}",
      f"eval_every={args.eval_every}", "eval_batches=8", f"log_every={args.eval_every}",
      f"checkpoint_every={args.steps}", "progress=false", f"output_dir={out}",
      f"optimizer.name={name}", f"optimizer.learning_rate={lr}", "optimizer.warmup_steps=20",
      "mesh={data: -1}", *_low_rank(name, args.rank, args.gap)]
  if data_path:
    overrides.append(f"data.paths=[{data_path}]")
  cfg = train_lib.load_config(None, overrides)
  result = train_lib.train(cfg)
  return {"name": name, "lr": lr, "val": {int(k): float(v) for k, v in result.val_losses.items()},
          "final_val": float(result.val_losses[max(result.val_losses)]), "state_bytes": state_bytes(cfg)}


def step_times(best: dict, args, rounds: int = 5, steps: int = 5) -> dict[str, float]:
  """Median seconds per training step (jaxeff.train's step, same mesh and batch) of each
  optimizer at its best lr, timed in alternating rounds so machine noise hits all alike."""
  import jax
  import numpy as np
  from flax import nnx

  from jaxeff import sharding
  from jaxeff import train as train_lib
  from jaxeff.models import Llama

  cfg = train_lib.load_config(None, MODEL + [f"batch_size={args.batch_size}", f"seq_len={args.seq_len}"])
  mesh = sharding.make_mesh({"data": -1})
  make_model = lambda: Llama(cfg.model, rngs=nnx.Rngs(0))
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1), dtype=np.int32)
  fns = {}
  with jax.set_mesh(mesh):
    param_sh = sharding.state_shardings(abstract, mesh)
    batch_sh = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
    batch = {"inputs": jax.device_put(tokens[:, :-1], batch_sh), "targets": jax.device_put(tokens[:, 1:], batch_sh)}
    for name, r in best.items():
      opt = train_lib.OptimizerConfig(**{**vars(train_lib.OptimizerConfig()), "name": name, "learning_rate": r["lr"],
                                         "warmup_steps": 20,
                                         "hyperparams": _hyper(name, args)})
      local = mesh if name == "distributed_lion" else None
      tx, _ = train_lib.make_optimizer(opt, args.steps, abstract, mesh=local)
      params = jax.jit(lambda: nnx.state(make_model()), out_shardings=param_sh)()
      state = jax.jit(tx.init)(params)
      step = jax.jit(train_lib.make_steps(graphdef, tx, None, local)[0])
      params, state, m = step(params, state, batch)  # compile
      jax.block_until_ready(m)
      fns[name] = [step, params, state]
    times = {name: [] for name in fns}
    for _ in range(rounds):
      for name, f in fns.items():
        step, params, state = f
        for _ in range(steps):
          t0 = time.perf_counter()
          params, state, m = step(params, state, batch)
          jax.block_until_ready(m)
          times[name].append(time.perf_counter() - t0)
        f[1], f[2] = params, state
  return {name: statistics.median(ts) for name, ts in times.items()}


def state_bytes(cfg) -> int:
  import jax
  from flax import nnx

  from jaxeff import train as train_lib
  from jaxeff.models import Llama

  _, params = nnx.split(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0))))
  mesh = None
  if cfg.optimizer.name == "distributed_lion":
    from jaxeff import sharding
    mesh = sharding.make_mesh(cfg.mesh)
  tx, _ = train_lib.make_optimizer(cfg.optimizer, cfg.steps, params, mesh=mesh)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))
  # Per device: data parallelism replicates the others' state on every device, while Distributed
  # Lion's [N, ...] momentum is split, one slice per device.
  return total // mesh.shape["data"] if mesh is not None else total


def projector_cost(args) -> dict:
  """Seconds of one GaLore SVD refresh and of one OSD projector step, on the model's matrices.

  GaLore's refresh = its update on a refresh step minus on a plain step; OSD's projector step =
  its update minus GaLore's plain step (both project, run Adam and project back).
  """
  import jax
  from flax import nnx

  from jaxeff import optim
  from jaxeff import train as train_lib
  from jaxeff.models import Llama

  cfg = train_lib.load_config(None, MODEL)
  params = nnx.state(Llama(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
  axes = optim.logical_axes_from_state(params)
  params = jax.device_put(jax.tree.map(lambda v: v[...], params, is_leaf=lambda x: isinstance(x, nnx.Variable)),
                          jax.devices()[0])
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)

  def timed(tx, state):
    update = jax.jit(tx.update)
    jax.block_until_ready(update(grads, state, params))
    ts = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(update(grads, state, params))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

  galore = optim.galore(1e-3, rank=args.rank, update_proj_gap=2, logical_axes=axes)
  state = galore.init(params)
  refresh = timed(galore, state)  # count 0: refresh step
  _, state1 = jax.jit(galore.update)(grads, state, params)
  plain = timed(galore, state1)  # count 1: no refresh
  osd = optim.osd(1e-3, rank=args.rank, logical_axes=axes)
  ostate = osd.init(params)
  _, ostate = jax.jit(osd.update)(grads, ostate, params)  # past step 0's SVD
  osd_step = timed(osd, ostate)
  svd_s, proj_s = max(refresh - plain, 1e-9), max(osd_step - plain, 0.0)
  return {"galore_refresh_step_s": refresh, "galore_plain_step_s": plain, "osd_step_s": osd_step,
          "svd_refresh_s": svd_s, "osd_projector_s": proj_s, "ratio": proj_s / svd_s}


def steps_to(curve: dict[int, float], target: float) -> int | None:
  for step in sorted(curve):
    if curve[step] <= target:
      return step
  return None


def report(best: dict, proj: dict, args, wall_s: float, data_desc: str) -> tuple[str, dict]:
  base = best["adamw"]
  target = base["final_val"]
  base_steps = steps_to(base["val"], target)
  rows, summary = [], {}
  for name, r in best.items():
    s = steps_to(r["val"], target)
    summary[name] = {"lr": r["lr"], "final_val": r["final_val"], "steps_to_adamw": s,
                     "steps_ratio": None if s is None else s / base_steps,
                     "step_time_ratio": r["step_s"] / base["step_s"],
                     "state_ratio": r["state_bytes"] / base["state_bytes"]}
  fmt = lambda x, f: "not reached" if x is None else format(x, f)
  lines = [f"model: {' '.join(MODEL)}; {args.steps} steps of {args.batch_size}x{args.seq_len} tokens on "
           f"{data_desc}; {DEVICES}-device data-parallel CPU mesh; low-rank rank {args.rank}, GaLore gap {args.gap}",
           "", "| optimizer | best lr | final val loss | steps to AdamW's final (x AdamW) | step time vs AdamW "
           "| state bytes per device vs AdamW |", "|---|---|---|---|---|---|"]
  for name, s in summary.items():
    steps = "not reached" if s["steps_to_adamw"] is None else f"{s['steps_to_adamw']} ({s['steps_ratio']:.2f}x)"
    lines.append(f"| {name} | {s['lr']:g} | {s['final_val']:.4f} | {steps} | {s['step_time_ratio']:.2f}x "
                 f"| {s['state_ratio']:.2f}x |")
  g = lambda n: summary.get(n)
  goals = []
  if g("c_adamw"):
    ok = g("c_adamw")["steps_ratio"] is not None and g("c_adamw")["steps_ratio"] <= 0.8
    goals.append(f"c_adamw steps <= 0.8x AdamW: {fmt(g('c_adamw')['steps_ratio'], '.2f')}x -> {'met' if ok else 'missed'}")
    ok = g("c_adamw")["step_time_ratio"] <= 1.10
    goals.append(f"c_adamw step-time overhead <= 10%: {g('c_adamw')['step_time_ratio'] - 1:+.1%} -> {'met' if ok else 'missed'}")
  if g("muon"):
    ok = g("muon")["steps_ratio"] is not None and g("muon")["steps_ratio"] <= 0.7
    goals.append(f"muon steps <= 0.7x AdamW: {fmt(g('muon')['steps_ratio'], '.2f')}x -> {'met' if ok else 'missed'}")
  if g("osd"):
    d = g("osd")["final_val"] / target - 1
    goals.append(f"osd final loss within 2% of AdamW: {d:+.2%} -> {'met' if abs(d) <= 0.02 or d < 0 else 'missed'}")
    goals.append(f"osd state <= 50% of AdamW: {g('osd')['state_ratio']:.0%} -> {'met' if g('osd')['state_ratio'] <= 0.5 else 'missed'}")
    if g("galore"):
      ok = g("osd")["final_val"] < g("galore")["final_val"]
      goals.append(f"osd final loss < galore's at rank {args.rank}: {g('osd')['final_val']:.4f} vs "
                   f"{g('galore')['final_val']:.4f} -> {'met' if ok else 'missed'}")
  if proj:
    goals.append(f"osd projector step < 0.1x one GaLore SVD refresh: {proj['osd_projector_s'] * 1e3:.2f} ms vs "
                 f"{proj['svd_refresh_s'] * 1e3:.2f} ms = {proj['ratio']:.2f}x -> {'met' if proj['ratio'] < 0.1 else 'missed'}")
  if g("distributed_lion") and g("lion"):
    d = g("distributed_lion")["final_val"] / g("lion")["final_val"] - 1
    goals.append(f"distributed_lion final loss within 2% of lion: {d:+.2%} -> {'met' if abs(d) <= 0.02 or d < 0 else 'missed'}")
  lines += ["", "Goals:"] + [f"- {x}" for x in goals] + ["", f"wall time {wall_s / 60:.1f} min"]
  return "\n".join(lines), summary


def plot(runs: list[dict], best: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 5))
  for name, r in best.items():
    steps = sorted(r["val"])
    ax.plot(steps, [r["val"][s] for s in steps], marker=".", label=f"{name} (lr {r['lr']:g})")
  ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats/byte)"); ax.grid(alpha=0.3); ax.legend()
  ax.set_title("jaxeff optimizers, best lr each")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench optimizers", description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument("--rank", type=int, default=32, help="GaLore / OSD rank (hidden size is 128)")
  p.add_argument("--gap", type=int, default=50, help="GaLore update_proj_gap")
  p.add_argument("--optimizers", default=",".join(SWEEP), help="comma-separated names (adamw is always run)")
  p.add_argument("--lrs-per-opt", type=int, default=2, help="how many of each sweep's learning rates to try")
  p.add_argument("--repeats", type=int, default=10, help="timed calls for the projector-cost comparison")
  p.add_argument("--quick", action="store_true", help="smoke run: 20 steps, one lr each, no projector timing")
  p.add_argument("--out", default="bench-optimizers", help="directory for optimizers.png and optimizers.json")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.eval_every, args.lrs_per_opt, args.repeats = 20, 10, 1, 0

  # Distributed Lion needs a data-parallel mesh: 8 CPU devices, set before jax starts its backend.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
  import jax
  if len(jax.devices()) < DEVICES:
    print(f"error: needs {DEVICES} devices, found {len(jax.devices())} (set XLA_FLAGS="
          f"--xla_force_host_platform_device_count={DEVICES} on CPU)", file=__import__("sys").stderr)
    return 2

  names = ["adamw"] + [n for n in args.optimizers.split(",") if n and n != "adamw"]
  unknown = [n for n in names if n not in SWEEP]
  if unknown:
    print(f"error: unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(SWEEP)}", file=__import__("sys").stderr)
    return 2
  data_path = str(SHAKESPEARE) if SHAKESPEARE.exists() else None
  data_desc = "tinyshakespeare.txt" if data_path else "the embedded stdlib corpus"
  t0 = time.perf_counter()
  runs = []
  for name in names:
    for lr in SWEEP[name][:args.lrs_per_opt]:
      r = run_one(name, lr, args, data_path)
      print(f"{name:17s} lr {lr:<8g} final val {r['final_val']:.4f}", flush=True)
      runs.append(r)
  best = {}
  for r in runs:
    if r["name"] not in best or r["final_val"] < best[r["name"]]["final_val"]:
      best[r["name"]] = r
  for name, t in step_times(best, args, rounds=1 if args.quick else 5, steps=2 if args.quick else 5).items():
    best[name]["step_s"] = t
  proj = projector_cost(args) if args.repeats and "osd" in names and "galore" in names else {}
  table, summary = report(best, proj, args, time.perf_counter() - t0, data_desc)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  plot(runs, best, out / "optimizers.png")
  (out / "optimizers.json").write_text(json.dumps({"runs": runs, "summary": summary, "projector": proj,
                                                    "args": vars(args)}, indent=2))
  print()
  print(table)
  print(f"\ncurves: {out / 'optimizers.png'}; data: {out / 'optimizers.json'}")
  return 0
