"""Muon with the Moonlight recipe: `muon`, `c_muon` (C-Optim's cautious Muon).

Jordan, "Muon: An optimizer for hidden layers" (2024); Liu et al., "Muon is Scalable for LLM
Training" (Moonlight, arXiv 2502.16982). For a matrix parameter W [fan_in, fan_out]:

    m = beta * m + g                                   (Moonlight's sum-form momentum)
    u = g + beta * m            (nesterov)   or  u = m
    X = u / (||u||_F + 1e-7), transposed if rows > cols
    5x: A = X X^T;  X = a X + (b A + c A^2) X          (a, b, c) = (3.4445, -4.7750, 2.0315)
    W = W * (1 - lr * wd) - lr * 0.2 * sqrt(max(fan_in, fan_out)) * X

The 0.2 * sqrt(max(A, B)) factor matches AdamW's update RMS, so AdamW's lr and wd carry over.
Everything that is not a hidden matrix (embeddings, LM head, norm scales, biases) uses AdamW with
betas (0.9, 0.95), eps 1e-8, the same lr and the same weight decay. Defaults: beta 0.95, nesterov,
5 Newton-Schulz steps (`ns_coeffs`, one row per step, run in f32), weight_decay 0.1, consistent_rms 0.2.

Differences from `optax.contrib.muon` defaults, on purpose: the Adam side is plain AdamW (0.9, 0.95)
with weight decay (optax: NAdam-like, b2 0.999, wd 0); embeddings and the LM head go to AdamW when
logical axes say so (optax: every 2-D leaf to Muon); stacked 3-D "layers" weights go to Muon, one
matrix per layer (optax: silently to Adam); the momentum is Moonlight's `m = beta m + g` (optax: EMA
with bias correction, which weighs g and m differently during the first ~1/(1-beta) steps).

Which leaves are Muon matrices (see `jaxeff.optim.matrices`), pass at most one of:
  * `logical_axes`: pytree (or callable of params) of name tuples, e.g. from
    `logical_axes_from_state(nnx.state(model, nnx.Param))`. Names containing "vocab" -> AdamW;
    "layers" axes are batch axes; >= 2 remaining axes -> Muon. None leaf -> the shape rule.
  * `muon_mask`: bool pytree (or callable); True -> Muon on the last two axes (leading axes batch).
  * `dimension_numbers`: optax-style pytree of `MuonDimensionNumbers` / None.
  * nothing: shape rule, ndim == 2 -> Muon. Embeddings and the LM head are then NOT detectable
    (they are 2-D) and go to Muon; pass logical axes to follow the Moonlight recipe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim import matrices
from jaxeff.optim.cautious import c_adamw, mask_scale

NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 5  # one (a, b, c) per Newton-Schulz step


class MomentumState(NamedTuple):
  mu: optax.Updates


def _view_leaves(views_tree) -> list:
  return jax.tree.leaves(views_tree, is_leaf=lambda x: isinstance(x, matrices.MatrixView))


def scale_by_moonlight_momentum(
  beta: float = 0.95, nesterov: bool = True, mu_dtype: Any | None = None, *, caution: bool = False, views: Any = None
) -> optax.GradientTransformationExtraArgs:
  """m = beta m + g; returns g + beta m (nesterov) or m, in gradient space.

  `caution=True` is C-Optim's c_muon: the returned direction is multiplied by
  1[m * g > 0] / max(mean, 1e-3) with m the updated momentum (its sign is the sign of C-Optim's EMA
  momentum), the mean taken per matrix of `views` (a pytree of `MatrixView`s matching the updates).
  """

  def init_fn(params):
    return MomentumState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: beta * f32(m) + f32(g), state.mu, updates)
    if nesterov:
      out = jax.tree.map(lambda m, g: f32(g) + beta * m, mu, updates)
    else:
      out = mu
    if caution:
      leaves, treedef = jax.tree.flatten(out)
      masked = [
        u * mask_scale(m * f32(g) > 0, v.batch_axes)
        for u, m, g, v in zip(leaves, jax.tree.leaves(mu), jax.tree.leaves(updates), _view_leaves(views))
      ]
      out = jax.tree.unflatten(treedef, masked)
    out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates)
    mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
    return out, MomentumState(mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def newton_schulz(x: jax.Array, coeffs: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Approximate orthogonalization U V^T of each matrix in x [B, m, n] (f32), one (a, b, c) row
  of `coeffs` per step: X = x / (||x||_F + eps); X = a X + (b A + c A^2) X with A = X X^T.

  Works on the wide orientation (m <= n), so A is the smaller Gram matrix.
  """
  transposed = x.shape[-2] > x.shape[-1]
  if transposed:
    x = jnp.swapaxes(x, -1, -2)
  x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + eps)
  for i in range(coeffs.shape[0]):  # a handful of steps: unrolled
    a, b, c = coeffs[i, 0], coeffs[i, 1], coeffs[i, 2]
    gram = x @ jnp.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return jnp.swapaxes(x, -1, -2) if transposed else x


def shape_scale(fan_in: int, fan_out: int, consistent_rms: float | None) -> float:
  """Moonlight's consistent_rms * sqrt(max(fan_in, fan_out)), or Keller Jordan's
  sqrt(max(1, fan_out / fan_in)) when `consistent_rms` is None."""
  if consistent_rms is None:
    return max(1.0, fan_out / fan_in) ** 0.5
  return consistent_rms * max(fan_in, fan_out) ** 0.5


def orthogonalize(
  views, ns_coeffs=NS_COEFFS, eps: float = 1e-7, consistent_rms: float | None = 0.2
) -> optax.GradientTransformationExtraArgs:
  """Newton-Schulz per matrix (f32, batch axes independent), then the shape scale.

  `views` is a pytree of `MatrixView`s matching the updates. `ns_coeffs` is one (a, b, c) row per
  step: the step count is a shape, not an int argument, so `optax.inject_hyperparams` (which turns
  every int into an array) cannot make it dynamic.
  """
  coeffs = jnp.asarray(ns_coeffs, jnp.float32).reshape(-1, 3)

  def one(u, v):
    x = newton_schulz(v.to_matrix(u.astype(jnp.float32)), coeffs, eps)
    return (shape_scale(v.m, v.n, consistent_rms) * v.from_matrix(x)).astype(u.dtype)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    return jax.tree.unflatten(treedef, [one(u, v) for u, v in zip(leaves, _view_leaves(views))]), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


_ARGS_DOC = """
  Args:
    learning_rate: the step size eta, a float or an optax schedule; with the default
      `consistent_rms` AdamW's learning rate carries over.
    beta: momentum decay.
    weight_decay: decoupled weight decay lambda, on both the Muon and the AdamW side.
    mask: pytree of bools (or callable of the params) choosing the decayed leaves (optax's).
    adam_b1: first-moment decay of the AdamW side (embeddings, LM head, norms, biases).
    adam_b2: second-moment decay of the AdamW side.
    eps: the AdamW side's epsilon, added to sqrt(v_hat).
    mu_dtype: dtype of the momenta (e.g. `jnp.bfloat16`); None keeps the parameters' dtype.
    nesterov: use g + beta m (True) or m (False) as the direction.
    ns_coeffs: one (a, b, c) row per Newton-Schulz step; the default is 5 steps of Keller
      Jordan's quintic (3.4445, -4.7750, 2.0315).
    ns_eps: added to ||u||_F before Newton-Schulz (a zero gradient gives a zero update).
    consistent_rms: scale the orthogonalized update by consistent_rms * sqrt(max(fan_in,
      fan_out)) (Moonlight, 0.2 matches AdamW's update RMS); None gives Keller Jordan's
      sqrt(max(1, fan_out / fan_in)).
    adam_learning_rate: a separate learning rate (or schedule) for the AdamW side; None shares eta.
    logical_axes: logical-axis names per leaf (pytree or callable of the params), e.g.
      `logical_axes_from_state(nnx.state(model, nnx.Param))`: "vocab" leaves go to AdamW, "layers"
      axes are batch axes (one matrix per layer).
    muon_mask: instead of names, a bool pytree: True -> Muon on the last two axes.
    dimension_numbers: instead of names, a pytree of `MatrixDims` (optax's
      `MuonDimensionNumbers`) or None per leaf.
    caution: C-Optim's cautious masks on both sides (`c_muon` sets it).
"""


MUON_DOC = (
  r"""Muon with the Moonlight recipe: Muon on hidden matrices, AdamW(0.9, 0.95) on the rest.

  For each hidden matrix W [fan_in, fan_out] (one per layer of a scanned stack):

  .. math::

    m_t = \beta m_{t-1} + g_t, \quad u_t = g_t + \beta m_t \ (\text{nesterov}) \\
    O_t = \mathrm{NS}_5(u_t / (\|u_t\|_F + \epsilon_{NS})) \approx U V^\top \\
    W_t = W_{t-1} - \eta_t \left( 0.2 \sqrt{\max(\text{fan\_in}, \text{fan\_out})}\, O_t
          + \lambda W_{t-1} \right)

  NS_5 is five steps of X <- aX + (b XX^T + c (XX^T)^2) X in f32. Every other leaf gets AdamW with
  betas (adam_b1, adam_b2), the same learning rate and weight decay.
"""
  + _ARGS_DOC
  + """
  Example (a model's axes: `jaxeff.optim.logical_axes_from_state(nnx.state(model, nnx.Param))`)::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = jaxeff.optim.muon(3e-3, weight_decay=0.1, logical_axes=axes)  # "emb" goes to AdamW
    >>> updates, state = tx.update(grads, tx.init(params), params)

  References: Jordan, "Muon: An optimizer for hidden layers" (2024),
  https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM Training"
  (arXiv 2502.16982), https://github.com/MoonshotAI/Moonlight (toy_train.py).
"""
)


def muon(
  learning_rate: optax.ScalarOrSchedule,
  beta: float = 0.95,
  weight_decay: float = 0.1,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  adam_b1: float = 0.9,
  adam_b2: float = 0.95,
  eps: float = 1e-8,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = True,
  ns_coeffs=NS_COEFFS,
  ns_eps: float = 1e-7,
  consistent_rms: float | None = 0.2,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  logical_axes: Any = None,
  muon_mask: Any = None,
  dimension_numbers: Any = None,
  caution: bool = False,
) -> optax.GradientTransformationExtraArgs:
  adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate

  def build(tree):
    # Roles depend only on static shapes and names, so the partition is rebuilt per call (pure).
    dims = matrices.matrix_dims(
      tree, logical_axes=logical_axes, dimension_numbers=dimension_numbers, matrix_mask=muon_mask, rule="muon"
    )
    leaves, treedef = jax.tree.flatten(tree)
    labels = jax.tree.unflatten(treedef, ["muon" if d is not None else "adam" for d in dims])
    # Same structure as the masked tree optax.partition hands the Muon branch.
    views = jax.tree.unflatten(
      treedef, [optax.MaskedNode() if d is None else matrices.MatrixView(x.shape, d) for x, d in zip(leaves, dims)]
    )
    muon_tx = optax.chain(
      scale_by_moonlight_momentum(beta, nesterov, mu_dtype, caution=caution, views=views),
      orthogonalize(views, ns_coeffs, ns_eps, consistent_rms),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
    )
    if caution:  # C-Optim masks its auxiliary AdamW too (adam_update in c_muon.py)
      adam_tx = c_adamw(
        adam_lr,
        b1=adam_b1,
        b2=adam_b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=mask,
        mu_dtype=mu_dtype,
        logical_axes=logical_axes,
      )
    else:
      adam_tx = optax.adamw(
        adam_lr, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=weight_decay, mask=mask, mu_dtype=mu_dtype
      )
    return optax.partition({"muon": muon_tx, "adam": adam_tx}, labels)

  def init_fn(params):
    return build(params).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return build(updates).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


muon.__doc__ = MUON_DOC


# C-Optim's cautious Muon: the one implementation with the caution mask on.
c_muon = functools.partial(muon, caution=True)
c_muon.__doc__ = (
  r"""Cautious Muon (C-Optim's c_muon.py; "experimental" in the cautious-optimizers paper).

  As `muon`, with C-Optim's mask on both sides. On the Muon side the mask comes from the
  momentum and the gradient and is applied before Newton-Schulz:

  .. math::

    m_t = \beta m_{t-1} + g_t, \quad \phi_t = 1[m_t g_t > 0] \\
    u_t = (g_t + \beta m_t)\, \phi_t / \max(\mathrm{mean}(\phi_t), 10^{-3}), \quad
    W_t = W_{t-1} - \eta_t (s\, \mathrm{NS}_5(u_t) + \lambda W_{t-1})

  (C-Optim's EMA momentum has the sign of m_t, and Newton-Schulz is scale-invariant, so this is
  its rule.) The mean is per matrix (per layer of a stack). The AdamW side is `c_adamw` (mask
  1[m g > 0] on Adam's direction), as C-Optim's auxiliary Adam. The shape scale s is Moonlight's
  by default; `consistent_rms=None` gives C-Optim's (Keller Jordan's) sqrt(max(1, fan_out/fan_in)).
"""
  + _ARGS_DOC
  + """
  Example::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = jaxeff.optim.c_muon(3e-3, logical_axes=axes)
    >>> updates, state = tx.update(grads, tx.init(params), params)

  Reference: https://github.com/kyleliang919/C-Optim (c_muon.py: muon_update, adam_update).
"""
)

# The doctest finder skips partial objects: run c_muon's example too.
__test__ = {"c_muon": c_muon.__doc__}
