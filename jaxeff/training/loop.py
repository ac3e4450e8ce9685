"""`train(cfg)`: the training loop, and `load_checkpoint` for what it saved.

  result = train(load_config(None, ["steps=50"]))      # result.model, .losses, .val_losses
  model, cfg = load_checkpoint("runs/default")          # the latest step's model, born sharded

One step directory per checkpoint (`Checkpointer`): item `params`, item `train` (step, optimizer
state, RNG), the data iterator's position (`data`) and `meta` (format, config, and the optimizer
state's signature, from which a resumed run checks that architecture and optimizer still fit).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from jaxeff import data as data_lib
from jaxeff import sharding
from jaxeff.config import ConfigError
from jaxeff.models import Llama
from jaxeff.training import hooks as hooks_lib
from jaxeff.training.checkpoint import CheckpointError, Checkpointer, describe_error
from jaxeff.training.config import TrainConfig, TrainError, config_from_dict, config_to_dict
from jaxeff.training.state import TrainState, abstract_state, init_state, signature, state_shardings
from jaxeff.training.step import make_eval_step, make_optimizer, make_train_step, optimizer_spec

CHECKPOINT_FORMAT = "jaxeff.train/2"
# Settings that change how the model computes, not what it is: free to differ on resume.
COMPUTE_ONLY = frozenset({"dtype", "remat", "attention", "max_seq_len"})


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    model: the trained model (sharded as in training).
    step: the last step.
    losses: training loss per step of this run (a resumed run starts after its checkpoint).
    val_losses: {step: validation loss}.
    output_dir: where checkpoints and metrics are.
  """

  model: Llama
  step: int
  losses: list[float]
  val_losses: dict[int, float]
  output_dir: pathlib.Path


# ---------------------------------------------------------------------------- MFU

_PEAK_FLOPS = {  # dense bf16 per chip, from vendor specs
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
}


def peak_flops_per_device(cfg: TrainConfig) -> float:
  """Peak FLOP/s of one device for MFU: the config's value, a vendor table, or (CPU) measured."""
  if cfg.peak_flops_per_device:
    return cfg.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return _measured_peak_flops()


@functools.cache
def _measured_peak_flops() -> float:
  # CPU and unknown devices: measure a f32 matmul once per process (a few ms) instead of guessing.
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


# ---------------------------------------------------------------------------- checkpoint metadata


def _meta(cfg: TrainConfig, step: int, abstract: TrainState) -> dict:
  return {"format": CHECKPOINT_FORMAT, "step": step, "config": config_to_dict(cfg),
          "opt_state": signature(abstract.opt_state)}


def check_compatible(meta: dict, cfg: TrainConfig, abstract: TrainState, where: str) -> None:
  """Raises TrainError unless a checkpoint's recorded metadata fits this run's model and optimizer."""
  if meta.get("format") != CHECKPOINT_FORMAT:
    raise TrainError(f"{where} has format {meta.get('format')!r}; this jaxeff reads {CHECKPOINT_FORMAT!r}")
  saved, ours = meta["config"]["model"], config_to_dict(cfg)["model"]
  diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}" for k, v in ours.items()
          if k not in COMPUTE_ONLY and saved.get(k) != v]
  if diff:
    raise TrainError(f"{where} is from a different architecture ({'; '.join(diff)})")
  if meta["opt_state"] != signature(abstract.opt_state):
    old, new = meta["config"]["optimizer"], config_to_dict(cfg)["optimizer"]
    changed = [f"{k}: checkpoint {old.get(k)!r} vs config {v!r}" for k, v in new.items()
               if k not in ("learning_rate", "warmup_steps", "decay_steps", "min_lr_ratio") and old.get(k) != v]
    raise TrainError(f"{where} holds optimizer state of a different optimizer configuration "
                     f"({'; '.join(changed) or 'its state has another structure'})")


# ---------------------------------------------------------------------------- the loop


def _check_layout(cfg: TrainConfig, mesh) -> None:
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.batch_size % data_parallel:
    raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the data x fsdp mesh size {data_parallel}")
  if cfg.batch_size % jax.process_count():
    raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {jax.process_count()} processes")


def train(cfg: TrainConfig, *, resume: bool = False, hooks: Sequence[hooks_lib.Hook] = ()) -> TrainResult:
  """Trains as `cfg` says: sharded over `cfg.mesh`, checkpointed, logged.

  Args:
    cfg: the run (`load_config`).
    resume: continue from the newest checkpoint in `cfg.output_dir` that reads back completely
      (bit for bit on CPU); newer, damaged ones are moved to `output_dir/damaged_checkpoints` and
      named on one stderr line. Without it, existing checkpoints are an error, never overwritten.
    hooks: extra `Hook`s, called after the built-in ones (NaN guard, metrics, eval, checkpoint).

  Returns:
    `TrainResult` with the model and this run's losses.

  Raises:
    ConfigError, DataError, MeshError: bad settings, found before any compilation.
    TrainError: an output_dir that cannot be written (before anything else), checkpoints in the
      way or missing, none that reads back, a checkpoint of another architecture or optimizer, a
      non-finite loss (the last good checkpoint stays intact).
    CheckpointError: a save that did not commit (the older checkpoints stay).
  """
  out_dir = pathlib.Path(cfg.output_dir)
  ckpt_dir = out_dir / "checkpoints"
  mesh = sharding.make_mesh(cfg.mesh)
  _check_layout(cfg, mesh)
  spec = optimizer_spec(cfg.optimizer)
  _check_writable(out_dir, ckpt_dir)  # before the data is tokenized and anything compiles
  # Data first (the tokenizer is built once, here): a bad path fails before any compilation.
  data = data_lib.TextData.load(cfg.data)
  if cfg.model.vocab_size < data.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({data.vocab_size})")
  where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = data_lib.train_iterator(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, **where)
  val = data_lib.val_batches(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_batches=cfg.eval_batches, **where)
  with Checkpointer(ckpt_dir, read_only=True) as reader:  # a killed first save left no step
    has_checkpoints = bool(reader.steps())
  if has_checkpoints and not resume:
    raise TrainError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue, "
                     f"or choose another output_dir (nothing is overwritten)")
  if resume and not has_checkpoints:
    raise TrainError(f"--resume: no checkpoint found in {ckpt_dir}")

  make_model = lambda: Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))
  graphdef, params = nnx.split(nnx.eval_shape(make_model))
  tx, schedule = make_optimizer(cfg.optimizer, cfg.steps, params, mesh)
  abstract = abstract_state(params, tx)
  shardings = state_shardings(abstract, mesh, per_device=spec.gradients == "per_device")
  with (Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints, async_save=True, remove_partial_saves=True) as ckpt,
        jax.set_mesh(mesh)):
    if resume:
      state, iter_state = _restore(ckpt, cfg, abstract, shardings, out_dir / "damaged_checkpoints")
      train_iter.set_state(iter_state)
    else:
      state = init_state(make_model, tx, shardings, cfg.seed)
    if jax.process_index() == 0:
      (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    batch_sharding = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", None)))
    to_global = lambda b: {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in b.items()}

    def save(s: TrainState):
      step = int(s.step)
      ckpt.save(step, arrays={"params": s.params, "train": {"step": s.step, "opt_state": s.opt_state, "rng": s.rng}},
                documents={"data": train_iter.get_state(), "meta": _meta(cfg, step, abstract)})

    tokens_per_step = cfg.batch_size * cfg.seq_len
    evaluator = hooks_lib.Evaluator(cfg.eval_every, jax.jit(make_eval_step(graphdef)), val, to_global)
    all_hooks = [hooks_lib.NaNGuard(ckpt.latest_step, ckpt_dir),  # first: nothing sees a diverged state
                 hooks_lib.MetricsLogger(out_dir, cfg.log_every, tensorboard=cfg.tensorboard, schedule=schedule,
                                         tokens_per_step=tokens_per_step,
                                         flops_per_step=cfg.model.flops_per_token(cfg.seq_len) * tokens_per_step,
                                         peak_flops=peak_flops_per_device(cfg) * len(jax.devices())),
                 evaluator, hooks_lib.CheckpointSaver(cfg.checkpoint_every, save)]
    if cfg.progress and jax.process_index() == 0:
      all_hooks.append(hooks_lib.ProgressBar(cfg.steps, int(state.step)))
    step_fn = jax.jit(make_train_step(graphdef, tx, spec, mesh, shardings), donate_argnums=0)
    state, losses = _loop(step_fn, state, train_iter, to_global, all_hooks + list(hooks), cfg.steps,
                          # XLA:CPU runs each fake device on a thread of one small pool: with a second
                          # step queued, a device's share can starve while the others wait in a
                          # collective (a deadlock on 2 cores). Accelerators keep async dispatch.
                          sync_every_step=jax.default_backend() == "cpu" and mesh.size > 1)
    model = nnx.merge(graphdef, state.params)
  return TrainResult(model=model, step=cfg.steps, losses=losses, val_losses=evaluator.val_losses, output_dir=out_dir)


def _loop(step_fn, state: TrainState, batches, to_global, hooks: list[hooks_lib.Hook], last_step: int,
          sync_every_step: bool) -> tuple[TrainState, list[float]]:
  """Steps until `last_step`; device metrics are fetched only when some hook is due."""
  start = int(state.step)
  losses: list[float] = []
  pending: list[tuple[int, dict]] = []
  clock = hooks_lib.StepClock()

  def log(step: int, record: dict):
    for h in hooks:
      h.on_log(step, record)

  try:
    clock.start()
    for step in range(start + 1, last_step + 1):
      state, metrics = step_fn(state, to_global(next(batches)))
      if sync_every_step:
        jax.block_until_ready(metrics)
      pending.append((step, metrics))
      due = [h for h in hooks if h.due(step, last_step)]
      if due or step == start + 1:  # the first step compiles: keep it out of tokens/s
        records, pending = hooks_lib.host_records(pending), []
        clock.stop(len(records), compiling=step == start + 1)
        losses += [r["loss"] for r in records]
        for h in hooks:
          h.on_metrics(records)
        ctx = hooks_lib.StepContext(step, state, log, clock, last_step)
        for h in due:
          h.on_step(ctx)
        clock.start()
  finally:
    for h in hooks:
      h.close()
  return state, losses


def _check_writable(out_dir: pathlib.Path, ckpt_dir: pathlib.Path) -> None:
  """Creates `out_dir` and writes a probe file there and in `ckpt_dir` (when it exists)."""
  try:
    if out_dir.exists() and not out_dir.is_dir():
      raise NotADirectoryError(0, "it is a file, not a directory", str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
      raise NotADirectoryError(0, "it is a file, not a directory", str(ckpt_dir))
    for d in (out_dir, ckpt_dir) if ckpt_dir.exists() else (out_dir,):
      with tempfile.NamedTemporaryFile(dir=d, prefix=".jaxeff-write-probe-"):
        pass
  except OSError as e:
    raise TrainError(f"output_dir {out_dir} cannot be written ({e.filename or out_dir}: "
                     f"{e.strerror or describe_error(e)}); choose another output_dir") from None


def _restore(ckpt: Checkpointer, cfg: TrainConfig, abstract: TrainState, shardings: TrainState,
             damaged_dir: pathlib.Path):
  """The newest checkpoint that reads back completely and fits this run; newer, unreadable ones
  are moved to `damaged_dir` (so their steps can be saved again) and named on one line."""
  target = sharding.with_shardings(abstract, shardings)

  def read(step):
    check_compatible(ckpt.document(step, "meta"), cfg, abstract, f"checkpoint step {step} in {ckpt.directory}")
    return ckpt.restore(step, {"params": target.params,
                               "train": {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}},
                        documents=("data",))

  try:
    step, restored, skipped = ckpt.restore_newest(read)
  except CheckpointError as e:
    raise TrainError(f"--resume: {e} (nothing was moved or deleted)") from None
  if skipped:
    moved = [ckpt.set_aside(s, damaged_dir) for s, _ in skipped]
    if jax.process_index() == 0:
      why = "; ".join(f"step {s} {reason}" for s, reason in skipped)
      print(f"resume: checkpoint {why}; moved to {moved[0].parent}; resuming from step {step}", file=sys.stderr)
  train = restored["train"]
  state = TrainState(step=train["step"], params=restored["params"], opt_state=train["opt_state"], rng=train["rng"])
  return state, restored["data"]


def load_checkpoint(output_dir: str | pathlib.Path, step: int | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[Llama, TrainConfig]:
  """The model a training run saved, e.g. for evaluation, quantization or serving.

  Args:
    output_dir: the run's `output_dir` (holding `checkpoints/`).
    step: which step (default: the newest that reads back completely; skipped newer ones are
      named on one stderr line).
    mesh: place the parameters by their logical axes on this mesh; None: on the first device.
      Each device reads only its shards; the optimizer state is not read.

  Returns:
    (model, the run's TrainConfig).

  Raises:
    TrainError: no checkpoints, or one of another format.
    CheckpointError: the step (with `step=None`: every step) is damaged or cannot be read.
  """
  ckpt_dir = pathlib.Path(output_dir) / "checkpoints"

  def read(s: int):
    meta = ckpt.document(s, "meta")
    if meta.get("format") != CHECKPOINT_FORMAT:
      raise TrainError(f"checkpoint step {s} in {ckpt_dir} has format {meta.get('format')!r}; "
                       f"this jaxeff reads {CHECKPOINT_FORMAT!r}")
    cfg = config_from_dict(meta["config"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0))))
    target = sharding.with_shardings(abstract, sharding.model_shardings(abstract, mesh))
    return nnx.merge(graphdef, ckpt.restore(s, {"params": target})["params"]), cfg

  with Checkpointer(ckpt_dir, read_only=True) as ckpt:
    if not ckpt.steps():
      raise TrainError(f"no checkpoints in {ckpt_dir}")
    if step is not None:
      return read(step)
    newest, (model, cfg), skipped = ckpt.restore_newest(read)
  if skipped:
    why = "; ".join(f"step {s} {reason}" for s, reason in skipped)
    print(f"load_checkpoint: checkpoint {why}; loaded step {newest}", file=sys.stderr)
  return model, cfg
