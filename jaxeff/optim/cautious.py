"""Cautious optimizers: `cautious(inner)`, `c_adamw`, `c_lion`.

Liang, Chen, Liu, Liu, "Cautious Optimizers: Improving Training with One Line of Code", 2024
(arXiv 2411.16085; reference kyleliang919/C-Optim). In PyTorch sign convention (p -= lr * u):

    phi = 1[u * g > 0]                         # keep coordinates that agree with the gradient
    u   = u * phi / max(mean(phi), 1e-3)       # per tensor, mean in f32 (the clamp form of c_adamw)
    p   = p * (1 - lr * wd) - lr * u           # decoupled weight decay stays OUTSIDE the mask

optax adds updates to params, so an optax-space update agrees with the gradient when
`update * grad < 0` (`negated=True`, the default, for full optimizers such as `optax.adamw(...)`);
for a `scale_by_*` direction (same sign as the gradient) pass `negated=False`.

Defaults: `c_adamw` matches `optax.adamw` (b1 0.9, b2 0.999, eps 1e-8, weight_decay 1e-4);
`c_lion` matches `optax.lion` (b1 0.9, b2 0.99, weight_decay 1e-3). No new hyperparameters.

Under `jax.jit` the mean is over the whole (possibly sharded) tensor: GSPMD makes it global. Inside
`shard_map` it would be per shard, which is not the published rule. A NaN in the inner update
propagates (u * phi keeps NaN), as in the reference; it is not silently masked to zero.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

CLAMP = 1e-3


def cautious_mask(u: jax.Array, g: jax.Array, negated: bool) -> jax.Array:
  """u * phi / max(mean(phi), 1e-3) with phi the sign-agreement mask of u and g."""
  agree = (u * g < 0) if negated else (u * g > 0)
  phi = agree.astype(jnp.float32)
  # f32 mean: a bf16 mean of millions of ones loses the count.
  scale = 1.0 / jnp.maximum(jnp.mean(phi), CLAMP)
  return (u * (phi * scale).astype(u.dtype)).astype(u.dtype)


def cautious(inner: optax.GradientTransformation, *, negated: bool = True) -> optax.GradientTransformation:
  """Wraps `inner`, zeroing update coordinates whose sign disagrees with the gradient.

  Args:
    inner: any GradientTransformation; its state is kept unchanged (the mask only touches the
      returned updates).
    negated: True when `inner` returns optax-space updates (a full optimizer: agreement is
      `update * grad < 0`); False for a gradient-space direction such as `optax.scale_by_adam()`.
  """

  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra):
    new_updates, new_state = inner.update(updates, state, params, **extra)
    masked = jax.tree.map(lambda u, g: cautious_mask(u, g, negated), new_updates, updates)
    return masked, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def c_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 1e-4,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
  """Cautious AdamW: `optax.adamw` with the mask between the Adam direction and the decay."""
  return optax.chain(
      cautious(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                                   nesterov=nesterov), negated=False),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def c_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 1e-3,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
) -> optax.GradientTransformation:
  """Cautious Lion: `optax.lion` with the mask between sign(...) and the decay."""
  return optax.chain(
      cautious(optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype), negated=False),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
