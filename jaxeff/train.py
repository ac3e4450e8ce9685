"""Train a sharded Llama-family model: `python -m jaxeff.train [--config FILE] [--resume] [key=value ...]`.

  python -m jaxeff.train                                   # small model, embedded corpus, CPU-friendly
  python -m jaxeff.train --config configs/125m.yaml data.paths='[corpus/*.txt]'
  python -m jaxeff.train steps=600 --resume                # continue the run in output_dir exactly

One jitted step: cross-entropy, gradients, an optax chain (clip -> optimizer with warmup + cosine).
Parameters are sharded by the logical-axis rules (jaxeff.sharding) over the mesh in `mesh:`; each
process feeds its slice of the global batch. Checkpoints (orbax, async) hold parameters, optimizer
state and the data iterator's position, so `--resume` continues bit for bit. Metrics go to
`output_dir/metrics.jsonl` and TensorBoard (`output_dir/tb`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from jaxeff import data as data_lib
from jaxeff import host_malloc
from jaxeff import sharding
from jaxeff.config import ConfigError, ModelConfig, from_dict, load_yaml
from jaxeff.models import Llama


@dataclasses.dataclass
class OptimizerConfig:
  name: str = "adamw"  # any name jaxeff.optim.build knows
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  decay_steps: int | None = None  # length of the cosine schedule; None -> steps
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  clip_norm: float | None = 1.0
  weight_decay: float = 0.1  # applied to matrices only (ndim >= 2), never to norms or biases
  hyperparams: dict = dataclasses.field(default_factory=dict)  # extra keywords for jaxeff.optim.build


# Training's attention default: exact like "dense", but its backward recomputes instead of storing
# probabilities and skips masked blocks (~0.9x the train step on CPU; BENCHMARKS.md).
TRAIN_ATTENTION = "blocked"


@dataclasses.dataclass
class TrainConfig:
  model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(attention=TRAIN_ATTENTION))
  data: data_lib.DataConfig = dataclasses.field(default_factory=data_lib.DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})  # axes data, fsdp, tensor
  steps: int = 200
  batch_size: int = 16  # global, across all processes
  seq_len: int = 256
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  output_dir: str = "runs/default"
  tensorboard: bool = True
  progress: bool = True
  peak_flops_per_device: float | None = None  # for MFU; None -> a table by device kind (measured on CPU)

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_batches < 0:
      raise ConfigError(f"eval_batches must be >= 0, got {self.eval_batches}")


class TrainError(RuntimeError):
  """Training cannot start or continue (bad checkpoint, diverged loss, ...)."""


_NESTED = {"model": ModelConfig, "data": data_lib.DataConfig, "optimizer": OptimizerConfig}


def config_from_dict(values: dict) -> TrainConfig:
  values = dict(values)
  if "model" in values and (values["model"] is None or isinstance(values["model"], dict)):
    values["model"] = {"attention": TRAIN_ATTENTION, **(values["model"] or {})}
  nested = {k: from_dict(cls, values.pop(k) or {}, k) for k, cls in _NESTED.items() if k in values}
  cfg = from_dict(TrainConfig, values)
  for k, v in nested.items():
    setattr(cfg, k, v)
  return cfg


def _set_path(d: dict, dotted: str, value: Any):
  keys = dotted.split(".")
  for k in keys[:-1]:
    d = d.setdefault(k, {})
    if not isinstance(d, dict):
      raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
  d[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
  """YAML file (optional) + `key=value` overrides (values parsed as YAML) -> TrainConfig."""
  values = load_yaml(path) if path else {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"override {item!r} must look like key=value (e.g. steps=100 or model.num_layers=2)")
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
      value = raw
    _set_path(values, key.strip(), value)
  return config_from_dict(values)


def config_to_dict(cfg: TrainConfig) -> dict:
  return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------- optimizer


def make_optimizer(opt: OptimizerConfig, steps: int, params, mesh=None) -> tuple[optax.GradientTransformation, Any]:
  """clip -> jaxeff.optim.build(name) with warmup + cosine; weight decay masked to matrices.

  `mesh` is for Distributed Lion, which votes over its "data" axis. It gets no clipping: its
  gradients are per device, and a sign update is insensitive to their scale anyway.
  """
  from jaxeff import optim

  decay_steps = max(opt.decay_steps or steps, 2)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate, warmup_steps=min(opt.warmup_steps, decay_steps - 1),
      decay_steps=decay_steps, end_value=opt.learning_rate * opt.min_lr_ratio)
  matrices = jax.tree.map(lambda p: p.ndim >= 2, params)
  hyper = dict(weight_decay=opt.weight_decay, mask=matrices, logical_axes=optim.logical_axes_from_state(params))
  if mesh is not None:
    hyper["mesh"] = mesh
  hyper.update(opt.hyperparams)
  try:
    tx = optim.build(opt.name, learning_rate=schedule, **hyper)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer: {e}") from None
  if opt.clip_norm and mesh is None:
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  return tx, schedule


# ---------------------------------------------------------------------------- steps


def opt_state_shardings(opt_state, params, param_shardings, mesh):
  """Moments follow their parameter's sharding; other state (counters, low-rank projectors) is
  replicated.

  A state leaf belongs to a parameter when its tree path ends with the parameter's path and the
  shapes agree. (`optax.tree_map_params` does not fit: Muon and GaLore build their inner chains
  from the real parameter tree, which its placeholder hides.)
  """
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  owner = {tuple(path): (leaf.shape, s) for (path, leaf), s in zip(flat(params), jax.tree.leaves(param_shardings))}
  longest = max(map(len, owner), default=0)
  replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(path, leaf):
    for n in range(min(len(path), longest), 0, -1):
      if tuple(path[-n:]) in owner:
        shape, s = owner[tuple(path[-n:])]
        return s if shape == leaf.shape else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def loss_fn(model: Llama, batch: dict) -> jax.Array:
  logits = model(batch["inputs"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def make_steps(graphdef, tx, shardings=None, local_grads_mesh=None):
  """Pure functions of (params, opt_state, batch); jitted by the caller.

  `shardings=(param_shardings, opt_state_shardings)` pins the updated state to its layout, so
  XLA's propagation cannot drift it between steps (and checkpoints restore to the same layout).
  `local_grads_mesh`: hand the optimizer per-device gradients ([N, ...] over the mesh's "data"
  axis, no all-reduce), as Distributed Lion wants.
  """

  def value_and_grad(params, batch):
    return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)

  def train_step(params, opt_state, batch):
    if local_grads_mesh is None:
      loss, grads = value_and_grad(params, batch)
    else:
      from jaxeff.optim import local_grads
      per_device = local_grads(lambda p, b: value_and_grad(p, b), params, batch, mesh=local_grads_mesh)
      loss, grads = jnp.mean(per_device[0]), per_device[1]
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if shardings is not None:
      params, opt_state = jax.lax.with_sharding_constraint((params, opt_state), shardings)
    gnorm = optax.global_norm(grads)
    if local_grads_mesh is not None:  # sqrt(mean_i |g_i|^2) over the N per-device gradients
      gnorm = gnorm / jnp.sqrt(local_grads_mesh.shape["data"])
    return params, opt_state, {"loss": loss, "grad_norm": gnorm}

  def eval_step(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch)

  return train_step, eval_step


# ---------------------------------------------------------------------------- MFU

_PEAK_FLOPS = {  # dense bf16 per chip, from vendor specs
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
}


def peak_flops_per_device(cfg: TrainConfig) -> float:
  if cfg.peak_flops_per_device:
    return cfg.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  # CPU and unknown devices: measure a f32 matmul once (a few ms) instead of guessing.
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(3):
    f(a).block_until_ready()
  peak = 3 * 2 * n ** 3 / (time.perf_counter() - t)
  if jax.default_backend() == "cpu":
    peak /= len(jax.devices())  # fake CPU devices share the same cores
  return peak


# ---------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(directory: pathlib.Path, cfg: TrainConfig):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory.resolve(), options=options)


def _save(mngr, step: int, params, opt_state, iter_state, cfg: TrainConfig):
  import orbax.checkpoint as ocp

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
      data=ocp.args.JsonSave(iter_state),
      meta=ocp.args.JsonSave({"step": step, "config": config_to_dict(cfg)})))


def _restore(mngr, step: int, abstract_state, cfg: TrainConfig):
  import orbax.checkpoint as ocp

  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  saved_model = meta["config"]["model"]
  ours = config_to_dict(cfg)["model"]
  # Compute-only settings may change between runs; the architecture may not.
  free = {"dtype", "remat", "attention", "max_seq_len"}
  diff = [f"{k}: checkpoint {saved_model.get(k)!r} vs config {v!r}" for k, v in ours.items()
          if k not in free and saved_model.get(k) != v]
  if diff:
    raise TrainError(f"checkpoint step {step} in {mngr.directory} is from a different architecture ({'; '.join(diff)})")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  except ValueError as e:
    if "mismatch" not in str(e).lower():
      raise
    raise TrainError(f"checkpoint step {step} in {mngr.directory} holds optimizer state of a different "
                     f"optimizer configuration (name, clipping or hyperparameters changed?)") from None
  return restored["state"], restored["data"]


# ---------------------------------------------------------------------------- metrics


class MetricsWriter:
  """JSON lines (always) + TensorBoard event files (optional), written by process 0 only."""

  def __init__(self, out_dir: pathlib.Path, tensorboard: bool):
    self.enabled = jax.process_index() == 0
    self.jsonl = open(out_dir / "metrics.jsonl", "a") if self.enabled else None
    self.tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(out_dir / "tb"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


# ---------------------------------------------------------------------------- main loop


@dataclasses.dataclass
class TrainResult:
  model: Llama
  step: int
  losses: list[float]  # per step, this run only
  val_losses: dict[int, float]
  output_dir: pathlib.Path


def _global_batch(batch: dict, batch_sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in batch.items()}


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
  """Runs training as configured; returns the trained model and the losses."""
  out_dir = pathlib.Path(cfg.output_dir)
  ckpt_dir = out_dir / "checkpoints"
  mesh = sharding.make_mesh(cfg.mesh)
  if cfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the data x fsdp mesh size "
                      f"{mesh.shape['data'] * mesh.shape['fsdp']}")
  if cfg.batch_size % jax.process_count():
    raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {jax.process_count()} processes")
  vocab = data_lib.vocab_size(cfg.data)
  if cfg.model.vocab_size < vocab:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({vocab})")

  # Data first: a bad path or empty corpus should fail before any compilation.
  train_iter = data_lib.train_iterator(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                       process_index=jax.process_index(), process_count=jax.process_count())
  val = data_lib.val_batches(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                             max_batches=cfg.eval_batches, process_index=jax.process_index(),
                             process_count=jax.process_count())

  mngr = None
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not resume:
    raise TrainError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue, "
                     f"or choose another output_dir (nothing is overwritten)")
  if resume and not (ckpt_dir.exists() and any(ckpt_dir.iterdir())):
    raise TrainError(f"--resume: no checkpoint found in {ckpt_dir}")
  out_dir.mkdir(parents=True, exist_ok=True)

  make_model = lambda: Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))
  with_sharding = lambda tree, shard: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shard)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model))
  param_shardings = sharding.state_shardings(abstract_params, mesh)
  with jax.set_mesh(mesh):
    init_params = jax.jit(lambda: nnx.state(make_model()), out_shardings=param_shardings)
    local = cfg.optimizer.name == "distributed_lion"
    tx, schedule = make_optimizer(cfg.optimizer, cfg.steps, abstract_params, mesh=mesh if local else None)
    if local:
      # Per-device momentum [N, ...] is placed by the optimizer itself; read the layout it chose.
      opt_shardings = jax.jit(tx.init).lower(with_sharding(abstract_params, param_shardings)).compile().output_shardings
    else:
      opt_shardings = opt_state_shardings(jax.eval_shape(tx.init, abstract_params), abstract_params,
                                          param_shardings, mesh)
    init_opt = jax.jit(tx.init, out_shardings=opt_shardings)
    train_step, eval_step = make_steps(graphdef, tx, (param_shardings, opt_shardings), mesh if local else None)
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    # XLA:CPU runs each fake device on a thread of one small pool: with a second step already
    # queued, a device's share can starve while the others wait in a collective (a deadlock on a
    # 2-core machine). Accelerators keep asynchronous dispatch.
    sync_every_step = jax.default_backend() == "cpu" and mesh.size > 1
    eval_step = jax.jit(eval_step)

    mngr = _checkpoint_manager(ckpt_dir, cfg)
    start = 0
    if resume:
      start = mngr.latest_step()
      abstract = {"params": with_sharding(abstract_params, param_shardings),
                  "opt_state": with_sharding(jax.eval_shape(tx.init, abstract_params), opt_shardings)}
      state, iter_state = _restore(mngr, start, abstract, cfg)
      params, opt_state = state["params"], state["opt_state"]
      train_iter.set_state(iter_state)
    else:
      params = init_params()
      opt_state = init_opt(params)
    if jax.process_index() == 0:
      (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    batch_sharding = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    flops_per_step = cfg.model.flops_per_token(cfg.seq_len) * tokens_per_step
    peak = peak_flops_per_device(cfg) * len(jax.devices())
    writer = MetricsWriter(out_dir, cfg.tensorboard)
    losses: list[float] = []
    val_losses: dict[int, float] = {}
    pending: list[tuple[int, dict]] = []  # metrics still on device: fetched in groups to avoid a sync per step

    def flush_pending():
      nonlocal pending
      for s, m in jax.device_get(pending):
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
          last = mngr.latest_step()
          raise TrainError(f"loss became {loss} (grad norm {gnorm}) at step {s}; stopping. "
                           f"The last good checkpoint ({'step ' + str(last) if last is not None else 'none'}) "
                           f"in {ckpt_dir} is intact; lower optimizer.learning_rate or check the data")
        losses.append(loss)
      pending = []

    def evaluate():
      total = sum(float(eval_step(params, _global_batch(b, batch_sharding))) for b in val)
      return total / max(len(val), 1)

    bar = None
    if cfg.progress and jax.process_index() == 0:
      from tqdm.auto import tqdm
      bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0
    try:
      for step in range(start + 1, cfg.steps + 1):
        batch = _global_batch(next(train_iter), batch_sharding)
        params, opt_state, metrics = train_step(params, opt_state, batch)
        if sync_every_step:
          jax.block_until_ready(metrics)
        pending.append((step, metrics))
        steps_since += 1
        if step == start + 1 and step % cfg.log_every:
          # Leave compilation out of the tokens/s and MFU estimates.
          jax.block_until_ready(metrics)
          t_last, steps_since = time.perf_counter(), 0
        if step % cfg.log_every == 0 or step == cfg.steps:
          flush_pending()
          dt = time.perf_counter() - t_last
          tps = max(steps_since, 1) * tokens_per_step / dt
          record = {"loss": losses[-1], "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(schedule(step - 1)), "tokens_per_s": tps, "mfu": tps / tokens_per_step * flops_per_step / peak}
          writer.write(step, record)
          if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.1%}")
            bar.n = step
            bar.refresh()
          t_last, steps_since = time.perf_counter(), 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
          flush_pending()
          val_losses[step] = evaluate()
          writer.write(step, {"val_loss": val_losses[step]})
          if bar is not None:
            bar.write(f"step {step}: val_loss {val_losses[step]:.4f}")
          t_last = time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
          flush_pending()  # never checkpoint a diverged state
          _save(mngr, step, params, opt_state, train_iter.get_state(), cfg)
    finally:
      if bar is not None:
        bar.close()
      writer.close()
      mngr.wait_until_finished()
      mngr.close()
    model = nnx.merge(graphdef, params)
  return TrainResult(model=model, step=cfg.steps, losses=losses, val_losses=val_losses, output_dir=out_dir)


def load_checkpoint(output_dir: str | pathlib.Path, step: int | None = None, mesh=None) -> tuple[Llama, TrainConfig]:
  """The model saved by a training run (latest step by default), e.g. for evaluation or serving."""
  import orbax.checkpoint as ocp

  ckpt_dir = pathlib.Path(output_dir) / "checkpoints"
  if not ckpt_dir.exists():
    raise TrainError(f"no checkpoints in {output_dir}")
  mngr = ocp.CheckpointManager(ckpt_dir.resolve())
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise TrainError(f"no checkpoints in {ckpt_dir}")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  cfg = config_from_dict(meta["config"])
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0))))
  if mesh is not None:
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  else:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item={"params": abstract}, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract}))))
  mngr.close()
  return nnx.merge(graphdef, restored["state"]["params"]), cfg


# ---------------------------------------------------------------------------- CLI


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m jaxeff.train", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="YAML config (see configs/); defaults to the small CPU model")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
  p.add_argument("--coordinator", help="multi-process: coordinator address host:port (jax.distributed)")
  p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
  p.add_argument("--process-id", type=int, help="multi-process: this process's index")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
  p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100 model.num_layers=2")
  return p.parse_args(argv)


def _init_distributed(args):
  if args.coordinator or args.num_processes:
    if not (args.coordinator and args.num_processes and args.process_id is not None):
      raise ConfigError("--coordinator, --num-processes and --process-id go together")
    # Cross-process collectives on CPU need gloo; the flag only affects the CPU client.
    # (No jax.devices()/default_backend() before initialize: they would start the backend.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from jaxeff.hf import HFError

  expected = (ConfigError, data_lib.DataError, sharding.MeshError, TrainError, HFError)
  host_malloc.tune_for_cpu_training()  # before the backend starts; see jaxeff/host_malloc.py
  try:
    cfg = load_config(args.config, args.overrides)
    _init_distributed(args)
    result = train(cfg, resume=args.resume)
  except expected as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  if jax.process_index() == 0:
    last_val = result.val_losses[max(result.val_losses)] if result.val_losses else float("nan")
    print(f"done: step {result.step}, train loss {result.losses[-1] if result.losses else float('nan'):.4f}, "
          f"val loss {last_val:.4f}; checkpoints and metrics in {result.output_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
