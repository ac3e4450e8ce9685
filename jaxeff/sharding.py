"""Logical axes -> mesh axes: the one table that decides how everything is sharded.

Every dimension of a parameter, activation or cache has a logical name: one of the constants
below (`EMBED`, `HEADS`, ...). Parameters carry theirs (`nnx.Param(..., out_sharding=(EMBED, MLP))`);
activations are constrained with `constrain(x, (BATCH, SEQ, EMBED))`. `LOGICAL_RULES` maps each
name to mesh axes of the mesh `("data", "fsdp", "tensor")`, as in MaxText. Sharding is `jax.jit`
with `NamedSharding` (what pjit became); the mesh uses Auto axes so XLA's partitioner propagates
shardings from these annotations.

Another layout is another table: `with axis_rules({**LOGICAL_RULES, MLP: None}):` makes every
function here (`constrain`, `mesh_axes`, `state_shardings`, ...) and so the models, the kernels'
shard_map axes and quantization use it. Enter it before tracing: a jitted function keeps the
rules it was traced with. An unknown logical name raises `ShardingError` instead of silently
replicating.

>>> from jax.sharding import PartitionSpec as P
>>> from jaxeff import sharding
>>> sharding.logical_to_spec((sharding.BATCH, sharding.SEQ, sharding.MLP)) == P(("data", "fsdp"), None, "tensor")
True
>>> with sharding.axis_rules({**sharding.LOGICAL_RULES, sharding.MLP: None}):
...   sharding.logical_to_spec((sharding.EMBED, sharding.MLP)) == P("fsdp", None)
True
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff.errors import MeshError, ShardingError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names.
BATCH = "batch"  # sequences of a batch (activations, the KV cache's rows)
SEQ = "seq"  # positions within a sequence
EMBED = "embed"  # the model (hidden) dimension
VOCAB = "vocab"  # the vocabulary (embedding rows, logits)
HEADS = "heads"  # query heads (fused with head_dim in projection kernels)
KV_HEADS = "kv_heads"  # key/value heads
MLP = "mlp"  # the MLP's intermediate dimension
HEAD_DIM = "head_dim"  # within one head
LAYERS = "layers"  # the leading axis of scanned (stacked) layers
NORM = "norm"  # a norm's scale vector
DEVICES = "devices"  # optimizer state kept per data-parallel device ([N, ...], Distributed Lion)

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: dict[str, Any] = {
  BATCH: ("data", "fsdp"),
  SEQ: None,
  EMBED: "fsdp",
  VOCAB: "tensor",
  HEADS: "tensor",
  KV_HEADS: "tensor",
  MLP: "tensor",
  HEAD_DIM: None,
  LAYERS: None,
  NORM: None,
  DEVICES: "data",
}

_ACTIVE_RULES: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
  "jaxeff_axis_rules", default=None
)


def _check_rules(rules: Mapping[str, Any]) -> None:
  for name, target in rules.items():
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ShardingError(f"axis rule {name!r} -> {target!r} names mesh axes {unknown} that are not in {MESH_AXES}")


@contextlib.contextmanager
def axis_rules(rules: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
  """Within the block, `rules` replace `LOGICAL_RULES` wherever rules are not passed explicitly."""
  _check_rules(rules)
  token = _ACTIVE_RULES.set(dict(rules))
  try:
    yield rules
  finally:
    _ACTIVE_RULES.reset(token)


def current_rules() -> Mapping[str, Any]:
  """The rules in force: the innermost `axis_rules`, else `LOGICAL_RULES`."""
  return _ACTIVE_RULES.get() or LOGICAL_RULES


def mesh_axes(name: str, rules: Mapping[str, Any] | None = None):
  """The mesh axes logical axis `name` maps to (a str, a tuple, or None), e.g. for a kernel's
  shard_map axes."""
  rules = current_rules() if rules is None else rules
  if name not in rules:
    raise ShardingError(f"unknown logical axis {name!r}; known: {', '.join(rules)}")
  return rules[name]


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ("data", "fsdp", "tensor") mesh; one entry may be -1 (= the remaining devices).

  `shape` defaults to all devices on "data".
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = dict(shape or {"data": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"unknown mesh axes {sorted(unknown)}; valid axes: {', '.join(MESH_AXES)}")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise MeshError(f"mesh {shape}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh {shape}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise MeshError(f"mesh {shape} does not divide the {n} available devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {n} are available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None] | None, rules: Mapping[str, Any] | None = None) -> P:
  """(BATCH, SEQ, EMBED) -> PartitionSpec(("data", "fsdp"), None, "fsdp")-style specs.

  A mesh axis is used at most once per spec (later dims fall back to replicated); None names a
  dimension that is never split. An unknown name raises `ShardingError`.
  """
  if axes is None:
    return P()
  rules = current_rules() if rules is None else rules
  used: set[str] = set()
  out = []
  for name in axes:
    targets = mesh_axes(name, rules) if name is not None else None
    if targets is None:
      out.append(None)
      continue
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    targets = tuple(a for a in targets if a not in used)
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*out)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (e.g. 2 kv heads on tensor=4)."""
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    kept = []
    for a in names:
      if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def logical_sharding(
  axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] | None = None
) -> NamedSharding:
  """The NamedSharding of an array of `shape` whose dimensions have logical names `axes`."""
  return NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules), shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] | None = None):
  """`state` with each variable's value replaced by its NamedSharding (from its logical names).

  The result has exactly the pytree structure of `state`, so it serves as `out_shardings`,
  a `device_put` target, or the `rest` tree of `optax.tree_map_params`.
  """

  def one(var):
    return var.replace(logical_sharding(var.get_metadata().get("out_sharding"), var.get_value().shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(state: nnx.State, mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None):
  """`state_shardings` on `mesh`, or, with `mesh=None`, every variable on the first device."""
  if mesh is not None:
    return state_shardings(state, mesh, rules)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda v: v.replace(device), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` that carry the matching leaf of `shardings` (a restore or
  `jax.jit` target that says where every array goes)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def place(host_arrays, shardings):
  """Host (NumPy) arrays -> jax Arrays in `shardings`, each device receiving only its shard.

  Nothing is first gathered on one device (unlike `jax.device_put(jnp.asarray(x), s)`), so a
  model too large for one device loads straight into its sharded layout.
  """
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), host_arrays, shardings
  )


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, Any] | None = None) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`).

  Names are checked either way, so a typo fails on one device too.
  """
  spec = logical_to_spec(axes, rules)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  manual = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual}
  if manual:  # inside shard_map: those axes are already split by hand
    spec = P(*(_without(e, manual) for e in spec))
  spec = fit_spec(spec, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def _without(entry, names):
  if entry is None:
    return None
  kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a not in names)
  return None if not kept else (kept[0] if len(kept) == 1 else kept)


def create_sharded(make_model, mesh: Mesh | None, rules: Mapping[str, Any] | None = None):
  """Builds `make_model()` with every parameter created directly in its sharding.

  Initialization runs under `jax.jit` with `out_shardings` from the logical rules, so no
  device ever holds the full unsharded model (the MaxText pattern). `mesh=None` -> one device.
  """
  if mesh is None:
    return make_model()
  with axis_rules(rules) if rules is not None else contextlib.nullcontext():
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    shardings = state_shardings(abstract_state, mesh, rules)
    with jax.set_mesh(mesh):
      state = jax.jit(lambda: nnx.state(make_model()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)
