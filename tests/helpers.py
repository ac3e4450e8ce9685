"""Helpers several test modules share."""

import jax
import optax


def run_optimizer(tx: optax.GradientTransformation, params, grads):
  """(params, state) after `tx.init(params)` and one update per gradient of `grads`, in one jit."""
  return optimizer_runner(tx)(params, grads)


def optimizer_runner(tx: optax.GradientTransformation):
  """A jitted `go(params, grads) -> (params, state)`: init, then one update per gradient."""

  @jax.jit
  def go(params, grads):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  return go
