"""Muon with the Moonlight recipe: `muon`, `c_muon` (cautious mask before orthogonalization).

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

Built from optax.contrib's Muon pieces (Newton-Schulz, `MuonDimensionNumbers`, consistent-RMS
scaling). Differences from `optax.contrib.muon` defaults, on purpose: the Adam side is plain AdamW
(0.9, 0.95) with weight decay (optax: NAdam-like, b2 0.999, wd 0); embeddings and the LM head go
to AdamW when logical axes say so (optax: every 2-D leaf to Muon); stacked 3-D "layers" weights
go to Muon (optax: silently to Adam); the momentum is Moonlight's `m = beta m + g` (optax: EMA with
bias correction, which weighs g and m differently during the first ~1/(1-beta) steps).

Which leaves are Muon matrices (see `jaxeff.optim._util`), pass at most one of:
  * `logical_axes`: pytree (or callable of params) of name tuples, e.g. from
    `logical_axes_from_state(nnx.state(model, nnx.Param))`. Names containing "vocab" -> AdamW;
    "layers" axes are batch axes; >= 2 remaining axes -> Muon. None leaf -> the shape rule.
  * `muon_mask`: bool pytree (or callable); True -> Muon on the last two axes (leading axes batch).
  * `dimension_numbers`: optax-style pytree of `MuonDimensionNumbers` / None.
  * nothing: shape rule, ndim == 2 -> Muon. Embeddings and the LM head are then NOT detectable
    (they are 2-D) and go to Muon; pass logical axes to follow the Moonlight recipe.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.contrib._muon import orthogonalize_via_newton_schulz, scale_by_shape

from jaxeff.optim import _util
from jaxeff.optim.cautious import cautious

NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 5  # one (a, b, c) per Newton-Schulz step


class MomentumState(NamedTuple):
  mu: optax.Updates


def scale_by_moonlight_momentum(beta: float = 0.95, nesterov: bool = True,
                                mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
  """m = beta m + g; returns g + beta m (nesterov) or m. Gradient-space direction."""

  def init_fn(params):
    return MomentumState(mu=optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: beta * m.astype(jnp.float32) + g.astype(jnp.float32), state.mu, updates)
    if nesterov:
      out = jax.tree.map(lambda m, g: (g.astype(jnp.float32) + beta * m).astype(g.dtype), mu, updates)
    else:
      out = jax.tree.map(lambda m, g: m.astype(g.dtype), mu, updates)
    mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
    return out, MomentumState(mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonalize(dims_tree, ns_coeffs=NS_COEFFS, eps: float = 1e-7) -> optax.GradientTransformation:
  """Newton-Schulz orthogonalization (optax's), in f32, per matrix (batch axes independent).

  `ns_coeffs` is one (a, b, c) row per step: the step count is a shape, not an int argument, so
  `optax.inject_hyperparams` (which turns every int into an array) cannot make it dynamic.
  """
  coeffs = jnp.asarray(ns_coeffs, jnp.float32).reshape(-1, 3)
  ns_steps = coeffs.shape[0]

  def update_fn(updates, state, params=None):
    del params
    out = jax.tree.map(
        lambda u, d: orthogonalize_via_newton_schulz(u.astype(jnp.float32), coeffs, ns_steps,
                                                     eps=eps, dimension_numbers=d).astype(u.dtype),
        updates, dims_tree)
    return out, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _muon_impl(learning_rate, beta, nesterov, ns_coeffs, ns_eps, consistent_rms,
               weight_decay, mask, adam_b1, adam_b2, eps, adam_learning_rate, mu_dtype,
               logical_axes, muon_mask, dimension_numbers, caution: bool):
  adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate

  def build(tree):
    # Roles depend only on static shapes and names, so the partition is rebuilt per call (pure).
    dims = _util.matrix_dims(tree, logical_axes=logical_axes, dimension_numbers=dimension_numbers,
                             matrix_mask=muon_mask, rule="muon")
    treedef = jax.tree.structure(tree)
    labels = jax.tree.unflatten(treedef, ["muon" if d is not None else "adam" for d in dims])
    # Same structure as the masked tree optax.partition hands the Muon branch.
    dims_tree = jax.tree.unflatten(treedef, [d if d is not None else optax.MaskedNode() for d in dims])
    momentum = scale_by_moonlight_momentum(beta, nesterov, mu_dtype)
    if caution:
      momentum = cautious(momentum, negated=False)  # C-Muon: mask before Newton-Schulz
    muon_tx = optax.chain(
        momentum,
        orthogonalize(dims_tree, ns_coeffs, ns_eps),
        scale_by_shape(weight_dimension_numbers=dims_tree, consistent_rms=consistent_rms),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_tx = optax.adamw(adam_lr, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=weight_decay,
                          mask=mask, mu_dtype=mu_dtype)
    return optax.partition({"muon": muon_tx, "adam": adam_tx}, labels)

  def init_fn(params):
    return build(params).init(params)

  def update_fn(updates, state, params=None):
    return build(updates).update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.95,
    weight_decay: float = 0.1,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = True,
    ns_coeffs=NS_COEFFS,
    ns_eps: float = 1e-7,
    consistent_rms: Optional[float] = 0.2,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    logical_axes: Any = None,
    muon_mask: Any = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """Moonlight Muon: Muon on hidden matrices, AdamW(0.9, 0.95) on the rest; see module docstring.

  `mask` is the weight-decay mask (optax convention), applied on both sides.
  `consistent_rms=None` gives Keller Jordan's sqrt(max(1, fan_out/fan_in)) scale instead.
  """
  return _muon_impl(learning_rate, beta, nesterov, ns_coeffs, ns_eps, consistent_rms,
                    weight_decay, mask, adam_b1, adam_b2, eps, adam_learning_rate, mu_dtype,
                    logical_axes, muon_mask, dimension_numbers, caution=False)


def c_muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.95,
    weight_decay: float = 0.1,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = True,
    ns_coeffs=NS_COEFFS,
    ns_eps: float = 1e-7,
    consistent_rms: Optional[float] = 0.2,
    adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
    logical_axes: Any = None,
    muon_mask: Any = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """Cautious Muon (experimental in the paper): the momentum direction u is masked by
  1[u * g > 0] / max(mean, 1e-3) BEFORE Newton-Schulz; the AdamW side is unchanged."""
  return _muon_impl(learning_rate, beta, nesterov, ns_coeffs, ns_eps, consistent_rms,
                    weight_decay, mask, adam_b1, adam_b2, eps, adam_learning_rate, mu_dtype,
                    logical_axes, muon_mask, dimension_numbers, caution=True)
