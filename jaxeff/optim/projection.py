"""Low-rank gradient projection shared by GaLore and Online Subspace Descent.

Every projected leaf is viewed as a batch of canonical matrices G [batch, big, small] (see
`matrices.MatrixView`): the references project the SMALLER side, so the projector is P [r, small]
with orthonormal rows, the projected gradient R = G P^T [big, r] and the way back R P.
In the references' PyTorch layout G_t [out, in]: out >= in (square included) -> right projector
Vh[:r] on the input side; out < in -> left projector U[:, :r] on the output side, stored here
transposed. All projector math is f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.optim import matrices


def views(tree, dims) -> list:
  return [None if d is None else matrices.MatrixView(x.shape, d) for x, d in zip(jax.tree.leaves(tree), dims)]


def eff_rank(view: matrices.MatrixView, rank: int) -> int:
  return min(rank, view.small)


def _right_vectors(g: jax.Array) -> jax.Array:
  return jnp.linalg.svd(g, full_matrices=False)[2]


def _right_vectors_one_by_one(g: jax.Array) -> jax.Array:
  # XLA:CPU: jaxlib's batched LAPACK SVD fans its batch out on the thread pool that also runs
  # each (fake) device's program. With several devices in the SVD at once the pool runs dry and
  # every device waits for the others forever (4 devices on 2 cores hang on the first refresh).
  # One matrix per call runs inline.
  return jax.lax.map(_right_vectors, g[:, None])[:, 0]


def svd_projector(gc: jax.Array, rank: int) -> jax.Array:
  """Top-`rank` right singular vectors of each G [B, big, small] (f32): P [B, r, small].

  Each vector's sign is fixed (largest-magnitude entry positive): LAPACK's sign is arbitrary and
  differs between backends, and GaLore keeps Adam moments across refreshes, so an arbitrary flip
  would change the trajectory. The subspace is the reference's.
  """
  vh = jax.lax.platform_dependent(gc.astype(jnp.float32), cpu=_right_vectors_one_by_one, default=_right_vectors)
  p = vh[:, :rank, :]
  idx = jnp.argmax(jnp.abs(p), axis=-1, keepdims=True)
  sign = jnp.where(jnp.take_along_axis(p, idx, axis=-1) < 0, -1.0, 1.0)
  return p * sign


def svd_projectors(canon: list, old: list) -> list:
  """Fresh projectors for every matrix: `canon` holds canonical gradients (None for full-rank
  leaves, whose `old` entry is returned as is), `old` the current projectors (their shapes give
  the rank). Matrices of the same shape and rank share one batched SVD, so a model's q/k/v/o and
  MLP kernels compile to a handful of SVDs instead of one per matrix.
  """
  groups: dict[tuple, list[int]] = {}
  for i, (gc, p) in enumerate(zip(canon, old)):
    if gc is not None:
      groups.setdefault((gc.shape[1:], p.shape[-2]), []).append(i)
  out = list(old)
  for (_, rank), idx in groups.items():
    stacked = svd_projector(jnp.concatenate([canon[i] for i in idx]), rank)
    offsets = np.cumsum([0] + [canon[i].shape[0] for i in idx])
    for i, a, b in zip(idx, offsets[:-1], offsets[1:]):
      out[i] = stacked[a:b]
  return out


def project(gc: jax.Array, p: jax.Array) -> jax.Array:
  """R = G P^T: [B, big, small] x [B, r, small] -> [B, big, r]."""
  return jnp.einsum("bij,brj->bir", gc.astype(jnp.float32), p)


def project_back(r: jax.Array, p: jax.Array) -> jax.Array:
  """R P: [B, big, r] x [B, r, small] -> [B, big, small]."""
  return jnp.einsum("bir,brj->bij", r.astype(jnp.float32), p)


def init_leaves(params, vws, rank: int):
  """Zero projectors (f32) and proxies (what Adam sees: low-rank for matrices, full otherwise)."""
  projectors, proxies = [], []
  for x, v in zip(jax.tree.leaves(params), vws):
    if v is None:
      projectors.append(matrices.masked_node())
      proxies.append(jnp.zeros_like(x))
    else:
      r = eff_rank(v, rank)
      projectors.append(jnp.zeros((v.batch, r, v.small), jnp.float32))
      proxies.append(jnp.zeros((v.batch, v.big, r), jnp.float32))
  return projectors, proxies


def projector_leaves(tree) -> list:
  """Per-parameter projector entries (arrays or MaskedNode) from a projector tree."""
  return jax.tree.leaves(tree, is_leaf=matrices.is_masked)
