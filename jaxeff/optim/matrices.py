"""Shared helpers: which leaves are matrices, and the canonical matrix view of a leaf.

Parameter roles are decided from (in order of precedence) explicit `dimension_numbers`, a boolean
mask, logical axis names, or, when none is given, the shape (ndim == 2 -> matrix). Logical axes
are the names the jaxeff models attach to every parameter (`nnx.Param(..., out_sharding=names)`):
embedding (VOCAB, EMBED), LM head (EMBED, VOCAB), kernels [in, out] such as (EMBED, MLP),
scanned stacks with a leading LAYERS axis, norm scales (NORM,) (`jaxeff.sharding`'s names).

A matrix is described by `MatrixDims` (= optax's `MuonDimensionNumbers`): the reduction (fan-in)
axes and the output (fan-out) axes; every other axis is a batch axis (e.g. "layers"), handled
independently per slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers as MatrixDims

from jaxeff.sharding import EMBED, HEADS, KV_HEADS, LAYERS, MLP, VOCAB

BATCH_AXES = (LAYERS,)  # stacked (scanned) layers: one matrix per slice
VOCAB_AXES = (VOCAB,)  # embeddings and LM head: never orthogonalized or projected
PROJECTED_AXES = (HEADS, KV_HEADS, MLP)  # attention and MLP kernels (GaLore/OSD targets)


def is_axes_leaf(x) -> bool:
  """A logical-axes leaf: None or a tuple of names (str or None)."""
  return x is None or (isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x))


def _is_dims_leaf(x) -> bool:
  return x is None or isinstance(x, MatrixDims)


def _is_bool_leaf(x) -> bool:
  return x is None or isinstance(x, (bool, jnp.bool_)) or (hasattr(x, "dtype") and x.dtype == bool)


def logical_axes_from_state(state) -> Any:
  """Pytree of logical-axis tuples from an `nnx.State` of `nnx.Param`s (their `out_sharding`)."""
  from flax import nnx  # local import: the optimizers themselves do not need flax

  def one(v):
    axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
    return None if axes is None else tuple(axes)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_leaf(spec, tree, is_leaf: Callable[[Any], bool], what: str) -> list:
  """Entries of `spec` (a pytree matching `tree`, or a callable of `tree`) in `tree`'s leaf order.

  Matching is by leaf order, so `spec` may use a different container type than `tree`
  (e.g. an `nnx.State` of tuples for an `nnx.State` of Variables). `optax.MaskedNode`s in `tree`
  (what `optax.partition` / `optax.masked` hand an inner transformation) count as leaves.
  """
  if callable(spec):
    spec = spec(tree)
  entries = jax.tree.leaves(spec, is_leaf=is_leaf)
  n = len(jax.tree.leaves(tree, is_leaf=is_masked))
  if len(entries) != n:
    raise ValueError(
      f"{what} has {len(entries)} leaves but the parameter tree has {n}; "
      f"give one entry per parameter (None for 'no names')"
    )
  return entries


def default_dims(shape: Sequence[int]) -> MatrixDims | None:
  """Shape rule: 2-D -> matrix [in, out]; anything else is not a matrix."""
  return MatrixDims(0, 1) if len(shape) == 2 else None


def dims_from_axes(names, shape: Sequence[int], rule: str) -> MatrixDims | None:
  """Matrix dims from logical names. rule 'muon': every non-vocab matrix; 'project': attention/MLP."""
  if names is None:
    return default_dims(shape)
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match parameter shape {tuple(shape)}")
  if any(n in VOCAB_AXES for n in names):
    return None
  if rule == "project" and not any(n in PROJECTED_AXES for n in names):
    return None
  mat = [i for i, n in enumerate(names) if n not in BATCH_AXES]
  if len(mat) < 2:
    return None
  if len(mat) == 2:
    return MatrixDims(mat[0], mat[1])
  # [embed, heads, head_dim] -> (embed) x (heads*head_dim); [heads, head_dim, embed] the reverse.
  if names[mat[-1]] == EMBED and names[mat[0]] != EMBED:
    return MatrixDims(tuple(mat[:-1]), (mat[-1],))
  return MatrixDims((mat[0],), tuple(mat[1:]))


def matrix_dims(
  tree, *, logical_axes=None, dimension_numbers=None, matrix_mask=None, rule: str = "muon"
) -> list[MatrixDims | None]:
  """Per-leaf MatrixDims (None = not a matrix) in `tree`'s leaf order."""
  leaves = jax.tree.leaves(tree)
  given = [x is not None for x in (logical_axes, dimension_numbers, matrix_mask)]
  if sum(given) > 1:
    raise ValueError("give at most one of logical_axes, dimension_numbers and the matrix mask")
  if dimension_numbers is not None:
    if isinstance(dimension_numbers, MatrixDims):
      return [dimension_numbers if x.ndim >= 2 else None for x in leaves]
    return per_leaf(dimension_numbers, tree, _is_dims_leaf, "dimension_numbers")
  if matrix_mask is not None:
    flags = per_leaf(matrix_mask, tree, _is_bool_leaf, "matrix mask")
    out = []
    for f, x in zip(flags, leaves):
      if f and x.ndim < 2:
        raise ValueError(f"matrix mask selects a parameter of shape {x.shape}; matrices need ndim >= 2")
      # Last two axes are [in, out]; leading axes are batch (stacked layers).
      out.append(MatrixDims(x.ndim - 2, x.ndim - 1) if f else None)
    return out
  if logical_axes is not None:
    names = per_leaf(logical_axes, tree, is_axes_leaf, "logical_axes")
    return [dims_from_axes(n, x.shape, rule) for n, x in zip(names, leaves)]
  return [default_dims(x.shape) for x in leaves]


def _axes_tuple(a, ndim):
  a = (a,) if isinstance(a, int) else tuple(a)
  return tuple(i % ndim for i in a)


class MatrixView:
  """A leaf as a batch of matrices: `to_matrix` gives [batch, fan_in, fan_out] (Muon), and
  `to_canonical` gives [batch, big, small] with `small` the side GaLore/OSD project.

  Which side is projected comes from the references' rule on PyTorch's [out, in] layout: out >= in
  -> right projector (the input side), else left (the output side). In jaxeff's [in, out] layout
  that is: project fan-in when fan_in <= fan_out (so a square matrix is projected on its input
  side, as in the references), fan-out otherwise. Either way the smaller side is projected.
  """

  def __init__(self, shape: Sequence[int], dims: MatrixDims):
    ndim = len(shape)
    red, out = _axes_tuple(dims.reduction_axis, ndim), _axes_tuple(dims.output_axis, ndim)
    if set(red) & set(out) or len(red) == 0 or len(out) == 0:
      raise ValueError(f"bad matrix dims {dims} for shape {tuple(shape)}")
    batch = tuple(i for i in range(ndim) if i not in red + out)
    self.shape = tuple(shape)
    self.perm = batch + red + out
    self.inv_perm = tuple(sorted(range(ndim), key=lambda i: self.perm[i]))
    self.batch_axes = batch
    self.batch = math.prod(shape[i] for i in batch)
    self.m = math.prod(shape[i] for i in red)  # fan-in
    self.n = math.prod(shape[i] for i in out)  # fan-out
    # Torch [out, in] = [n, m]: n >= m -> right projector on the input side. Canonical [big, small]
    # puts the projected side last, so fan-in must be last: transpose when m <= n.
    self.transposed = self.m <= self.n
    self.big, self.small = max(self.m, self.n), min(self.m, self.n)
    self._permuted = tuple(shape[i] for i in self.perm)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    return x.transpose(self.perm).reshape(self.batch, self.m, self.n)

  def from_matrix(self, y: jax.Array) -> jax.Array:
    return y.reshape(self._permuted).transpose(self.inv_perm)

  def to_canonical(self, x: jax.Array) -> jax.Array:
    y = self.to_matrix(x)
    return jnp.swapaxes(y, -1, -2) if self.transposed else y

  def from_canonical(self, y: jax.Array) -> jax.Array:
    return self.from_matrix(jnp.swapaxes(y, -1, -2) if self.transposed else y)


def batch_axes(names, ndim: int) -> tuple[int, ...]:
  """Positions of the stacked-layer axes ("layers") in a leaf's logical names; () without names."""
  if names is None:
    return ()
  if len(names) != ndim:
    raise ValueError(f"logical axes {names} do not match a parameter of rank {ndim}")
  return tuple(i for i, n in enumerate(names) if n in BATCH_AXES)


def batch_axes_per_leaf(tree, logical_axes) -> list[tuple[int, ...]]:
  """Per-leaf stacked-layer axes from optional logical axes (pytree or callable), in the order of
  `jax.tree.leaves(tree)` (entries of `optax.MaskedNode` leaves are dropped)."""
  leaves = jax.tree.leaves(tree, is_leaf=is_masked)
  if logical_axes is None:
    return [() for x in leaves if not is_masked(x)]
  names = per_leaf(logical_axes, tree, is_axes_leaf, "logical_axes")
  return [batch_axes(n, x.ndim) for n, x in zip(names, leaves) if not is_masked(x)]


def static_int(x, name: str, factory: str) -> int:
  """A shape-determining int; under `optax.inject_hyperparams` it must be a static arg."""
  try:
    return int(x)
  except jax.errors.ConcretizationTypeError:
    raise ValueError(
      f"{name} sets state shapes and cannot be a traced hyperparameter: use "
      f"optax.inject_hyperparams({factory}, static_args=({name!r},))"
    ) from None


def masked_node():
  return optax.MaskedNode()


def is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)
