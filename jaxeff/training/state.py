"""`TrainState`: everything a training step reads and writes, as one pytree, and where it lives.

  graphdef, params = nnx.split(nnx.eval_shape(make_model))     # shapes only, nothing allocated
  abstract = abstract_state(params, tx)
  shardings = state_shardings(abstract, mesh, spec)               # from logical axes, one source
  state = init_state(make_model, tx, shardings, seed)             # born sharded (jit out_shardings)

Shardings come from the parameters' logical axes alone (`jaxeff.sharding`'s rules), as in
MaxText: `tx.init` runs under `jax.eval_shape` on the parameter `nnx.State`, and optax's
tree-maps carry each parameter's `nnx.Variable` (with its logical axes) into the state leaves made
from it, so a moment has its parameter's names. A state leaf whose shape is not its parameter's
(a projected GaLore moment, a counter) is replicated. An optimizer with per-device gradients
(`OptimizerSpec.gradients == "per_device"`) keeps per-device state: a leaf [N, *param.shape]
gets the logical axes (DEVICES, *param_axes), i.e. its leading axis split over the mesh's
"data" axis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import sharding


@flax.struct.dataclass
class TrainState:
  """One training run's state: a pytree that jit, shardings and checkpoints treat as a whole.

  Attributes:
    step: int32 scalar, the number of optimizer steps taken.
    params: the model's `nnx.State` (merge with its graphdef for a module).
    opt_state: the optax state.
    rng: uint32[2] key data (`jax.random.key_data`) for stochastic training (dropout, noise);
      `step_rng` derives a fresh key per step from it.
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array

  def step_rng(self) -> jax.Array:
    """This step's PRNG key: the run's key folded with the step number."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def abstract_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  """The TrainState's shapes for abstract `params` (`nnx.split(nnx.eval_shape(make_model))[1]`),
  without allocating anything (`jax.eval_shape` of `tx.init`)."""
  return TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params,
    opt_state=jax.eval_shape(tx.init, params),
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
  )


def _axis_sizes(params: nnx.State) -> dict[str, set[int]]:
  sizes = defaultdict(set)
  for var in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    for name, size in zip(var.get_metadata().get("out_sharding") or (), var.get_value().shape):
      sizes[name].add(size)
  return sizes


def state_shardings(abstract: TrainState, mesh: Mesh, per_device: bool = False) -> TrainState:
  """A `TrainState` of `NamedSharding`s for `abstract` (from `abstract_state`), from logical axes.

  Args:
    abstract: the state's shapes.
    mesh: the device mesh.
    per_device: the optimizer keeps one state slice per device ([N, ...] over "data").
  """
  replicated = NamedSharding(mesh, P())
  sizes = _axis_sizes(abstract.params)
  num_devices = mesh.shape["data"]

  def fits(axes, shape):
    return len(axes) == len(shape) and all(n is None or s in sizes[n] for n, s in zip(axes, shape))

  def opt_leaf(x):
    if not isinstance(x, nnx.Variable):
      return replicated
    value = x.get_value()
    if not hasattr(value, "shape"):  # e.g. optax.MaskedNode: no array here
      return x
    axes = tuple(x.get_metadata().get("out_sharding") or ())
    if fits(axes, value.shape):
      return x.replace(sharding.logical_sharding(axes, value.shape, mesh))
    if per_device and value.shape[:1] == (num_devices,) and fits(axes, value.shape[1:]):
      return x.replace(sharding.logical_sharding((sharding.DEVICES,) + axes, value.shape, mesh))
    return x.replace(replicated)

  opt = jax.tree.map(opt_leaf, abstract.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return TrainState(
    step=replicated, params=sharding.state_shardings(abstract.params, mesh), opt_state=opt, rng=replicated
  )


def init_state(
  make_model: Callable[[], nnx.Module],
  tx: optax.GradientTransformation,
  shardings: TrainState,
  seed: int,
  params: nnx.State | None = None,
  trainable: nnx.filterlib.Filter = nnx.Param,
) -> TrainState:
  """A fresh state, each array created directly in its sharding (no device holds it whole);
  `params` (e.g. pretrained ones) instead of `make_model`'s initialization. The state holds the
  model's `trainable` variables."""
  mesh = jax.tree.leaves(shardings)[0].mesh
  with jax.set_mesh(mesh):
    if params is None:
      # Two programs, not one: the parameters' is the same for every optimizer (compiled once).
      params = jax.jit(lambda: nnx.state(make_model(), trainable), out_shardings=shardings.params)()
    else:
      params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng),
  )


def signature(tree: Any) -> list[list]:
  """[path, shape, dtype] of every leaf: what a checkpoint records to check compatibility."""
  return [
    [jax.tree_util.keystr(path), list(x.shape), str(jnp.dtype(x.dtype))]
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]
