"""Cautious optimizers: `cautious(direction)`, `c_adamw`, `c_lion`.

Liang, Chen, Liu, Liu, "Cautious Optimizers: Improving Training with One Line of Code", 2024
(arXiv 2411.16085; reference kyleliang919/C-Optim). In PyTorch sign convention (p -= lr * u):

    phi = 1[u * g > 0]                         # keep coordinates that agree with the gradient
    u   = u * phi / max(mean(phi), 1e-3)       # per tensor, mean in f32 (the clamp form of c_adamw)
    p   = p * (1 - lr * wd) - lr * u           # decoupled weight decay stays OUTSIDE the mask

"Per tensor" is per layer for a scanned stack: leaves whose logical axes include "layers" (one
[layers, ...] array holding what PyTorch keeps as separate tensors) get one mean per layer when
`logical_axes` is given. Without logical axes the mean is over the whole leaf.

optax adds updates to params, so an optax-space update agrees with the gradient when
`update * grad < 0` (`negated=True`, for full optimizers without weight decay such as
`optax.adam(lr)` or `optax.sgd(lr)`); for a `scale_by_*` direction (same sign as the gradient)
pass `negated=False`.

Under `jax.jit` the mean is over the whole (possibly sharded) tensor: GSPMD makes it global. Inside
`shard_map` it would be per shard, which is not the published rule. A NaN in the inner update
propagates (u * phi keeps NaN), as in the reference; it is not silently masked to zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim import matrices

CLAMP = 1e-3


def mask_scale(agree: jax.Array, batch_axes: tuple[int, ...] = ()) -> jax.Array:
  """phi / max(mean(phi), 1e-3) in f32 for phi = agree; the mean over every axis but `batch_axes`
  (stacked layers: one mean per layer)."""
  phi = agree.astype(jnp.float32)
  axes = tuple(i for i in range(agree.ndim) if i not in batch_axes)
  # f32 mean: a bf16 mean of millions of ones loses the count.
  return phi / jnp.maximum(jnp.mean(phi, axis=axes, keepdims=True), CLAMP)


def cautious_mask(u: jax.Array, g: jax.Array, negated: bool, batch_axes: tuple[int, ...] = ()) -> jax.Array:
  """u * phi / max(mean(phi), 1e-3), phi the sign-agreement mask of u and g."""
  agree = (u * g < 0) if negated else (u * g > 0)
  return (u * mask_scale(agree, batch_axes).astype(u.dtype)).astype(u.dtype)


def cautious(
  inner: optax.GradientTransformation, *, negated: bool = True, logical_axes: Any = None
) -> optax.GradientTransformationExtraArgs:
  """Masks `inner`'s update where its sign disagrees with the gradient (Liang et al. 2024).

  `inner` must be a direction that does not read the parameters: decoupled weight decay has to
  stay outside the mask (zero-gradient coordinates keep their decay, agreeing ones do not get it
  rescaled), and a wrapper cannot separate it from a full optimizer's update. So `inner.update`
  is called without `params`, and an inner transformation that needs them (weight decay in
  `optax.adamw` or `optax.lion`) raises a ValueError naming the composition to use instead.

  Args:
    inner: a gradient transformation that does not read `params`, e.g. `optax.scale_by_adam()`
      (`negated=False`) or `optax.adam(lr)` / `optax.sgd(lr)` (`negated=True`). Its state is kept
      unchanged; the mask only touches the returned updates.
    negated: True when `inner` returns optax-space updates (agreement is `update * grad < 0`),
      False for a gradient-space direction (`update * grad > 0`).
    logical_axes: optional pytree (or callable of the params) of logical-axis tuples; leaves with
      a "layers" axis are normalized per layer, as the reference does per tensor.

  Example (the same rule as `c_adamw(1e-3, weight_decay=1e-4)`)::

    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(cautious(optax.scale_by_adam(), negated=False),
    ...                  optax.add_decayed_weights(1e-4), optax.scale_by_learning_rate(1e-3))
    >>> params, grads = {"w": jnp.ones(4)}, {"w": jnp.array([1.0, -1.0, 0.5, 0.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> updates["w"].shape
    (4,)

  Returns:
    An `optax.GradientTransformationExtraArgs`; extra keywords are passed on to `inner`.
  """
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    del params  # never handed to `inner`: see the docstring
    try:
      new_updates, new_state = inner.update(updates, state, None, **extra_args)
    except ValueError as e:
      if "params" not in str(e):
        raise
      raise ValueError(
        "cautious(inner): `inner` reads the parameters (weight decay?), which would put the decay "
        "inside the mask. Wrap only the direction and decay outside it, e.g. optax.chain("
        "cautious(optax.scale_by_adam(), negated=False), optax.add_decayed_weights(wd), "
        "optax.scale_by_learning_rate(lr)), or use c_adamw / c_lion."
      ) from e
    stacked = matrices.batch_axes_per_leaf(updates, logical_axes)
    leaves, treedef = jax.tree.flatten(new_updates)
    masked = [cautious_mask(u, g, negated, b) for u, g, b in zip(leaves, jax.tree.leaves(updates), stacked)]
    return jax.tree.unflatten(treedef, masked), new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def c_adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: float = 1e-4,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  nesterov: bool = False,
  logical_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Cautious AdamW (C-AdamW, Liang et al. 2024): `optax.adamw` with the cautious mask.

  .. math::

    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    u_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon), \quad \phi_t = 1[u_t g_t > 0] \\
    p_t = p_{t-1} - \eta_t \left( u_t \phi_t / \max(\mathrm{mean}(\phi_t), 10^{-3})
          + \lambda p_{t-1} \right)

  The mean is per tensor (per layer of a scanned stack with `logical_axes`); the decay is outside
  the mask. No hyperparameters beyond AdamW's; the defaults are `optax.adamw`'s.

  Args:
    learning_rate: the step size eta, a float or an optax schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to sqrt(v_hat).
    eps_root: added to v_hat inside the square root.
    mu_dtype: dtype of the first moment (e.g. `jnp.bfloat16`); None keeps the parameters' dtype.
    weight_decay: decoupled weight decay lambda, applied outside the mask.
    mask: pytree of bools (or callable of the params) choosing the decayed leaves (optax's).
    nesterov: Nesterov momentum in the Adam direction (optax's `nesterov`).
    logical_axes: optional logical-axis names per leaf; "layers" axes get a mean per layer.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = jaxeff.optim.c_adamw(1e-3, weight_decay=0.1, logical_axes=axes)  # one mask mean per layer
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> params = optax.apply_updates(params, updates)

  Reference: https://github.com/kyleliang919/C-Optim (c_adamw.py).
  """
  return optax.chain(
    cautious(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nesterov=nesterov),
      negated=False,
      logical_axes=logical_axes,
    ),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def c_lion(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.99,
  mu_dtype: Any | None = None,
  weight_decay: float = 1e-3,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  logical_axes: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Cautious Lion (C-Lion, Liang et al. 2024): `optax.lion` with the cautious mask.

  .. math::

    u_t = \mathrm{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t), \quad \phi_t = 1[u_t g_t > 0] \\
    p_t = p_{t-1} - \eta_t \left( u_t \phi_t / \max(\mathrm{mean}(\phi_t), 10^{-3})
          + \lambda p_{t-1} \right), \quad m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t

  The clamp form of the normalization (C-Optim's current c_adamw; its c_lion.py uses
  numel / (sum(phi) + 1), which differs by at most one count); defaults are `optax.lion`'s.

  Args:
    learning_rate: the step size eta (3-10x below AdamW's), a float or an optax schedule.
    b1: interpolation between momentum and gradient inside the sign.
    b2: decay of the momentum.
    mu_dtype: dtype of the momentum; None keeps the parameters' dtype.
    weight_decay: decoupled weight decay lambda (3-10x above AdamW's), outside the mask.
    mask: pytree of bools (or callable of the params) choosing the decayed leaves.
    logical_axes: optional logical-axis names per leaf; "layers" axes get a mean per layer.

  Example::

    >>> import jax.numpy as jnp, optax
    >>> import jaxeff.optim
    >>> params = {"emb": jnp.ones((32, 8)), "w": jnp.ones((2, 8, 16))}       # a scanned stack of 2
    >>> axes = {"emb": ("vocab", "embed"), "w": ("layers", "embed", "mlp")}  # logical axes per leaf
    >>> grads = {"emb": jnp.full((32, 8), 0.1), "w": jnp.linspace(-1, 1, 256).reshape(2, 8, 16)}
    >>> tx = jaxeff.optim.c_lion(3e-4, weight_decay=1.0)
    >>> updates, state = tx.update(grads, tx.init(params), params)

  Reference: https://github.com/kyleliang919/C-Optim (c_lion.py); timm's Lion with caution=True.
  """
  return optax.chain(
    cautious(optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype), negated=False, logical_axes=logical_axes),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
