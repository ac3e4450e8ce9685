"""The run: `Trainer` (one run's pieces and a generator of steps) and `train(cfg)`, which drives it
with hooks and checkpoints; `load_checkpoint` for what it saved.

>>> import tempfile, numpy as np
>>> from jaxeff import training
>>> cfg = training.load_config(None, [
...     "steps=3", "seq_len=32", "batch_size=8", "model.num_layers=1", "model.hidden_size=32",
...     "model.intermediate_size=64", "data.max_corpus_bytes=100000", "progress=false",
...     "tensorboard=false", f"output_dir={tempfile.mkdtemp()}"])
>>> result = training.train(cfg)                                 # result.model, .losses, .val_losses
>>> len(result.losses)
3
>>> model, saved_cfg = training.load_checkpoint(cfg.output_dir)  # the newest step's model, born sharded
>>> trainer = training.Trainer(cfg)               # model_factory=..., loss_fn=... for other models
>>> batches = [{"inputs": np.ones((8, 32), np.int32), "targets": np.ones((8, 32), np.int32)}] * 2
>>> [info.step for info in trainer.steps(trainer.init_state(), batches)]   # the caller owns the loop
[1, 2]

The engine is model-agnostic: `model_factory(model_config, rngs)` builds any NNX module whose
parameters carry logical axes (default `Llama`), `loss_fn(model, batch)` is differentiated
(default `next_token_loss`, with an optional `loss_mask` in the batch). `trainable` (an NNX
filter, default `nnx.Param`) says which variables train; the model's other variables (a frozen
base under trained heads or adapters) enter the loss as constants, with no gradient and no
optimizer state.

One step directory per checkpoint (`jaxeff.checkpoint.Checkpointer`): item `params`, item `train`
(step, optimizer state, RNG), the data iterator's position (`data`) and `meta` (format, config, and
the optimizer state's signature, from which a resumed run checks that architecture and optimizer
still fit).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from jaxeff import data as data_lib
from jaxeff import loader, sharding
from jaxeff.checkpoint import Checkpointer, describe_error
from jaxeff.config import COMPUTE_FIELDS, ModelConfig, differences
from jaxeff.errors import CheckpointError, ConfigError, TrainError
from jaxeff.models import Llama
from jaxeff.models import attention as attention_lib
from jaxeff.training import hooks as hooks_lib
from jaxeff.training.config import TrainConfig, config_from_dict, config_to_dict
from jaxeff.training.state import TrainState, abstract_state, init_state, signature, state_shardings
from jaxeff.training.step import (
  LossFn,
  make_eval_step,
  make_optimizer,
  make_train_step,
  next_token_loss,
  optimizer_spec,
)

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = loader.RUN_FORMAT
ModelFactory = Callable[[ModelConfig, nnx.Rngs], nnx.Module]


def llama(cfg: ModelConfig, rngs: nnx.Rngs) -> Llama:
  """The default model factory."""
  return Llama(cfg, rngs=rngs)


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

  model: nnx.Module
  step: int
  losses: list[float]
  val_losses: dict[int, float]
  output_dir: pathlib.Path


@dataclasses.dataclass
class StepInfo:
  """What `Trainer.steps` yields after each step."""

  step: int  # steps taken so far (1 after the first)
  state: TrainState  # the state after it (donated to the next step: read it before asking for more)
  metrics: dict  # {"loss", "grad_norm"}: device scalars (fetching them waits for the step)


# ---------------------------------------------------------------------------- MFU

_PEAK_FLOPS = {  # dense bf16 per chip, from vendor specs
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "L4": 121e12,
}


def peak_flops_per_device(cfg: TrainConfig) -> float:
  """Peak FLOP/s of one device for MFU: the config's value, a vendor table, or (CPU) measured."""
  if cfg.peak_flops_per_device:
    return cfg.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return measured_peak_flops()


@functools.cache
def measured_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one device, measured once per process on an f32 `n`^3 matmul: the best of
  `repeats` timings, so it is an upper bound of what a step reaches (a single timing taken while
  other threads work, e.g. the data pipeline starting, came out low and showed MFU > 100%).
  Fake CPU devices share the host's cores: the host's rate is divided among them."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  peak = 2 * n**3 / best
  if jax.default_backend() == "cpu":
    peak /= len(jax.devices())
  return peak


# ---------------------------------------------------------------------------- checkpoint metadata


def _meta(cfg: TrainConfig, step: int, abstract: TrainState) -> dict:
  return {
    "format": CHECKPOINT_FORMAT,
    "step": step,
    "config": config_to_dict(cfg),
    "opt_state": signature(abstract.opt_state),
  }


def check_compatible(meta: dict, cfg: TrainConfig, abstract: TrainState, where: str) -> None:
  """Raises TrainError unless a checkpoint's recorded metadata fits this run's model and optimizer."""
  if meta.get("format") != CHECKPOINT_FORMAT:
    raise TrainError(f"{where} has format {meta.get('format')!r}; this jaxeff reads {CHECKPOINT_FORMAT!r}")
  diff = differences(config_from_dict({"model": meta["config"]["model"]}).model, cfg.model)
  if diff:
    raise TrainError(f"{where} is from a different architecture ({'; '.join(diff)})")
  if meta["opt_state"] != signature(abstract.opt_state):
    old, new = meta["config"]["optimizer"], config_to_dict(cfg)["optimizer"]
    changed = [
      f"{k}: checkpoint {old.get(k)!r} vs config {v!r}"
      for k, v in new.items()
      if k not in ("learning_rate", "warmup_steps", "decay_steps", "min_lr_ratio") and old.get(k) != v
    ]
    raise TrainError(
      f"{where} holds optimizer state of a different optimizer configuration "
      f"({'; '.join(changed) or 'its state has another structure'})"
    )


# ---------------------------------------------------------------------------- the trainer


class Trainer:
  """One run's pieces, built once from its config: the mesh, the model's graph, the optimizer,
  the state's shardings and the jitted train and eval steps. Nothing is compiled or allocated
  until a state is made and stepped.

  Args:
    cfg: the run (`load_config`); `cfg.model` goes to `model_factory`.
    model_factory: `model_factory(model_config, rngs)` -> an NNX module with logically named
      parameters (default `Llama`).
    loss_fn: `loss_fn(model, batch) -> scalar` (default `next_token_loss`).
    trainable: an NNX filter of the variables that train (default `nnx.Param`). A model with
      other variables is built once here, eagerly, to take their values (`frozen`), which are
      placed by their logical axes and passed to every step unchanged.

  Raises:
    ConfigError, MeshError: bad settings, before anything compiles.
  """

  def __init__(
    self,
    cfg: TrainConfig,
    *,
    model_factory: ModelFactory = llama,
    loss_fn: LossFn = next_token_loss,
    trainable: nnx.filterlib.Filter = nnx.Param,
  ):
    self.cfg = cfg
    self.mesh = sharding.make_mesh(cfg.mesh)
    data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if cfg.batch_size % data_parallel:
      raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the data x fsdp mesh size {data_parallel}")
    if cfg.batch_size % jax.process_count():
      raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {jax.process_count()} processes")
    if cfg.data.format == "chat" and cfg.data.pack and model_factory is llama:
      able = attention_lib.implementing("segments")
      if cfg.model.attention not in able:
        raise ConfigError(
          f"data.pack=true keeps packed conversations apart with an attention that masks by segment "
          f"({', '.join(able)}), not model.attention={cfg.model.attention}; choose one or set data.pack=false"
        )
    self.spec = optimizer_spec(cfg.optimizer)
    self.make_model = lambda: model_factory(cfg.model, nnx.Rngs(cfg.seed))
    self.trainable = trainable
    self.graphdef, params, frozen = nnx.split(nnx.eval_shape(self.make_model), trainable, ...)
    self.frozen = None  # the values of the model's non-trainable variables, if it has any
    if jax.tree.leaves(frozen):
      values = nnx.split(self.make_model(), trainable, ...)[2]
      self.frozen = jax.device_put(values, sharding.state_shardings(frozen, self.mesh))
    self.tx, self.schedule = make_optimizer(cfg.optimizer, cfg.steps, params, self.mesh)
    self.abstract = abstract_state(params, self.tx)
    self.shardings = state_shardings(self.abstract, self.mesh, per_device=self.spec.gradients == "per_device")
    self.train_step = jax.jit(
      make_train_step(self.graphdef, self.tx, self.spec, self.mesh, self.shardings, loss_fn=loss_fn), donate_argnums=0
    )
    self.eval_step = jax.jit(make_eval_step(self.graphdef, loss_fn))
    self._batch_sharding = jax.NamedSharding(self.mesh, sharding.logical_to_spec((sharding.BATCH, None)))

  def init_state(self) -> TrainState:
    """A fresh state (seed `cfg.seed`), each array created in its sharding; with `cfg.init_from`,
    the pretrained parameters (read once by `jaxeff.load`, placed by their logical axes)."""
    params = None
    if self.cfg.init_from is not None:
      params = self._pretrained_params()
    return init_state(self.make_model, self.tx, self.shardings, self.cfg.seed, params, self.trainable)

  def _pretrained_params(self) -> nnx.State:
    cfg = self.cfg
    compute = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig) if f.name in COMPUTE_FIELDS}
    model, _ = loader.load(cfg.init_from, mesh=self.mesh, **compute)
    if model.cfg != cfg.model:
      raise ConfigError(f"init_from {cfg.init_from}: the checkpoint's config changed since the run was configured")
    return nnx.state(model, self.trainable)

  def global_batch(self, local: dict) -> dict:
    """This process's rows of a batch (host arrays) -> global arrays split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self._batch_sharding, np.asarray(v)) for k, v in local.items()}

  def model(self, state: TrainState) -> nnx.Module:
    """The model with `state`'s parameters (and the frozen variables)."""
    return nnx.merge(self.graphdef, state.params, *self._frozen())

  def evaluate(self, params: nnx.State, batch: dict) -> jax.Array:
    """The loss of the model with `params` on a global batch (`eval_step`, frozen variables included)."""
    return self.eval_step(params, batch, *self._frozen())

  def _frozen(self) -> tuple:
    return () if self.frozen is None else (self.frozen,)

  def steps(self, state: TrainState, batches: Iterable[dict], last_step: int | None = None) -> Iterator[StepInfo]:
    """Steps from `state` until `last_step` (default `cfg.steps`) or until `batches` (process-local
    host batches) run out, yielding after each step."""
    # XLA:CPU runs each fake device on a thread of one small pool: with a second step queued, a
    # device's share can starve while the others wait in a collective (a deadlock on 2 cores).
    # Accelerators keep async dispatch.
    sync = jax.default_backend() == "cpu" and self.mesh.size > 1
    last_step = self.cfg.steps if last_step is None else last_step
    batches = iter(batches)
    for step in range(int(state.step) + 1, last_step + 1):
      try:
        batch = next(batches)
      except StopIteration:
        return
      with jax.set_mesh(self.mesh):
        state, metrics = self.train_step(state, self.global_batch(batch), *self._frozen())
      if sync:
        jax.block_until_ready(metrics)
      yield StepInfo(step, state, metrics)


# ---------------------------------------------------------------------------- train()


def train(
  cfg: TrainConfig,
  *,
  resume: bool = False,
  hooks: Sequence[hooks_lib.Hook] = (),
  model_factory: ModelFactory = llama,
  loss_fn: LossFn = next_token_loss,
) -> TrainResult:
  """Trains as `cfg` says: sharded over `cfg.mesh`, checkpointed, logged.

  Args:
    cfg: the run (`load_config`).
    resume: continue from the newest checkpoint in `cfg.output_dir` that reads back completely
      (bit for bit on CPU); newer, damaged ones are moved to `output_dir/damaged_checkpoints` and
      named in one log line. With no checkpoint yet (a preempted job restarted before its first
      save) the run starts fresh, saying so. Without `resume`, existing checkpoints are an error,
      never overwritten.
    hooks: extra `Hook`s, called after the built-in ones (NaN guard, metrics, eval, checkpoint).
    model_factory, loss_fn: as `Trainer`'s.

  Returns:
    `TrainResult` with the model and this run's losses.

  Raises:
    ConfigError, DataError, MeshError: bad settings, found before any compilation.
    TrainError: an output_dir that cannot be written (before anything else), checkpoints in the
      way, none that reads back, a checkpoint of another architecture or optimizer, a
      non-finite loss (the last good checkpoint stays intact).
    CheckpointError: a save that did not commit (the older checkpoints stay).
  """
  out_dir = pathlib.Path(cfg.output_dir)
  ckpt_dir = out_dir / "checkpoints"
  trainer = Trainer(cfg, model_factory=model_factory, loss_fn=loss_fn)
  check_writable(out_dir, ckpt_dir)  # before the data is tokenized and anything compiles
  # Data first (the tokenizer is built once, here): a bad path fails before any compilation.
  data = data_lib.load_data(cfg.data, cfg.seq_len)
  if cfg.model.vocab_size < data.vocab_size:
    raise ConfigError(
      f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({data.vocab_size})"
    )
  where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = data_lib.train_iterator(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, **where)
  val = data_lib.val_batches(
    data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_batches=cfg.eval_batches, **where
  )
  with Checkpointer(ckpt_dir, read_only=True) as reader:  # a killed first save left no step
    has_checkpoints = bool(reader.steps())
  if has_checkpoints and not resume:
    raise TrainError(
      f"{ckpt_dir} already holds checkpoints; pass --resume to continue, "
      f"or choose another output_dir (nothing is overwritten)"
    )
  if resume and not has_checkpoints:
    if jax.process_index() == 0:
      log.info("resume: no checkpoint in %s yet; starting a new run", ckpt_dir)
    resume = False

  with Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints, async_save=True, remove_partial_saves=True) as ckpt:
    if resume:
      with jax.set_mesh(trainer.mesh):
        state, iter_state = _restore(ckpt, cfg, trainer.abstract, trainer.shardings, out_dir / "damaged_checkpoints")
      train_iter.set_state(iter_state)
    else:
      state = trainer.init_state()
    if jax.process_index() == 0:
      (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def save(s: TrainState):
      step = int(s.step)
      ckpt.save(
        step,
        arrays={"params": s.params, "train": {"step": s.step, "opt_state": s.opt_state, "rng": s.rng}},
        documents={"data": train_iter.get_state(), "meta": _meta(cfg, step, trainer.abstract)},
      )

    tokens_per_step = cfg.batch_size * cfg.seq_len
    evaluator = hooks_lib.Evaluator(cfg.eval_every, trainer.evaluate, val, trainer.global_batch)
    all_hooks = [
      hooks_lib.NaNGuard(ckpt.latest_step, ckpt_dir),  # first: nothing sees a diverged state
      hooks_lib.MetricsLogger(
        out_dir,
        cfg.log_every,
        tensorboard=cfg.tensorboard,
        schedule=trainer.schedule,
        tokens_per_step=tokens_per_step,
        flops_per_step=cfg.model.flops_per_token(cfg.seq_len) * tokens_per_step,
        peak_flops=peak_flops_per_device(cfg) * len(jax.devices()),
      ),
      evaluator,
      hooks_lib.CheckpointSaver(cfg.checkpoint_every, save),
    ]
    if cfg.progress and jax.process_index() == 0:
      all_hooks.append(hooks_lib.ProgressBar(cfg.steps, int(state.step)))
    state, losses = _drive(trainer, state, train_iter, all_hooks + list(hooks))
  return TrainResult(
    model=trainer.model(state), step=cfg.steps, losses=losses, val_losses=evaluator.val_losses, output_dir=out_dir
  )


def _drive(trainer: Trainer, state: TrainState, batches, hooks: list[hooks_lib.Hook]) -> tuple[TrainState, list[float]]:
  """Runs `trainer.steps` with the hooks; device metrics are fetched only when some hook is due."""
  start, last_step = int(state.step), trainer.cfg.steps
  losses: list[float] = []
  pending: list[tuple[int, dict]] = []
  clock = hooks_lib.StepClock()

  def log_record(step: int, record: dict):
    for h in hooks:
      h.on_log(step, record)

  try:
    clock.start()
    for info in trainer.steps(state, batches, last_step):
      state = info.state
      pending.append((info.step, info.metrics))
      due = [h for h in hooks if h.due(info.step, last_step)]
      if due or info.step == start + 1:  # the first step compiles: keep it out of tokens/s
        records, pending = hooks_lib.host_records(pending), []
        clock.stop(len(records), compiling=info.step == start + 1)
        losses += [r["loss"] for r in records]
        for h in hooks:
          h.on_metrics(records)
        ctx = hooks_lib.StepContext(info.step, state, log_record, clock, last_step)
        with jax.set_mesh(trainer.mesh):
          for h in due:
            h.on_step(ctx)
        clock.start()
  finally:
    for h in hooks:
      h.close()
  return state, losses


def check_writable(out_dir: pathlib.Path, ckpt_dir: pathlib.Path) -> None:
  """Creates `out_dir` and writes a probe file there and in `ckpt_dir` (when it exists); a
  `TrainError` naming the directory otherwise (before anything is computed)."""
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
    raise TrainError(
      f"output_dir {out_dir} cannot be written ({e.filename or out_dir}: "
      f"{e.strerror or describe_error(e)}); choose another output_dir"
    ) from None


def _restore(
  ckpt: Checkpointer, cfg: TrainConfig, abstract: TrainState, shardings: TrainState, damaged_dir: pathlib.Path
):
  """The newest checkpoint that reads back completely and fits this run; newer, unreadable ones
  are moved to `damaged_dir` (so their steps can be saved again) and named on one line."""
  target = sharding.with_shardings(abstract, shardings)

  def read(step):
    check_compatible(ckpt.document(step, "meta"), cfg, abstract, f"checkpoint step {step} in {ckpt.directory}")
    return ckpt.restore(
      step,
      {"params": target.params, "train": {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}},
      documents=("data",),
    )

  try:
    step, restored, skipped = ckpt.restore_newest(read)
  except CheckpointError as e:
    raise TrainError(f"--resume: {e} (nothing was moved or deleted)") from None
  if skipped:
    moved = [ckpt.set_aside(s, damaged_dir) for s, _ in skipped]
    if jax.process_index() == 0:
      why = "; ".join(f"step {s} {reason}" for s, reason in skipped)
      log.warning("resume: checkpoint %s; moved to %s; resuming from step %s", why, moved[0].parent, step)
  train = restored["train"]
  state = TrainState(step=train["step"], params=restored["params"], opt_state=train["opt_state"], rng=train["rng"])
  return state, restored["data"]


def load_checkpoint(
  output_dir: str | pathlib.Path,
  step: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  *,
  model_factory: ModelFactory = llama,
) -> tuple[nnx.Module, TrainConfig]:
  """The model a training run saved, e.g. for evaluation, quantization or serving
  (`jaxeff.loader.read_run`; `jaxeff.load(output_dir)` returns it with the run's tokenizer).

  Args:
    output_dir: the run's `output_dir` (holding `checkpoints/`).
    step: which step (default: the newest that reads back completely; skipped newer ones are
      named in one log line).
    mesh: place the parameters by their logical axes on this mesh; None: on the first device.
      Each device reads only its shards; the optimizer state is not read.
    model_factory: the factory the run trained with (default `Llama`).

  Returns:
    (model, the run's TrainConfig).

  Raises:
    TrainError: no checkpoints, or one of another format.
    CheckpointError: the step (with `step=None`: every step) is damaged or cannot be read.
  """
  model, config = loader.read_run(output_dir, step, mesh, model_factory=model_factory)
  return model, config_from_dict(config)
