"""The optimizer chain and the train/eval steps: pure functions of any model and loss.

The step never tests optimizer names: `jaxeff.optim.spec(name)` says whether the optimizer takes
the all-reduced mean gradient or each device's own (`gradients`), whether global-norm clipping
belongs in front of it (`clip`), and which extra arguments it takes (`takes_logical_axes`,
`takes_mesh`). Nor does it know the model: it merges the graph with the state's parameters and
calls `loss_fn(model, batch)` (default `next_token_loss`, which honours a `loss_mask`). A model
with frozen variables (`Trainer(trainable=...)`) gets them as the steps' optional last argument:
merged into the model, never differentiated or updated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxeff import optim
from jaxeff.errors import ConfigError
from jaxeff.training.config import OptimizerConfig
from jaxeff.training.state import TrainState


def optimizer_spec(opt: OptimizerConfig) -> optim.OptimizerSpec:
  """`jaxeff.optim.spec(opt.name)`, with an unknown name as a `ConfigError`."""
  try:
    return optim.spec(opt.name)
  except ValueError as e:
    raise ConfigError(f"optimizer: {e}") from None


def lr_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
  decay_steps = max(opt.decay_steps or steps, 2)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.learning_rate,
    warmup_steps=min(opt.warmup_steps, decay_steps - 1),
    decay_steps=decay_steps,
    end_value=opt.learning_rate * opt.min_lr_ratio,
  )


def make_optimizer(
  opt: OptimizerConfig,
  steps: int,
  params: nnx.State,
  mesh: Mesh | None = None,
  *,
  learning_rate: optax.ScalarOrSchedule | None = None,
) -> tuple[optax.GradientTransformation, optax.ScalarOrSchedule]:
  """[clip_by_global_norm ->] optimizer `opt.name` with `lr_schedule`; weight decay on matrices only.

  Args:
    opt: the optimizer section of the config.
    steps: run length (the cosine's length unless `opt.decay_steps` is set).
    params: the parameter `nnx.State` (abstract is fine): its logical axes go to optimizers that
      route by them.
    mesh: passed to optimizers that take one (per-device optimizers vote over its "data" axis).
    learning_rate: instead of `lr_schedule(opt, steps)`, e.g. a value `optax.inject_hyperparams`
      passes in (the optimizer benchmark sets it per step without recompiling).

  Returns:
    (transformation, learning rate or schedule).
  """
  spec = optimizer_spec(opt)
  schedule = lr_schedule(opt, steps) if learning_rate is None else learning_rate
  matrices = jax.tree.map(lambda p: p.ndim >= 2, params)
  hyper: dict[str, Any] = dict(weight_decay=opt.weight_decay, mask=matrices)
  if spec.takes_logical_axes:
    hyper["logical_axes"] = optim.logical_axes_from_state(params)
  if spec.takes_mesh:
    if mesh is None:
      raise ConfigError(f"optimizer {opt.name!r} needs the device mesh")
    hyper["mesh"] = mesh
  hyper.update(opt.hyperparams)
  try:
    tx = optim.build(opt.name, learning_rate=schedule, **hyper)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer: {e}") from None
  if spec.clip and opt.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
  return tx, schedule


LossFn = Callable[[nnx.Module, dict], jax.Array]


def next_token_loss(model, batch: dict) -> jax.Array:
  """Mean next-token cross-entropy of `model` on `batch`.

  `batch["inputs"]`, `batch["targets"]`: int32 [B, S]. An optional `batch["loss_mask"]` [B, S]
  (bool or 0/1) says which targets count (e.g. only assistant tokens of a chat): the mean is over
  those (0 when none). Packed rows carry `batch["segment_ids"]` and `batch["positions"]` [B, S]
  (each example's own positions), passed to the model so examples do not attend to each other.
  """
  if "segment_ids" in batch:
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  else:
    logits = model(batch["inputs"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  mask = batch.get("loss_mask")
  if mask is None:
    return losses.mean()
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  spec: optim.OptimizerSpec,
  mesh: Mesh | None = None,
  state_shardings: TrainState | None = None,
  *,
  loss_fn: LossFn = next_token_loss,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`step(state, batch) -> (state, {"loss", "grad_norm"})`, a pure function for `jax.jit`.

  Args:
    graphdef: the model's graph (`nnx.split`), merged with `state.params` inside the step.
    tx: the optax transformation (`make_optimizer`).
    spec: the optimizer's spec: with `gradients="per_device"` it gets each device's own gradient
      ([N, ...] over the mesh's "data" axis, no all-reduce; `jaxeff.optim.local_grads`).
    mesh: the device mesh (needed for per-device gradients).
    state_shardings: pins the new state to this layout, so XLA's propagation cannot drift it
      between steps (and checkpoints restore to the same layout).
    loss_fn: `loss_fn(model, batch) -> scalar`, differentiated with respect to the parameters.

  The step is `step(state, batch, frozen=None)`: `frozen`, the model's non-trainable variables.
  """
  if spec.gradients == "per_device" and mesh is None:
    raise ValueError("per-device gradients need the mesh")

  def step(state: TrainState, batch: dict, frozen: nnx.State | None = None):
    def value_and_grad(params, batch):
      return jax.value_and_grad(lambda p: loss_fn(_merge(graphdef, p, frozen), batch))(params)

    if spec.gradients == "per_device":
      losses, grads = optim.local_grads(value_and_grad, state.params, batch, mesh=mesh)
      loss = jnp.mean(losses)
      # sqrt(mean_i |g_i|^2): the per-device norms' RMS, comparable with a mean gradient's norm.
      grad_norm = optax.tree.norm(grads) / jnp.sqrt(mesh.shape["data"])
    else:
      loss, grads = value_and_grad(state.params, batch)
      grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    if state_shardings is not None:
      new = jax.lax.with_sharding_constraint(new, state_shardings)
    return new, {"loss": loss, "grad_norm": grad_norm}

  return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn = next_token_loss) -> Callable[..., jax.Array]:
  """`eval_step(params, batch, frozen=None) -> mean loss`."""
  return lambda params, batch, frozen=None: loss_fn(_merge(graphdef, params, frozen), batch)


def _merge(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None) -> nnx.Module:
  return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
