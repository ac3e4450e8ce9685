"""Cautious optimizers vs a NumPy implementation of the published rule (torch sign convention)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff import optim
from jaxeff.optim.cautious import cautious_mask

LR, WD, STEPS = 1e-2, 0.1, 5
SHAPES = {"w": (32, 48), "b": (48,)}


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  return [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(STEPS)]


def _params(seed=1):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _mask(u, g):
  phi = (u * g > 0).astype(np.float64)  # torch space: p -= lr * u
  return u * phi / max(phi.mean(), 1e-3)


def np_c_adamw(p, grads, b1=0.9, b2=0.999, eps=1e-8):
  p = {k: v.astype(np.float64) for k, v in p.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v_ = {k: np.zeros_like(v) for k, v in p.items()}
  for t, g in enumerate(grads, 1):
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v_[k] = b2 * v_[k] + (1 - b2) * g[k] ** 2
      u = (m[k] / (1 - b1 ** t)) / (np.sqrt(v_[k] / (1 - b2 ** t)) + eps)
      p[k] = p[k] * (1 - LR * WD) - LR * _mask(u, g[k])
  return p


def np_c_lion(p, grads, b1=0.9, b2=0.99):
  p = {k: v.astype(np.float64) for k, v in p.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  for g in grads:
    for k in p:
      u = np.sign(b1 * m[k] + (1 - b1) * g[k])
      m[k] = b2 * m[k] + (1 - b2) * g[k]
      p[k] = p[k] * (1 - LR * WD) - LR * _mask(u, g[k])
  return p


def _run(tx, params, grads):
  @jax.jit
  def go(params, grads):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params
  return go(params, grads)


@pytest.mark.parametrize("name,ref", [("c_adamw", np_c_adamw), ("c_lion", np_c_lion)])
def test_matches_numpy(name, ref):
  params, grads = _params(), _grads()
  got = _run(optim.build(name, learning_rate=LR, weight_decay=WD), params, grads)
  want = ref(params, grads)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_sign_convention_in_optax_space():
  params, grads = _params(), _grads()[:2]
  # SGD's update -lr*g always agrees with g: nothing masked, scale 1.
  got = _run(optim.cautious(optax.sgd(LR)), params, grads)
  want = _run(optax.sgd(LR), params, grads)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  # An ascent direction (+lr*g) disagrees everywhere: everything masked.
  got = _run(optim.cautious(optax.scale(LR)), params, grads)
  for k in params:
    np.testing.assert_array_equal(got[k], params[k])


def test_weight_decay_outside_mask_and_zero_grads():
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  for name in ("c_adamw", "c_lion"):
    tx = optim.build(name, learning_rate=LR, weight_decay=WD)
    u, _ = tx.update(zeros, tx.init(params), params)
    # Every coordinate masked (u = 0), yet the decay still applies.
    for k in params:
      np.testing.assert_allclose(u[k], -LR * WD * params[k], rtol=1e-6)


def test_tiny_and_nan_grads():
  params = _params()
  tx = optim.c_adamw(LR, weight_decay=0.0)
  tiny = jax.tree.map(lambda p: jnp.full_like(p, 1e-30), params)
  u, _ = tx.update(tiny, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  nan = {"w": jnp.full(SHAPES["w"], jnp.nan), "b": jnp.ones(SHAPES["b"])}
  u, _ = tx.update(nan, tx.init(params), params)
  # Documented: NaN propagates through the mask (u * phi), it is not silently zeroed.
  assert bool(jnp.all(jnp.isnan(u["w"]))) and bool(jnp.all(jnp.isfinite(u["b"])))


def test_clamp_rescales_few_survivors():
  u = jnp.array([1.0, -1.0, -1.0, -1.0] + [0.0] * 996)  # optax-space update
  g = jnp.array([-1.0, -1.0, -1.0, -1.0] + [0.0] * 996)  # only the first agrees (u*g < 0)
  masked = cautious_mask(u, g, negated=True)
  # mean(phi) = 1e-3 -> scale 1000; the 1e-3 clamp bounds it for fewer survivors.
  np.testing.assert_allclose(masked[0], 1000.0, rtol=1e-5)
  np.testing.assert_array_equal(masked[1:], 0.0)
