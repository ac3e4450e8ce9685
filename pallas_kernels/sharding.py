"""Running a Pallas kernel on a device mesh: `shard_kernel`.

Mosaic (TPU) kernels are never partitioned automatically: under a jit that spans several devices
their lowering raises "Mosaic kernels cannot be automatically partitioned", even for replicated
operands. Triton (GPU) calls do lower, but XLA then gathers whole operands onto every device. So
every op runs its kernel through `shard_map`, split the way its operands are already sharded.

An op names each operand's dimensions with letters, einsum style, and says which mesh axes each
letter may be split over (the caller derives that from its logical-axis rules; kernels never import
jaxeff):

    y = shard_kernel(local_matmul, x, w, in_dims=("mk", "kn"), out_dims="mn",
                     axes={"m": ("data", "fsdp"), "k": "fsdp", "n": "tensor"})

- A mesh axis is kept for a letter only if it divides that letter's dimension in every operand
  (a dimension of 3 kv heads on tensor=2 stays whole); letters that share a mesh axis (query heads
  and kv heads on "tensor") are kept or dropped together, so their shards stay aligned.
- A letter split in the inputs but absent from an output is a contraction: that output is summed
  over the letter's mesh axes (`psum`), e.g. a row-parallel matmul.
- Each mesh axis is used by at most one letter of an operand (or of an output: `out_dims`);
  letters are resolved in the order `axes` lists them.
- The mesh is `mesh=` or the one set with `jax.set_mesh` (what the jaxeff models run under).
  With no mesh, a one-device mesh, or inside a shard_map that is already manual over every mesh
  axis, `fn` is called directly. Inside a partly manual shard_map only the remaining axes are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

Axes = str | Sequence[str] | None


def _as_tuple(a: Axes) -> tuple[str, ...]:
  if a is None:
    return ()
  return (a,) if isinstance(a, str) else tuple(a)


def current_mesh(mesh=None):
  """`mesh`, else the context mesh from `jax.set_mesh`, else None."""
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def free_axes(mesh) -> tuple[str, ...]:
  """Mesh axes not already manual (i.e. not split by an enclosing shard_map)."""
  types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
  return tuple(a for a, t in zip(mesh.axis_names, types) if t != AxisType.Manual)


def resolve_axes(
  operands: Sequence[Any], in_dims: Sequence[str], axes: Mapping[str, Axes], mesh, out_dims: str | Sequence[str] = ()
) -> dict[str, tuple[str, ...]]:
  """letter -> the mesh axes it is actually split over (see the module docstring).

  `out_dims` (optional) names the outputs' letters: letters that meet only in an output (a
  matmul's m and n) must not share a mesh axis either.
  """
  usable = set(free_axes(mesh))
  sizes: dict[str, list[int]] = {}
  for x, dims in zip(operands, in_dims):
    if len(dims) != x.ndim:
      raise ValueError(f"dims {dims!r} name {len(dims)} dimensions, operand has shape {x.shape}")
    for letter, n in zip(dims, x.shape):
      sizes.setdefault(letter, []).append(n)
  all_dims = list(in_dims) + ([out_dims] if isinstance(out_dims, str) else list(out_dims))
  together = lambda a, b: any(a in d and b in d for d in all_dims)
  out: dict[str, list[str]] = {}
  for letter, names in axes.items():
    if letter not in sizes:
      continue
    kept: list[str] = []
    for a in _as_tuple(names):
      if a not in usable or mesh.shape[a] == 1:
        continue
      if any(a in used and together(letter, other) for other, used in out.items()):
        continue  # one mesh axis splits at most one dimension of an operand
      split = math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]
      if all(n % split == 0 for n in sizes[letter]):
        kept.append(a)
    out[letter] = kept
  # Letters that share a mesh axis without meeting in an operand (query heads and kv heads) are
  # tied: split by it together or not at all, so shard i of one lines up with shard i of the other.
  for a in usable:
    tied = [t for t, names in axes.items() if t in sizes and a in _as_tuple(names)]
    if len(tied) > 1 and not all(a in out[t] for t in tied):
      for t in tied:
        if not any(together(t, u) for u in tied if u != t):
          out[t] = [b for b in out[t] if b != a]
  return {k: tuple(v) for k, v in out.items() if v}


def _spec(dims: str, split: Mapping[str, tuple[str, ...]]) -> P:
  entries = []
  for letter in dims:
    names = split.get(letter, ())
    entries.append(None if not names else (names[0] if len(names) == 1 else names))
  return P(*entries)


def _sum_over(x, axes: tuple[str, ...], out_spec: P):
  """psum over `axes`, except the ones the output is split over: a letter absent from the output
  but tied to one in it (kv heads on the query heads' axis) is not a contraction."""
  split_out = {a for e in out_spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
  axes = tuple(a for a in axes if a not in split_out)
  return jax.lax.psum(x, axes) if axes else x


def shard_kernel(
  fn: Callable, *operands, in_dims: Sequence[str], out_dims: str | Sequence[str], axes: Mapping[str, Axes], mesh=None
):
  """`fn(*operands)` run per shard over the mesh (see the module docstring).

  Args:
    fn: the kernel call on local blocks; returns one array, or a tuple matching `out_dims`.
    *operands: arrays (pytrees are not supported: pass each array).
    in_dims: one letter string per operand, one letter per dimension.
    out_dims: the output's letters (a string), or a tuple of strings for a tuple of outputs.
    axes: letter -> mesh axis name(s) the letter may be split over; unnamed letters are whole.
    mesh: a `Mesh`/`AbstractMesh`; default the context mesh from `jax.set_mesh`.
  """
  mesh = current_mesh(mesh)
  if mesh is None or math.prod(mesh.shape[a] for a in free_axes(mesh)) == 1:
    return fn(*operands)
  split = resolve_axes(operands, in_dims, axes, mesh, out_dims)
  multi = not isinstance(out_dims, str)
  outs = tuple(out_dims) if multi else (out_dims,)
  in_specs = tuple(_spec(d, split) for d in in_dims)
  out_specs = tuple(_spec(d, split) for d in outs)
  # Letters tied to one mesh axis (k and its scale groups) sum over it once.
  contracted = [
    tuple(dict.fromkeys(a for letter, names in split.items() if letter not in d for a in names)) for d in outs
  ]

  def body(*local):
    result = fn(*local)
    results = result if multi else (result,)
    results = tuple(_sum_over(r, c, o) for r, c, o in zip(results, contracted, out_specs))
    return results if multi else results[0]

  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=in_specs,
    out_specs=out_specs if multi else out_specs[0],
    axis_names=set(free_axes(mesh)),
    check_vma=False,
  )(*operands)
