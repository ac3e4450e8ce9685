"""Cautious optimizers vs a NumPy implementation of the published rule (torch sign convention)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_optimizer

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
      u = (m[k] / (1 - b1**t)) / (np.sqrt(v_[k] / (1 - b2**t)) + eps)
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


@pytest.mark.parametrize("name,ref", [("c_adamw", np_c_adamw), ("c_lion", np_c_lion)])
def test_matches_numpy(name, ref):
  params, grads = _params(), _grads()
  got = run_optimizer(optim.build(name, learning_rate=LR, weight_decay=WD), params, grads)[0]
  want = ref(params, grads)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_sign_convention_in_optax_space():
  params, grads = _params(), _grads()[:2]
  # SGD's update -lr*g always agrees with g: nothing masked, scale 1.
  got = run_optimizer(optim.cautious(optax.sgd(LR)), params, grads)[0]
  want = run_optimizer(optax.sgd(LR), params, grads)[0]
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  # An ascent direction (+lr*g) disagrees everywhere: everything masked.
  got = run_optimizer(optim.cautious(optax.scale(LR)), params, grads)[0]
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


def test_wrapper_keeps_weight_decay_outside_the_mask():
  """The issue's example: p = 1, g = [1, -1, 0, 0], lr 0.1, wd 0.5. Adam's first direction is
  sign(g); two of four coordinates agree (scale 2); the decay -lr*wd*p applies everywhere."""
  params, g = jnp.ones(4), jnp.array([1.0, -1.0, 0.0, 0.0])
  want = np.array([-0.25, 0.15, -0.05, -0.05])
  composed = optax.chain(
    optim.cautious(optax.scale_by_adam(), negated=False),
    optax.add_decayed_weights(0.5),
    optax.scale_by_learning_rate(0.1),
  )
  for tx in (composed, optim.c_adamw(0.1, weight_decay=0.5)):
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u, want, rtol=1e-5)
  # Around a full optimizer with decay the mask would swallow the decay ([-0.3, 0.1, 0, 0]):
  # the wrapper refuses any inner transformation that reads the parameters.
  tx = optim.cautious(optax.adamw(0.1, weight_decay=0.5))
  with pytest.raises(ValueError, match="add_decayed_weights"):
    tx.update(g, tx.init(params), params)


def _stack_vs_slices(make, steps_grads):
  """Runs `make(logical_axes)` on a [2, 4, 6] stack with a "layers" axis and on its two slices as
  separate leaves (the reference's per-tensor view); returns both final params."""
  rng = np.random.default_rng(0)
  stack = jnp.asarray(rng.standard_normal((2, 4, 6)), jnp.float32)
  got, _ = run_optimizer(make({"s": ("layers", "embed", "mlp")}), {"s": stack}, [{"s": g} for g in steps_grads])
  want, _ = run_optimizer(
    make({"l0": ("embed", "mlp"), "l1": ("embed", "mlp")}),
    {"l0": stack[0], "l1": stack[1]},
    [{"l0": g[0], "l1": g[1]} for g in steps_grads],
  )
  return got["s"], jnp.stack([want["l0"], want["l1"]])


@pytest.mark.parametrize("name", ["c_adamw", "c_lion", "wrapper"])
def test_mask_normalised_per_layer_of_a_scanned_stack(name):
  """Layer 0's second gradient is small and flipped, so the momentum still points the old way
  (nothing agrees: clamp); layer 1's repeats (all agree: scale 1). One mean over the whole stack
  would scale layer 1 by 2."""
  g1 = np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)
  g2 = np.stack([-0.05 * g1[0], g1[1]])

  def make(axes):
    if name == "wrapper":
      return optim.cautious(optax.sgd(LR, momentum=0.9), logical_axes=axes)
    return optim.build(name, learning_rate=LR, weight_decay=WD, logical_axes=axes)

  got, want = _stack_vs_slices(make, [jnp.asarray(g1), jnp.asarray(g2)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
