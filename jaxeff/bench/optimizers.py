"""Optimizer comparison: `python -m jaxeff.bench optimizers [--out DIR] [--resume | --report] [--quick]`.

Trains one byte-level Llama (hidden 256, 4 layers; ../shared/data/tinyshakespeare.txt when
present, else the embedded corpus) with every optimizer in `jaxeff.optim` on a data-parallel CPU
mesh of `--workers` devices (Distributed Lion's workers; the others see the all-reduced gradient),
with global-norm clipping where the optimizer's spec asks for it, warmup + cosine to 0.1x, and
weight decay on matrices.

Protocol (issue 10):
- A learning-rate sweep of >= 5 values per optimizer (seed 0), widened by the grid factor until the
  best final validation loss is strictly inside the grid.
- At each best learning rate, `--seeds` seeds (model init and data order): mean and spread of
  the final validation loss and of the steps to the target.
- The target is AdamW's final validation loss at its best learning rate, averaged over its seeds.
  Steps to target are interpolated linearly between evaluations; "x AdamW" divides them by the
  run length, the step at which AdamW reaches its own (mean) final loss by construction.
- Step times: each optimizer's compiled train step at its best learning rate, timed in
  alternating rounds after the runs, as a ratio to AdamW's. OSD's projector update against one
  GaLore SVD refresh on the model's matrices, also in alternating rounds.
- Optimizer-state bytes per device (from the compiled init's shardings), and for the low-rank
  optimizers the state ratio at several ranks.

Every finished run is appended to `DIR/optimizers_<platform>.json` at once (written atomically),
so an interrupted sweep continues with `--resume`; the plot goes beside it as a PNG.
`--optimizers a,b,c` runs those (after AdamW, the baseline) in that order. `--report` trains
nothing: it summarizes whatever the file holds, with fresh timings; goals whose optimizers have no
runs say "not measured", and those whose sweep is unfinished show their numbers, undecided.
The loop asks each optimizer's `jaxeff.optim.spec` what it needs (per-device gradients, clipping,
a mesh, logical axes); the tables below (grids, extra hyperparameters, goals) are data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time

from jaxeff.bench import common

BASELINE = "adamw"

# Starting learning-rate grids, factor 2 apart, around each family's usual setting (Lion ~4x
# below AdamW; Muon's Moonlight scale takes AdamW's lr; GaLore/OSD scale the update by 0.25). The
# first AdamW runs (1e-3 ... 8e-3, best at 1e-3) moved every family's grid down by 4x; AdamW's
# three higher learning rates stay in the results.
GRID_FACTOR = 2.0
SWEEP = {
  "adamw": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
  "c_adamw": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
  "lion": [3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4],
  "c_lion": [3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4],
  "distributed_lion": [3.125e-5, 6.25e-5, 1.25e-4, 2.5e-4, 5e-4],
  "muon": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
  "c_muon": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
  "galore": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3],
  "osd": [5e-4, 1e-3, 2e-3, 4e-3, 8e-3],
}
WEIGHT_DECAY = {"lion": 0.3, "c_lion": 0.3, "distributed_lion": 0.3}  # Lion: lr ~3x lower, wd ~3x higher
DEFAULT_WEIGHT_DECAY = 0.1
LOW_RANK = {"rank": 32, "update_proj_gap": 200}  # given to the optimizers whose factory takes them
STATE_RANKS = [8, 16, 32, 64, 128]
MIN_LRS = 5  # learning rates per optimizer before its best counts as found
PROJECTOR_COST = ("osd", "galore")  # OSD's per-step projector update vs one GaLore SVD refresh

# (kind, optimizer, other / threshold): the goals, checked by `goals()`.
GOALS = [
  ("steps", "c_adamw", 0.8),
  ("step_time", "c_adamw", 1.10),
  ("steps", "muon", 0.7),
  ("final_within", "osd", (BASELINE, 0.02)),
  ("state", "osd", 0.5),
  ("final_below", "osd", "galore"),
  ("final_within", "distributed_lion", ("lion", 0.02)),
  ("projector", "osd", 0.1),
]

MODEL = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2)
QUICK_MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run's result depends on (a resumed file must match it)."""

  model: dict
  steps: int
  batch_size: int
  seq_len: int
  workers: int
  warmup: int
  eval_every: int
  eval_batches: int
  data: str


# ---------------------------------------------------------------------------- one optimizer


class Trainer:
  """One optimizer's train step, the training engine's own (`jaxeff.training.make_train_step`:
  gradients as the optimizer's spec asks, clipping, weight decay on matrices), with its peak
  learning rate passed per call; and the shared eval step."""

  def __init__(self, name: str, ctx: dict):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxeff import optim, training

    self.name, self.ctx = name, ctx
    spec = optim.spec(name)
    mesh, setup = ctx["mesh"], ctx["setup"]
    opt = training.OptimizerConfig(
      name=name,
      weight_decay=WEIGHT_DECAY.get(name, DEFAULT_WEIGHT_DECAY),
      clip_norm=1.0,
      hyperparams={k: v for k, v in LOW_RANK.items() if k in spec.parameters},
    )

    def make(learning_rate):
      return training.make_optimizer(opt, setup.steps, ctx["abstract"], mesh, learning_rate=learning_rate)[0]

    # The learning rate lives in the state (optax's documented way to set it per step), so every
    # learning rate and seed shares one compiled step.
    self.tx = optax.inject_hyperparams(make)(learning_rate=0.0)
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, setup.warmup, setup.steps, 0.1)
    engine_step = training.make_train_step(ctx["graphdef"], self.tx, spec, mesh)

    def train_step(state, batch, peak_lr):
      lr = (peak_lr * shape(state.step)).astype(jnp.float32)  # state.step: steps taken so far
      opt_state = state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr})
      return engine_step(state.replace(opt_state=opt_state), batch)

    self.step = jax.jit(train_step, donate_argnums=0)
    init = jax.jit(
      lambda params: training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
      )
    )
    self.init_state = lambda seed: init(ctx["init_params"](seed))

  def state_bytes_per_device(self) -> int:
    import jax
    import numpy as np

    params = self.ctx["abstract"]
    compiled = jax.jit(self.tx.init).lower(params).compile()
    shapes = jax.eval_shape(self.tx.init, params)
    return int(
      sum(
        np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for s, x in zip(jax.tree.leaves(compiled.output_shardings), jax.tree.leaves(shapes))
      )
    )


def run_one(trainer: Trainer, lr: float, seed: int, log) -> dict:
  """Trains from scratch; validation at step 0 and every eval_every steps (and the last)."""
  import numpy as np

  ctx, setup = trainer.ctx, trainer.ctx["setup"]
  state = trainer.init_state(np.uint32(seed))
  batches = ctx["train_batches"](seed)
  val, losses, t0 = {}, [], time.perf_counter()
  val[0] = ctx["evaluate"](state.params)
  diverged = False
  for step in range(1, setup.steps + 1):
    state, metrics = trainer.step(state, next(batches), np.float32(lr))
    loss = float(metrics["loss"])  # also keeps XLA:CPU's fake devices in step (see jaxeff.training.loop)
    losses.append(loss)
    if not math.isfinite(loss):
      diverged = True
      break
    if step % setup.eval_every == 0 or step == setup.steps:
      val[step] = ctx["evaluate"](state.params)
      log(f"  {trainer.name} lr {lr:g} seed {seed} step {step}: train {loss:.4f} val {val[step]:.4f}")
  final = val[max(val)] if not diverged else float("inf")
  return {
    "name": trainer.name,
    "lr": lr,
    "seed": seed,
    "val": val,
    "final_val": final,
    "diverged": diverged,
    "last_train_loss": losses[-1] if losses else None,
    "wall_s": time.perf_counter() - t0,
  }


# ---------------------------------------------------------------------------- analysis


def steps_to(curve: dict[int, float], target: float) -> float | None:
  """First step at which the validation curve reaches `target`, linear between evaluations."""
  pts = sorted((int(k), v) for k, v in curve.items())
  for i, (step, loss) in enumerate(pts):
    if loss <= target:
      if i == 0:
        return float(step)
      s0, l0 = pts[i - 1]
      return s0 + (l0 - target) / (l0 - loss) * (step - s0)
  return None


def best_lr(runs: list[dict], name: str) -> float | None:
  sweep = [r for r in runs if r["name"] == name and r["seed"] == 0 and not r["diverged"]]
  return min(sweep, key=lambda r: r["final_val"])["lr"] if sweep else None


def middle_out(grid: list[float]) -> list[float]:
  """The grid from its centre outwards: a sweep cut short has tried the likeliest values first."""
  centre = math.sqrt(grid[0] * grid[-1])
  return sorted(grid, key=lambda lr: (abs(math.log(lr / centre)), lr))


def next_lr(runs: list[dict], name: str, max_lrs: int) -> float | None:
  """The learning rate to add when the best is at an edge of the tried grid (None: inside)."""
  tried = sorted({r["lr"] for r in runs if r["name"] == name and r["seed"] == 0})
  best = best_lr(runs, name)
  if best is None or len(tried) >= max_lrs:
    return None
  if best == tried[0]:
    return tried[0] / GRID_FACTOR
  if best == tried[-1]:
    return tried[-1] * GRID_FACTOR
  return None


def _mean_std(xs: list[float]) -> tuple[float, float]:
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict], names: list[str], setup: Setup, extras: dict, seeds_wanted: int = 3) -> dict:
  """Per optimizer at its best lr: final loss and steps to AdamW's mean final loss over seeds.

  `complete` says whether the optimizer's protocol finished: >= MIN_LRS learning rates with the
  best strictly inside, and `seeds_wanted` seeds at it. Goals on incomplete ones stay undecided.
  """
  out = {}
  base_lr = best_lr(runs, BASELINE)
  base = [r for r in runs if r["name"] == BASELINE and r["lr"] == base_lr]
  target = statistics.fmean(r["final_val"] for r in base)
  for name in names:
    lr = best_lr(runs, name)
    if lr is None:
      out[name] = {"best_lr": None, "runs": sum(r["name"] == name for r in runs), "complete": False}
      out[name].update({key: per_name[name] for key, per_name in extras.items() if name in per_name})
      continue
    seeds = [r for r in runs if r["name"] == name and r["lr"] == lr]
    finals = [r["final_val"] for r in seeds]
    steps = [steps_to(r["val"], target) for r in seeds]
    reached = [s for s in steps if s is not None]
    tried = sorted({r["lr"] for r in runs if r["name"] == name and r["seed"] == 0})
    mean, std = _mean_std(finals)
    inside = tried[0] < lr < tried[-1]
    out[name] = {
      "best_lr": lr,
      "lrs": tried,
      "inside_grid": inside,
      "complete": inside and len(tried) >= MIN_LRS and len(seeds) >= seeds_wanted,
      "runs": sum(r["name"] == name for r in runs),
      "sweep": {str(r["lr"]): r["final_val"] for r in runs if r["name"] == name and r["seed"] == 0},
      "seeds": len(seeds),
      "final_val": finals,
      "final_mean": mean,
      "final_std": std,
      "steps_to_target": steps,
      "reached": len(reached),
      "steps_ratio": [s / setup.steps for s in reached],
      "steps_ratio_mean": statistics.fmean(reached) / setup.steps if reached else None,
    }
    for key, per_name in extras.items():
      if name in per_name:
        out[name][key] = per_name[name]
  return {"target": target, "optimizers": out}


def goals(summary: dict, projector: dict | None) -> list[tuple[str, bool | None]]:
  """(line, met) for every goal; met None when it is not decided: an optimizer it needs has no
  runs (not measured) or an unfinished protocol (partial: the numbers are shown, undecided)."""
  opt = summary["optimizers"]
  lines = []
  have = lambda *ns: all(n in opt and opt[n].get("best_lr") is not None for n in ns)
  for kind, name, arg in GOALS:
    needs = [name, arg[0]] if kind == "final_within" else [name, arg] if kind == "final_below" else [name]
    needs = [] if kind in ("state", "projector") else needs
    if not have(*needs):
      missing = [n for n in needs if not have(n)]
      lines.append((f"{goal_title(kind, name, arg)}: not measured (no finished run of {', '.join(missing)})", None))
      continue
    partial = [n for n in needs if not opt[n]["complete"]]
    before = len(lines)
    if kind == "steps" and have(name):
      s = opt[name]
      if s["reached"] < s["seeds"]:
        lines.append(
          (f"{name} steps to AdamW's final loss <= {arg}x: reached by {s['reached']}/{s['seeds']} seeds", False)
        )
      else:
        r = s["steps_ratio"]
        lines.append(
          (
            f"{name} steps to AdamW's final loss <= {arg}x: {statistics.fmean(r):.2f}x "
            f"(seeds {min(r):.2f}-{max(r):.2f})",
            statistics.fmean(r) <= arg,
          )
        )
    elif kind == "step_time" and have(name) and "step_time_ratio" in opt[name]:
      t = opt[name]["step_time_ratio"]
      lines.append((f"{name} step time <= {arg:.2f}x AdamW's: {t:.2f}x", t <= arg))
    elif kind == "final_within" and have(name, arg[0]):
      other, tol = arg
      a, b = opt[name], opt[other]
      d = a["final_mean"] / b["final_mean"] - 1
      spread = math.hypot(a["final_std"] / b["final_mean"], b["final_std"] / b["final_mean"])
      lines.append(
        (
          f"{name} final loss within {tol:.0%} of {other}'s: {a['final_mean']:.4f} vs "
          f"{b['final_mean']:.4f} = {d:+.2%} (seed spread +-{spread:.2%})",
          d <= tol,
        )
      )
    elif kind == "final_below" and have(name, arg):
      a, b = opt[name], opt[arg]
      d = a["final_mean"] - b["final_mean"]
      lines.append(
        (
          f"{name} final loss below {arg}'s at equal rank: {a['final_mean']:.4f} +- {a['final_std']:.4f} "
          f"vs {b['final_mean']:.4f} +- {b['final_std']:.4f} ({d:+.4f})",
          d < 0,
        )
      )
    elif kind == "state" and "state_ratio" in opt.get(name, {}):
      s = opt[name]["state_ratio"]
      lines.append((f"{name} state <= {arg:.0%} of AdamW's: {s:.1%}", s <= arg))
    elif kind == "projector" and projector:
      r = projector["ratio"]
      lines.append(
        (
          f"{name} projector step < {arg}x one GaLore SVD refresh: {projector['osd_projector_ms']:.2f} ms "
          f"vs {projector['svd_refresh_ms']:.2f} ms = {r:.3f}x",
          r < arg,
        )
      )
    if len(lines) == before:
      lines.append((f"{goal_title(kind, name, arg)}: not measured in this run", None))
    elif partial:
      detail = "; ".join(
        f"{n}: {len(opt[n]['lrs'])} lrs{'' if opt[n]['inside_grid'] else ', best at the edge'}, "
        f"{opt[n]['seeds']} seed(s)"
        for n in partial
      )
      lines[-1] = (f"{lines[-1][0]} [partial sweep, undecided: {detail}]", None)
  return lines


def goal_title(kind: str, name: str, arg) -> str:
  return {
    "steps": f"{name} steps to AdamW's final loss <= {arg}x",
    "step_time": f"{name} step time <= {arg}x AdamW's",
    "final_within": f"{name} final loss within {arg[1]:.0%} of {arg[0]}'s" if kind == "final_within" else "",
    "final_below": f"{name} final loss below {arg}'s at equal rank",
    "state": f"{name} state <= {arg}x AdamW's",
    "projector": f"{name} projector step < {arg}x one GaLore SVD refresh",
  }[kind]


def verdict(met: bool | None) -> str:
  return "not decided" if met is None else "met" if met else "missed"


# ---------------------------------------------------------------------------- timing


def step_times(trainers: dict, best: dict, rounds: int, steps: int) -> dict[str, float]:
  """Median seconds per train step of each optimizer at its best lr, in alternating rounds."""
  import numpy as np

  live = {}
  for name, tr in trainers.items():
    live[name] = [tr.init_state(np.uint32(0)), tr.ctx["train_batches"](0)]
    state, metrics = tr.step(live[name][0], next(live[name][1]), np.float32(best[name]))
    float(metrics["loss"])  # compiled and warm
    live[name][0] = state
  times = {name: [] for name in trainers}
  for _ in range(rounds):
    for name, tr in trainers.items():
      state, batches = live[name]
      for _ in range(steps):
        batch = next(batches)
        t0 = time.perf_counter()
        state, metrics = tr.step(state, batch, np.float32(best[name]))
        float(metrics["loss"])
        times[name].append(time.perf_counter() - t0)
      live[name][0] = state
  return {name: statistics.median(ts) for name, ts in times.items()}


def projector_cost(ctx: dict, rounds: int) -> dict:
  """One GaLore SVD refresh vs one OSD projector update, on the model's projected matrices.

  Each is the code the optimizer runs, jitted on one device: GaLore's refresh is the top-r SVD of
  every projected gradient (`projection.svd_projector`); OSD's update is the online-PCA gradient
  of every projector (`osd.projector_gradient`) and P's AdamW step. Timed in alternating rounds.
  """
  import jax

  from jaxeff import sharding

  with jax.set_mesh(sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])):
    return _projector_cost(ctx, rounds)


def _projector_cost(ctx: dict, rounds: int) -> dict:
  import jax
  import optax

  from jaxeff.optim import matrices, projection
  from jaxeff.optim.osd import projector_gradient

  params = jax.device_put(ctx["params0"], jax.devices()[0])
  dims = matrices.matrix_dims(params, logical_axes=ctx["axes"], rule="project")
  views = [(x, matrices.MatrixView(x.shape, d)) for x, d in zip(jax.tree.leaves(params), dims) if d is not None]
  key = jax.random.key(1)
  canon = [v.to_canonical(jax.random.normal(jax.random.fold_in(key, i), x.shape)) for i, (x, v) in enumerate(views)]
  rank = LOW_RANK["rank"]
  svd = jax.jit(lambda gcs: [projection.svd_projector(gc, min(rank, gc.shape[-1])) for gc in gcs])
  p_adam = optax.scale_by_adam()

  @jax.jit
  def osd_update(ps, gcs, state):
    d, state = p_adam.update([projector_gradient(p, gc) for p, gc in zip(ps, gcs)], state)
    return [p - 1e-3 * (u + 0.01 * p) for p, u in zip(ps, d)], state

  ps = svd(canon)
  state = p_adam.init(ps)
  calls = {"svd_refresh": lambda: svd(canon), "osd_projector": lambda: osd_update(ps, canon, state)}
  med = common.alternating(calls, rounds)
  return {
    "svd_refresh_ms": med["svd_refresh"] * 1e3,
    "osd_projector_ms": med["osd_projector"] * 1e3,
    "ratio": med["osd_projector"] / med["svd_refresh"],
    "rounds": rounds,
    "matrices": len(views),
    "shapes": sorted({tuple(gc.shape) for gc in canon}),
  }


def state_ratio_table(abstract, names: list[str], ranks: list[int]) -> dict:
  """State bytes relative to AdamW's for each optimizer taking a `rank`, at several ranks: the
  whole model (`abstract`: its parameters' shapes as an `nnx.State`), and its projected matrices
  alone."""
  import jax
  import numpy as np

  from jaxeff import optim

  axes = optim.logical_axes_from_state(abstract)
  # Arrays only: the int32 step counters (a few bytes) would blur exact ratios such as 5r / 2d.
  nbytes = lambda tree: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim))
  adamw = nbytes(jax.eval_shape(optim.build(BASELINE, learning_rate=1e-3).init, abstract))
  # The projected matrices alone: a GaLore-style optimizer with everything else masked out.
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  projected = [
    any(a in optim.PROJECTED_AXES for a in names_) and not any(a in optim.VOCAB_AXES for a in names_)
    for names_ in flat_axes
  ]
  leaves = jax.tree.leaves(abstract)
  mat_leaves = [x for x, p in zip(leaves, projected) if p]
  mat_axes = [a for a, p in zip(flat_axes, projected) if p]
  adamw_mats = 2 * sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in mat_leaves)
  table = {}
  for name in names:
    spec = optim.spec(name)
    if "rank" not in spec.parameters:
      continue
    table[name] = {}
    for r in ranks:
      whole = nbytes(jax.eval_shape(optim.build(name, learning_rate=1e-3, rank=r, logical_axes=axes).init, abstract))
      mats = nbytes(
        jax.eval_shape(optim.build(name, learning_rate=1e-3, rank=r, logical_axes=mat_axes).init, mat_leaves)
      )
      table[name][str(r)] = {"model": whole / adamw, "projected_matrices": mats / adamw_mats}
  return table


# ---------------------------------------------------------------------------- setup and output


def build_context(setup: Setup, data_path: str | None) -> dict:
  """Model, mesh, data and the shared eval step for every optimizer's runs."""
  import jax
  import numpy as np
  from flax import nnx

  from jaxeff import data as data_lib
  from jaxeff import optim, sharding, training
  from jaxeff.config import ModelConfig
  from jaxeff.models import Llama

  model_cfg = ModelConfig(**setup.model)
  # jaxeff's (data, fsdp, tensor) mesh, all workers on "data"; the caller enters it (jax.set_mesh).
  mesh = sharding.make_mesh({"data": setup.workers}, devices=jax.devices()[: setup.workers])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0))))
  replicated = jax.NamedSharding(mesh, jax.P())
  by_batch = jax.NamedSharding(mesh, jax.P("data"))
  init_params = jax.jit(
    lambda seed: nnx.state(Llama(model_cfg, rngs=nnx.Rngs(jax.random.key(seed)))), out_shardings=replicated
  )

  text = data_lib.TextData.load(data_lib.DataConfig(paths=[data_path] if data_path else None))
  put = lambda b: {k: jax.device_put(v, by_batch) for k, v in b.items()}

  def train_batches(seed: int):
    for b in data_lib.train_iterator(
      dataclasses.replace(text, seed=seed), seq_len=setup.seq_len, batch_size=setup.batch_size
    ):
      yield put(b)

  val = [
    put(b)
    for b in data_lib.val_batches(
      text, seq_len=setup.seq_len, batch_size=setup.batch_size, max_batches=setup.eval_batches
    )
  ]
  eval_step = jax.jit(training.make_eval_step(graphdef))

  def evaluate(params) -> float:
    return float(np.mean([float(eval_step(params, b)) for b in val]))

  return {
    "setup": setup,
    "model_cfg": model_cfg,
    "mesh": mesh,
    "graphdef": graphdef,
    "abstract": abstract,
    "axes": optim.logical_axes_from_state(abstract),
    "matrices": jax.tree.map(lambda p: p.ndim >= 2, abstract),
    "init_params": init_params,
    "train_batches": train_batches,
    "evaluate": evaluate,
    "params0": init_params(np.uint32(0)),
  }


def load_runs(path: pathlib.Path, setup: Setup) -> list[dict]:
  saved = json.loads(path.read_text())
  if saved.get("setup") != json.loads(json.dumps(dataclasses.asdict(setup))):
    raise ValueError(
      f"{path} was made with a different setup {saved.get('setup')}; use another --out or the same options"
    )
  runs = saved["runs"]
  for r in runs:
    r["val"] = {int(k): v for k, v in r["val"].items()}
  return runs


def report(summary: dict, goal_lines, setup: Setup, data_desc: str, projector, wall_s: float) -> str:
  fmt_range = lambda xs, f: f"{min(xs):{f}}-{max(xs):{f}}" if xs else "-"
  m = setup.model
  lines = [
    f"model: hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_layers']} layers, "
    f"{m['num_heads']}/{m['num_kv_heads']} heads; {setup.steps} steps of {setup.batch_size}x{setup.seq_len} "
    f"tokens on {data_desc}; {setup.workers} data-parallel workers ({setup.batch_size // setup.workers} "
    f"sequences each); low-rank {LOW_RANK}",
    f"target: AdamW's final validation loss at its best lr, mean over seeds = {summary['target']:.4f}",
    "",
  ]
  cells = []
  for name, s in summary["optimizers"].items():
    if s.get("best_lr") is None:
      state_r = f"{s['state_ratio']:.2f}x" if "state_ratio" in s else "-"
      cells.append((name, "-", "-", "all runs diverged" if s["runs"] else "not run", "-", "-", state_r))
      continue
    edge = "" if s["inside_grid"] else " (edge!)"
    edge += "" if s["complete"] else " (partial)"
    reached = s["steps_to_target"]
    if s["reached"]:
      partial = "" if s["reached"] == s["seeds"] else f"; {s['reached']}/{s['seeds']} seeds reached"
      steps = (
        f"{statistics.fmean(x for x in reached if x is not None):.0f} "
        f"({s['steps_ratio_mean']:.2f}x, seeds {fmt_range(s['steps_ratio'], '.2f')}{partial})"
      )
    else:
      steps = "not reached"
    time_r = f"{s['step_time_ratio']:.2f}x" if "step_time_ratio" in s else "-"
    state_r = f"{s['state_ratio']:.2f}x" if "state_ratio" in s else "-"
    lrs = ", ".join(f"{x:g}" for x in s["lrs"])
    final = f"{s['final_mean']:.4f} +- {s['final_std']:.4f} ({s['seeds']})"
    cells.append((name, lrs, f"{s['best_lr']:g}{edge}", final, steps, time_r, state_r))
  header = ("optimizer", "lrs tried", "best lr", "final val loss (mean +- std, seeds)")
  header += ("steps to target (x run length)", "step time vs AdamW", "state/device vs AdamW")
  lines += common.markdown_table(header, cells)
  lines += ["", "Goals:"] + [f"- {text} -> {verdict(ok)}" for text, ok in goal_lines]
  if projector:
    lines.append(
      f"\nprojector timing: {projector['matrices']} projected matrices (canonical [batch, big, small] "
      f"{projector['shapes']}), medians of {projector['rounds']} alternating rounds"
    )
  lines.append(f"\nwall time {wall_s / 60:.1f} min")
  return "\n".join(lines)


def state_table_text(table: dict) -> str:
  ranks = sorted({int(r) for t in table.values() for r in t})
  cells = [
    [name, part.replace("_", " "), *(f"{t[str(r)][part]:.1%}" for r in ranks)]
    for name, t in table.items()
    for part in ("projected_matrices", "model")
  ]
  return "\n".join(common.markdown_table(["optimizer", "part", *(f"rank {r}" for r in ranks)], cells))


def plot(runs: list[dict], summary: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  import numpy as np

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
  lo = summary["target"]
  lowest = lo
  for name, s in summary["optimizers"].items():
    if s.get("best_lr") is None:
      continue
    curves = [r["val"] for r in runs if r["name"] == name and r["lr"] == s["best_lr"]]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    vals = np.array([[c[k] for k in steps] for c in curves])
    partial = "" if s.get("complete", True) else ", sweep unfinished"
    (line,) = ax.plot(steps, vals.mean(0), label=f"{name} (lr {s['best_lr']:g}, {len(curves)} seeds{partial})")
    ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
    sweep = sorted((float(k), v) for k, v in s["sweep"].items() if math.isfinite(v))
    bx.plot([k for k, _ in sweep], [v for _, v in sweep], marker="o", color=line.get_color(), label=name)
    lowest = min([lowest, *(v for _, v in sweep)])
  ax.axhline(lo, color="k", lw=0.8, ls="--", label="target (AdamW's final)")
  # The floor follows the best run so no optimizer's best point falls off either panel.
  ax.set_ylim(min(lo - 0.3, lowest - 0.05), lo + 1.2)
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.grid(alpha=0.3)
  ax.set_title("best lr each: mean over seeds, band = min..max")
  ax.legend(fontsize=7)
  bx.set_xscale("log")
  bx.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  bx.set_xlabel("peak learning rate")
  bx.set_ylabel("final validation loss (seed 0)")
  bx.set_ylim(min(lo - 0.2, lowest - 0.05), lo + 0.8)
  bx.grid(alpha=0.3)
  bx.set_title("learning-rate sweeps")
  bx.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench optimizers", description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch-size", type=int, default=32, help="global sequences per step")
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--workers", type=int, default=4, help="data-parallel devices (Distributed Lion's workers)")
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--eval-every", type=int, default=25)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--seeds", type=int, default=3, help="seeds at each optimizer's best learning rate")
  p.add_argument("--max-lrs", type=int, default=9, help="cap on learning rates per optimizer when widening")
  p.add_argument("--optimizers", default=",".join(SWEEP), help=f"comma-separated ({BASELINE} is always run)")
  p.add_argument("--timing-rounds", type=int, default=5, help="alternating rounds of step timing")
  p.add_argument("--timing-steps", type=int, default=3, help="timed steps per optimizer per round")
  p.add_argument("--projector-rounds", type=int, default=15, help="alternating rounds of projector timing")
  p.add_argument(
    "--quick", action="store_true", help="smoke run: tiny model, 20 steps, one lr and one seed each, short timings"
  )
  p.add_argument("--resume", action="store_true", help="continue the results file in --out")
  p.add_argument(
    "--report",
    action="store_true",
    help="train nothing: summarize the results file in --out (every optimizer in it; goals of "
    "optimizers without runs say 'not measured'), with fresh step and projector timings",
  )
  p.add_argument("--out", default="bench-optimizers", help="directory for optimizers_<platform>.json/.png")
  p.add_argument(
    "--data",
    default=None,
    help="text file to train on (default: ../shared/data/tinyshakespeare.txt beside the repo when "
    "present, else the embedded stdlib corpus)",
  )
  args = p.parse_args(argv)
  names = [BASELINE] + [n for n in args.optimizers.split(",") if n and n != BASELINE]
  unknown = [n for n in names if n not in SWEEP]
  if unknown:
    return common.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(SWEEP)}")
  if args.quick:
    args.steps = 20 if "--steps" not in (argv if argv is not None else sys.argv) else args.steps
    args.batch_size, args.seq_len, args.eval_every, args.eval_batches, args.seeds = 8, 32, 10, 2, 1
    args.timing_rounds, args.timing_steps, args.projector_rounds, args.warmup = 1, 1, 2, 2
  for flag in ("steps", "batch_size", "seq_len", "workers", "eval_every", "eval_batches", "seeds"):
    if getattr(args, flag) < 1:
      return common.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  if args.batch_size % args.workers:
    return common.error(f"--batch-size {args.batch_size} must be divisible by --workers {args.workers}")

  # The workers are devices: on CPU, ask XLA for enough of them before jax starts its backend.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.workers}".strip()
  import jax

  if jax.device_count() < args.workers:
    return common.error(
      f"--workers {args.workers} needs as many devices, found {jax.device_count()} (on CPU set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={args.workers})"
    )

  if args.data is not None and not pathlib.Path(args.data).is_file():
    return common.error(f"--data {args.data}: no such file")
  shared = common.shared_text()
  data_path = args.data or (str(shared) if shared else None)
  setup = Setup(
    model=QUICK_MODEL if args.quick else MODEL,
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    workers=args.workers,
    warmup=min(args.warmup, args.steps - 1),
    eval_every=args.eval_every,
    eval_batches=args.eval_batches,
    data=pathlib.Path(data_path).name if data_path else "embedded stdlib corpus",
  )
  out = pathlib.Path(args.out)
  path = out / f"optimizers_{jax.default_backend()}.json"
  runs: list[dict] = []
  if args.report and not path.exists():
    return common.error(f"--report needs a results file, {path} does not exist")
  if path.exists():
    if not (args.resume or args.report):
      return common.error(
        f"{path} exists; pass --resume to continue it, or choose another --out (nothing is overwritten)"
      )
    try:
      runs = load_runs(path, setup)
    except (ValueError, KeyError) as e:
      return common.error(str(e))
  if args.report:
    if not any(r["name"] == BASELINE for r in runs):
      return common.error(f"--report: {path} has no {BASELINE} runs (the target comes from them)")
    names = [n for n in SWEEP if any(r["name"] == n for r in runs)]
  out.mkdir(parents=True, exist_ok=True)

  t0 = time.perf_counter()
  log = lambda msg: print(msg, flush=True)
  ctx = build_context(setup, data_path)
  with jax.set_mesh(ctx["mesh"]):
    return _run_all(args, names, setup, ctx, runs, path, t0, log)


def _run_all(args, names, setup, ctx, runs, path, t0, log) -> int:
  import jax

  payload = lambda **more: {"setup": dataclasses.asdict(setup), "runs": runs, **more}
  trainers = {}
  for name in names:
    trainers[name] = Trainer(name, ctx)
    done = lambda lr, seed: any(r["name"] == name and r["lr"] == lr and r["seed"] == seed for r in runs)

    def run(lr, seed):
      if not done(lr, seed):
        r = run_one(trainers[name], lr, seed, log)
        runs.append(r)
        common.write_json(path, payload(), indent=1)
        log(
          f"{name:17s} lr {lr:<9g} seed {seed}: final val {r['final_val']:.4f}"
          f"{' (diverged)' if r['diverged'] else ''} [{r['wall_s']:.0f} s]"
        )

    if args.report:
      continue
    grid = SWEEP[name][len(SWEEP[name]) // 2 :][:1] if args.quick else middle_out(SWEEP[name])
    for lr in grid:
      run(lr, 0)
    while not args.quick and (lr := next_lr(runs, name, args.max_lrs)) is not None:
      log(f"{name}: best lr at the grid's edge, widening to {lr:g}")
      run(lr, 0)
    best = best_lr(runs, name)
    for seed in range(1, args.seeds if best is not None else 1):
      run(best, seed)

  best = {n: best_lr(runs, n) for n in names}
  timed = {n: trainers[n] for n in names if best[n] is not None}
  log("timing train steps in alternating rounds ...")
  times = step_times(timed, best, args.timing_rounds, args.timing_steps)
  # State bytes, the projector timing and the state table need no training: a report gives them
  # for every optimizer, run or not.
  all_names = list(SWEEP) if args.report else names
  state = {n: (trainers.get(n) or Trainer(n, ctx)).state_bytes_per_device() for n in all_names}
  have_projector = all(n in all_names for n in PROJECTOR_COST)
  projector = projector_cost(ctx, args.projector_rounds) if have_projector else None
  ranks = [r for r in STATE_RANKS if r <= setup.model["hidden_size"]]
  state_table = state_ratio_table(ctx["abstract"], all_names, ranks)
  extras = {
    "step_time_ratio": {n: t / times[BASELINE] for n, t in times.items()} if BASELINE in times else {},
    "step_time_s": times,
    "state_ratio": {n: b / state[BASELINE] for n, b in state.items()},
    "state_bytes_per_device": state,
  }
  summary = summarize(runs, all_names, setup, extras, seeds_wanted=args.seeds)
  goal_lines = goals(summary, projector)
  wall = time.perf_counter() - t0
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  common.write_json(
    path,
    payload(
      summary=summary,
      projector=projector,
      state_ratios=state_table,
      goals=[{"goal": g, "met": ok, "verdict": verdict(ok)} for g, ok in goal_lines],
      machine={
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "loadavg_at_end": load,
        "backend": jax.default_backend(),
      },
      wall_s_this_invocation=wall,
    ),
    indent=1,
  )
  plot(runs, summary, path.with_suffix(".png"))
  print()
  print(report(summary, goal_lines, setup, setup.data, projector, wall))
  print("\nstate relative to AdamW at several ranks:\n" + state_table_text(state_table))
  print(f"\nresults: {path}; curves: {path.with_suffix('.png')}")
  return 0
