"""Online Subspace Descent: `online_subspace_descent(...)` (alias `osd`).

Liang, Liu, Chen, Liu et al., "Memory-Efficient LLM Training with Online Subspace Descent", 2024
(arXiv 2408.12857; reference kyleliang919/Online-Subspace-Descent, proj_type "continuous").
Same projection as GaLore (the smaller side, P [r, small] with G viewed as [big, small]; in the
reference's PyTorch layout [out, in] the input side when out >= in, square matrices included), but
the projector follows the gradient online instead of by periodic SVD:

    step 0:  P = top-r right singular vectors of the first gradient (the only SVD)
    each step t:
        R = G P^T;  N = Adam(R);  p = p * (1 - lr_t wd) - lr_t * scale * N P
        then (t >= 1, as the reference steps P after projecting back) one AdamW step on
        L(P) = || G_n P^T P - G_n ||_F^2,   G_n = G / ||G||_F   (per matrix)
        with lr_P = projector_lr_scale * lr_t   (tied to the main schedule)

Defaults: rank 128, scale 0.25, Adam b1 0.9, b2 0.999, eps 1e-8, weight_decay 0.0; P's AdamW is
torch's default (b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01). The reference sets
lr_P = lr_t / (lr_peak * update_proj_gap); `projector_lr_scale = 0.5` equals that at GaLore's
lr 0.01 and gap 200 (lr_P = 0.005 at peak); use 1 / (gap * lr_peak) to match other settings.
No SVD after step 0. P is f32 and is not re-orthonormalized (it drifts, as in the reference).
Selection of matrices (logical axes / `projection_mask` / `dimension_numbers`) as in `galore`.
A zero gradient gives zero R and a zero dL/dP (G_n is defined as 0, not 0/0): no NaN. A NaN
gradient propagates into the update and into P. `rank` sets state shapes: with
`optax.inject_hyperparams` pass `static_args=("rank",)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim import matrices
from jaxeff.optim import projection as proj

TINY = 1e-30


class OSDState(NamedTuple):
  count: jax.Array  # int32 step counter (0 -> initialize P by SVD)
  projector: Any  # per matrix P [batch, r, small] f32; MaskedNode for full-rank leaves
  adam: Any  # ScaleByAdamState over the proxies (low-rank R for matrices)
  projector_adam: Any  # ScaleByAdamState of P's own AdamW


def pca_loss(p: jax.Array, gn: jax.Array) -> jax.Array:
  """|| G_n P^T P - G_n ||_F^2 for one matrix: P [r, small], G_n [big, small]."""
  e = (gn @ p.T) @ p - gn
  return jnp.sum(e * e)


def _normalize(gc: jax.Array) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(gc * gc, axis=(-2, -1), keepdims=True))
  return gc / jnp.maximum(norm, TINY)  # zero gradient -> G_n = 0, not NaN


def projector_gradient(p: jax.Array, gc: jax.Array) -> jax.Array:
  """dL/dP of the online-PCA loss for P [B, r, small] and canonical gradients G [B, big, small]."""
  return jax.vmap(jax.grad(pca_loss))(p, _normalize(gc))


def scale_by_osd(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  scale: float = 0.25,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  mu_dtype: Any | None = None,
  projector_lr_scale: float = 0.5,
  projector_b1: float = 0.9,
  projector_b2: float = 0.999,
  projector_eps: float = 1e-8,
  projector_weight_decay: float = 0.01,
  *,
  logical_axes: Any = None,
  projection_mask: Any = None,
  dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""OSD's direction in gradient space: alpha Adam(G P^T) P, before the step size and weight decay.

  The building block of `online_subspace_descent` (which adds the decay and eta); use it to put
  your own transformations between the direction and the step. `learning_rate` does not scale
  the output: it only drives the projector's own AdamW step, eta_P = projector_lr_scale * eta_t.

  Args:
    learning_rate: eta (float or optax schedule), for eta_P only.
    rank: r; min(r, smaller side) per projected matrix. Static (it sets state shapes).
    scale: alpha, multiplies the projected-back update.
    b1: Adam's first-moment decay on the projected gradient.
    b2: Adam's second-moment decay on the projected gradient.
    eps: added to sqrt(v_hat).
    mu_dtype: dtype of Adam's first moment; None: f32 for projected matrices.
    projector_lr_scale: eta_P / eta.
    projector_b1: P's AdamW first-moment decay.
    projector_b2: P's AdamW second-moment decay.
    projector_eps: P's AdamW eps.
    projector_weight_decay: P's AdamW weight decay.
    logical_axes: logical-axis names per leaf, as in `galore`.
    projection_mask: instead of names, a bool pytree: True -> project the last two axes.
    dimension_numbers: instead of names, a pytree of `MatrixDims` or None per leaf.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = optax.chain(jaxeff.optim.scale_by_osd(1e-2, rank=4, logical_axes=axes),
    ...                  optax.scale_by_learning_rate(1e-2))
    >>> updates, state = tx.update(grads, tx.init(params), params)

  Reference: arXiv 2408.12857; https://github.com/kyleliang919/Online-Subspace-Descent.
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
  p_adam = optax.scale_by_adam(b1=projector_b1, b2=projector_b2, eps=projector_eps)

  def _views(tree):
    dims = matrices.matrix_dims(
      tree, logical_axes=logical_axes, dimension_numbers=dimension_numbers, matrix_mask=projection_mask, rule="project"
    )
    return proj.views(tree, dims)

  def init_fn(params):
    vws = _views(params)
    treedef = jax.tree.structure(params)
    projectors, proxies = proj.init_leaves(params, vws, matrices.static_int(rank, "rank", "osd"))
    projector_tree = jax.tree.unflatten(treedef, projectors)
    return OSDState(
      count=jnp.zeros([], jnp.int32),
      projector=projector_tree,
      adam=adam.init(jax.tree.unflatten(treedef, proxies)),
      projector_adam=p_adam.init(projector_tree),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    vws = _views(updates)
    grads, treedef = jax.tree.flatten(updates)
    first = state.count == 0
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    canon = [None if v is None else v.to_canonical(g).astype(jnp.float32) for g, v in zip(grads, vws)]
    old_p = proj.projector_leaves(state.projector)
    # Step 0: P from the first gradient's SVD (one cond for all matrices, batched by shape).
    cur_p = jax.lax.cond(first, lambda: proj.svd_projectors(canon, old_p), lambda: old_p)
    low = [g if gc is None else proj.project(gc, p) for g, gc, p in zip(grads, canon, cur_p)]
    p_grads = [p if gc is None else projector_gradient(p, gc) for gc, p in zip(canon, cur_p)]
    n, adam_state = adam.update(jax.tree.unflatten(treedef, low), state.adam)
    out = []
    for g, v, p, nn in zip(grads, vws, cur_p, jax.tree.leaves(n)):
      if v is None:
        out.append(nn.astype(g.dtype))
      else:
        out.append((scale * v.from_canonical(proj.project_back(nn, p))).astype(g.dtype))

    # P's AdamW step, after P was used for this step's update (the reference's order).
    cur_tree = jax.tree.unflatten(treedef, cur_p)
    d, p_adam_new = p_adam.update(jax.tree.unflatten(treedef, p_grads), state.projector_adam)
    lr_p = projector_lr_scale * lr
    stepped = jax.tree.map(lambda p, d: p - lr_p * (d + projector_weight_decay * p), cur_tree, d)
    # Step 0 only initializes P (the reference has no P gradient yet on its first call).
    new_projector = jax.tree.map(lambda a, b: jnp.where(first, a, b), cur_tree, stepped)
    p_adam_state = jax.tree.map(lambda a, b: jnp.where(first, a, b), state.projector_adam, p_adam_new)
    return jax.tree.unflatten(treedef, out), OSDState(
      count=optax.safe_increment(state.count), projector=new_projector, adam=adam_state, projector_adam=p_adam_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def online_subspace_descent(
  learning_rate: optax.ScalarOrSchedule,
  rank: int = 128,
  scale: float = 0.25,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  mu_dtype: Any | None = None,
  projector_lr_scale: float = 0.5,
  projector_weight_decay: float = 0.01,
  *,
  logical_axes: Any = None,
  projection_mask: Any = None,
  dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""OSD-AdamW: GaLore's projected Adam with an online-PCA projector (Liang et al. 2024).

  .. math::

    R_t = G_t P_t^\top, \quad W_t = W_{t-1} - \eta_t (\alpha\, \mathrm{Adam}(R_t) P_t + \lambda W_{t-1}) \\
    P_{t+1} = \mathrm{AdamW}_{\eta_P}\left(P_t, \nabla_P \|\hat G_t P^\top P - \hat G_t\|_F^2\right),
    \quad \hat G_t = G_t / \|G_t\|_F, \ \eta_P = \text{projector\_lr\_scale} \cdot \eta_t

  P_0 is the top-r SVD of the first gradient (the only SVD). State per matrix: Adam moments
  r x max(m, n), P r x min(m, n) and P's two AdamW moments: 2 r max + 3 r min against AdamW's
  2 m n (62.5% of AdamW for a square matrix at r = d/4).

  Args:
    learning_rate: the step size eta, a float or an optax schedule (also drives eta_P).
    rank: r; min(r, smaller side) per matrix. Sets state shapes: with
      `optax.inject_hyperparams` pass `static_args=("rank",)`.
    scale: alpha, multiplies the projected-back update (GaLore's 0.25).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to sqrt(v_hat).
    weight_decay: decoupled weight decay lambda on the parameters.
    mask: the weight-decay mask (pytree of bools or callable), optax's.
    mu_dtype: dtype of Adam's first moment; None: f32 for projected matrices, else the parameter's.
    projector_lr_scale: eta_P / eta. The reference uses eta_P = eta_t / (eta_peak * gap); 0.5
      equals it at eta_peak 0.01 and gap 200.
    projector_weight_decay: P's AdamW weight decay (torch's default 0.01).
    logical_axes: logical-axis names per leaf, as in `galore`.
    projection_mask: instead of names, a bool pytree: True -> project the last two axes.
    dimension_numbers: instead of names, a pytree of `MatrixDims` or None per leaf.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = jaxeff.optim.osd(1e-2, rank=4, logical_axes=axes)
    >>> updates, state = tx.update(grads, tx.init(params), params)

  Reference: https://github.com/kyleliang919/Online-Subspace-Descent (galore_projector.py,
  proj_type "continuous"); arXiv 2408.12857.
  """
  return optax.chain(
    scale_by_osd(
      learning_rate,
      rank,
      scale,
      b1,
      b2,
      eps,
      mu_dtype,
      projector_lr_scale,
      projector_weight_decay=projector_weight_decay,
      logical_axes=logical_axes,
      projection_mask=projection_mask,
      dimension_numbers=dimension_numbers,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


osd = online_subspace_descent
