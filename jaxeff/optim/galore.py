"""GaLore: `galore(...)`, reference-faithful (jiaweizzhao/GaLore, "std" projection).

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024
(arXiv 2403.03507). For an attention/MLP matrix G [m, n] in the reference's PyTorch layout
[out, in] (jaxeff stores [in, out]; `matrices.MatrixView` translates):

    every T steps (t % T == 0): U, S, Vh = svd(f32(G))
        m >= n: P = Vh[:r]        (r x n),  R = G P^T  (m x r),  back: N P     (square: this one)
        m <  n: P = U[:, :r]      (m x r),  R = P^T G  (r x n),  back: P N
    N = Adam(R)        moments kept across projector refreshes (as the reference does)
    p = p * (1 - lr * wd) - lr * scale * back(N)

Defaults (the paper's 60M-1B settings): rank 128, update_proj_gap 200, scale 0.25, Adam
b1 0.9, b2 0.999, eps 1e-8, weight_decay 0.0. The projected side is the SMALLER one, so the state
is r x max(m, n) (`optax.contrib.galore` projects the larger side and cannot be configured to
match, so this is written here; the projector code is shared with `osd`). Only attention and MLP
matrices are projected: logical axes containing "heads", "kv_heads" or "mlp" (never "vocab");
everything else (embeddings, LM head, norms) gets full-rank AdamW with the same lr and wd.
Without `logical_axes`/`projection_mask`/`dimension_numbers` the shape rule (ndim == 2) is used,
which also projects embeddings. Stacked "layers" weights are projected per layer. The SVD runs
under `lax.cond` outside any vmap, so it really runs only every T steps.

Deviations from the reference code: Adam is optax's (eps added to sqrt(v_hat), as in the paper's
Algorithm 1; the reference's HF AdamW adds eps to sqrt(v) with eps 1e-6); decoupled weight decay
uses the pre-step parameter (optax convention; the reference decays after the step: O(lr^2 wd)).
NaN gradients propagate (the SVD returns NaN, it does not crash); zero gradients give zero updates.
`rank` sets state shapes: with `optax.inject_hyperparams` pass `static_args=("rank",)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim import matrices
from jaxeff.optim import projection as proj


class GaLoreState(NamedTuple):
  count: jax.Array  # int32 step counter, decides the refreshes
  projector: Any  # per matrix P [batch, r, small] f32; MaskedNode for full-rank leaves
  adam: Any  # optax ScaleByAdamState over the proxies (low-rank R for matrices)


def scale_by_galore(
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  mu_dtype: Any | None = None,
  *,
  logical_axes: Any = None,
  projection_mask: Any = None,
  dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore's direction in gradient space: alpha Adam(R_t) projected back, R_t the gradient
  projected on the top-r singular vectors refreshed every `update_proj_gap` steps.

  The building block of `galore` (which adds the weight decay and the step size eta).

  Args:
    rank: r; min(r, smaller side) per projected matrix. Static (it sets state shapes).
    update_proj_gap: T, steps between SVD refreshes of the projector.
    scale: alpha, multiplies the projected-back update.
    b1: Adam's first-moment decay on the projected gradient.
    b2: Adam's second-moment decay on the projected gradient.
    eps: added to sqrt(v_hat).
    mu_dtype: dtype of Adam's first moment; None: f32 for projected matrices.
    logical_axes: logical-axis names per leaf, as in `galore`.
    projection_mask: instead of names, a bool pytree: True -> project the last two axes.
    dimension_numbers: instead of names, a pytree of `MatrixDims` or None per leaf.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = optax.chain(jaxeff.optim.scale_by_galore(rank=4, logical_axes=axes),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"].shape    # back in the parameter's space
    (2, 8, 16)

  Reference: arXiv 2403.03507; https://github.com/jiaweizzhao/GaLore (galore_projector.py).
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

  def _views(tree):
    dims = matrices.matrix_dims(
      tree, logical_axes=logical_axes, dimension_numbers=dimension_numbers, matrix_mask=projection_mask, rule="project"
    )
    return proj.views(tree, dims)

  def init_fn(params):
    vws = _views(params)
    treedef = jax.tree.structure(params)
    projectors, proxies = proj.init_leaves(params, vws, matrices.static_int(rank, "rank", "galore"))
    return GaLoreState(
      count=jnp.zeros([], jnp.int32),
      projector=jax.tree.unflatten(treedef, projectors),
      adam=adam.init(jax.tree.unflatten(treedef, proxies)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    vws = _views(updates)
    grads, treedef = jax.tree.flatten(updates)
    refresh = state.count % update_proj_gap == 0
    leaves = list(zip(grads, vws, proj.projector_leaves(state.projector)))
    canon = [None if v is None else v.to_canonical(g).astype(jnp.float32) for g, v, _ in leaves]
    old_p = [p for _, _, p in leaves]

    # One scalar-predicate cond for all matrices, outside any vmap: the SVDs really run only on
    # refresh steps. The rank comes from the state's shapes (a traced `rank` is never needed).
    new_p = jax.lax.cond(refresh, lambda: proj.svd_projectors(canon, old_p), lambda: old_p)
    low = [g if gc is None else proj.project(gc, p) for (g, _, _), gc, p in zip(leaves, canon, new_p)]
    n, adam_state = adam.update(jax.tree.unflatten(treedef, low), state.adam)
    out = []
    for g, v, p, nn in zip(grads, vws, new_p, jax.tree.leaves(n)):
      if v is None:
        out.append(nn.astype(g.dtype))
      else:
        out.append((scale * v.from_canonical(proj.project_back(nn, p))).astype(g.dtype))
    return jax.tree.unflatten(treedef, out), GaLoreState(
      count=optax.safe_increment(state.count), projector=jax.tree.unflatten(treedef, new_p), adam=adam_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  update_proj_gap: int = 200,
  scale: float = 0.25,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  mu_dtype: Any | None = None,
  *,
  logical_axes: Any = None,
  projection_mask: Any = None,
  dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-AdamW: Adam on low-rank projections of the attention/MLP gradients (Zhao et al. 2024).

  For each projected matrix, with P refreshed by SVD every `update_proj_gap` steps:

  .. math::

    R_t = G_t P_t^\top, \quad N_t = \mathrm{Adam}(R_t), \quad
    W_t = W_{t-1} - \eta_t (\alpha N_t P_t + \lambda W_{t-1})

  where P_t holds the top-r singular vectors of the smaller side (the input side in PyTorch's
  [out, in] layout when out >= in, square matrices included) and alpha is `scale`. Other leaves
  get AdamW with the same hyperparameters. State per matrix: moments r x max(m, n) and P r x
  min(m, n), against AdamW's 2 m n.

  Args:
    learning_rate: the step size eta, a float or an optax schedule.
    rank: r; min(r, smaller side) per matrix. Sets state shapes: with
      `optax.inject_hyperparams` pass `static_args=("rank",)`.
    update_proj_gap: T, steps between SVD refreshes of P (the reference's 200).
    scale: alpha, multiplies the projected-back update (the reference's 0.25).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to sqrt(v_hat).
    weight_decay: decoupled weight decay lambda.
    mask: the weight-decay mask (pytree of bools or callable), optax's.
    mu_dtype: dtype of Adam's first moment; None: f32 for projected matrices, else the parameter's.
    logical_axes: logical-axis names per leaf; leaves with "heads", "kv_heads" or "mlp" (and no
      "vocab") are projected, "layers" axes are batch axes (one projector per layer).
    projection_mask: instead of names, a bool pytree: True -> project the last two axes.
    dimension_numbers: instead of names, a pytree of `MatrixDims` or None per leaf.

  Example (a model's axes: `jaxeff.optim.logical_axes_from_state(nnx.state(model, nnx.Param))`)::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = jaxeff.optim.galore(1e-2, rank=4, update_proj_gap=200, logical_axes=axes)
    >>> updates, state = tx.update(grads, tx.init(params), params)

  Reference: https://github.com/jiaweizzhao/GaLore (galore_torch/galore_projector.py, "std").
  """
  return optax.chain(
    scale_by_galore(
      rank,
      update_proj_gap,
      scale,
      b1,
      b2,
      eps,
      mu_dtype,
      logical_axes=logical_axes,
      projection_mask=projection_mask,
      dimension_numbers=dimension_numbers,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
