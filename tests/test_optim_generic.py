"""optax's generic optimizer properties, run over every optimizer in `jaxeff.optim.OPTIMIZERS`.

The checks of optax's own alias_test.py / contrib/_common_test.py: convergence on the parabola,
Rosenbrock, matrix-parabola and mixed 1-D/2-D targets at optax's step counts and tolerances
(10k steps for alias-style optimizers, 30k for contrib-style ones, atol = rtol = 3e-2), no
recompilation on the second update, unknown extra keywords accepted and ignored (optax's
`with_extra_args_support` convention, e.g. `value=` for `reduce_on_plateau` in the same chain),
`inject_hyperparams` giving the same updates and state, updates in the parameters' dtype (f32
and bf16), and `optax.MultiSteps` emitting zeros on accumulation steps.

The four targets are separate leaves of one parameter tuple: every optimizer here acts per leaf
(per matrix), so the sum objective trains each target exactly as on its own, with one compile.
Distributed Lion takes per-worker gradients [N, ...]; it runs behind an adapter that hands every
worker the same gradient (chosen from the spec, `gradients == "per_device"`, not by name).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxeff import optim

# optax's kwargs for the same or the parent method (alias_test: adamw 1e-1, lion 1e-2 with wd
# 1e-4; contrib: muon 1e-2 with its default wd 0, galore 1e-2 at rank 8) and its step counts.
CASES = {
  "adamw": ({"learning_rate": 1e-1}, 10_000),
  "c_adamw": ({"learning_rate": 1e-1}, 10_000),
  "lion": ({"learning_rate": 1e-2, "weight_decay": 1e-4}, 10_000),
  "c_lion": ({"learning_rate": 1e-2, "weight_decay": 1e-4}, 10_000),
  "distributed_lion": ({"learning_rate": 1e-2, "weight_decay": 1e-4}, 10_000),
  "muon": ({"learning_rate": 1e-2, "weight_decay": 0.0}, 30_000),
  "c_muon": ({"learning_rate": 1e-2, "weight_decay": 0.0}, 30_000),
  "galore": ({"learning_rate": 1e-2, "rank": 8}, 30_000),
  "osd": ({"learning_rate": 1e-2, "rank": 8}, 30_000),
}
WRAPPER = "cautious(adam)"  # the generic wrapper, around optax.adam as optax tests its wrappers
WORKERS = 2  # Distributed Lion's mesh here: the first two devices
EXTRA = {"value": jnp.float32(1.0), "unexpected_extra_args_your_optimizer_doesnt_expect": 1}


def test_every_optimizer_is_covered():
  assert set(CASES) == set(optim.OPTIMIZERS)


def _same_grad_per_worker(tx, n):
  """Stacks the (mean) gradient n times, one copy per worker."""

  def update(g, state, params=None, **extra):
    return tx.update(jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n,) + x.shape), g), state, params, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _mesh():
  return jax.make_mesh((WORKERS,), ("data",), devices=jax.devices()[:WORKERS], axis_types=(jax.sharding.AxisType.Auto,))


def _factory(name):
  """(factory, kwargs, steps, adapt): `adapt` wraps a built transformation (None: no wrapping)."""
  if name == WRAPPER:
    return (lambda learning_rate: optim.cautious(optax.adam(learning_rate))), {"learning_rate": 1e-1}, 10_000, None
  spec = optim.spec(name)
  kwargs, steps = CASES[name]
  kwargs = dict(kwargs, mesh=_mesh()) if spec.takes_mesh else dict(kwargs)
  adapt = (lambda tx: _same_grad_per_worker(tx, WORKERS)) if spec.gradients == "per_device" else None
  return spec.factory, kwargs, steps, adapt


def _build(name):
  factory, kwargs, _, adapt = _factory(name)
  tx = factory(**kwargs)
  return adapt(tx) if adapt else tx


def _targets(dtype=jnp.float32):
  """optax's four targets (initial, final, objective), as one tuple of leaves."""
  init = (
    jnp.array([-1.0, 10.0, 1.0], dtype),
    jnp.zeros(2, dtype),
    jnp.zeros((2, 2), dtype),
    jnp.zeros(3, dtype),
    jnp.zeros((2, 2), dtype),
  )
  final = (
    jnp.array([1.0, -1.0, 1.0], dtype),
    jnp.array([1.0, 1.0], dtype),
    jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype),
    jnp.array([1.0, -1.0, 2.0], dtype),
    jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype),
  )

  def objective(p):
    parabola = jnp.sum((p[0] - final[0]) ** 2)
    rosenbrock = (1.0 - p[1][0]) ** 2 + 100.0 * (p[1][1] - p[1][0] ** 2) ** 2
    matrix = jnp.sum((p[2] - final[2]) ** 2)
    mixed = jnp.sum((p[3] - final[3]) ** 2) + jnp.sum((p[4] - final[4]) ** 2)
    return parabola + rosenbrock + matrix + mixed

  return init, final, objective


NAMES = list(CASES) + [WRAPPER]


@pytest.mark.parametrize("name", NAMES)
def test_converges_without_recompiling_and_accepts_extra_args(name):
  _, kwargs, steps, _ = _factory(name)
  tx = _build(name)
  params, final, objective = _targets()
  if "mesh" in kwargs:  # parameters live on the optimizer's mesh, as in training
    params = jax.device_put(params, jax.NamedSharding(kwargs["mesh"], jax.P()))
  traces = []

  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(objective)(params)
    updates, state = tx.update(grads, state, params, **dict(EXTRA, value=value))
    return (optax.apply_updates(params, updates), state), None

  @jax.jit
  def run(params, state):
    traces.append(1)  # runs at trace time only
    return jax.lax.scan(step, (params, state), length=steps // 2)[0]

  state = tx.init(params)
  params, state = run(params, state)
  params, state = run(params, state)  # the state an update returned: same types, no new trace
  assert len(traces) == 1, "a second call with the updated state recompiled"
  for got, want in zip(params, final):
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_dtype_and_multisteps(name):
  factory, kwargs, _, adapt = _factory(name)
  # optax: hyperparameters that set shapes or are not numbers stay static.
  static = [k for k in ("rank", "update_proj_gap", "mesh") if k in kwargs]
  injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
  plain = factory(**kwargs)
  if adapt:
    injected, plain = adapt(injected), adapt(plain)
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  u, s = jax.jit(plain.update)(grads, plain.init(params), params)
  ui, si = jax.jit(injected.update)(grads, injected.init(params), params)
  # f32 rounding of the same program, hyperparameters as constants or as inputs; Muon's five
  # Newton-Schulz iterations amplify it to ~1e-5 (XLA:CPU's classic emitters: 1.2e-5).
  rtol = 1e-4 if "muon" in name else 1e-5
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ui)):
    np.testing.assert_allclose(a, b, rtol=rtol)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(si.inner_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  # bf16 and f32 leaves in one tree (one compile), a vector and a matrix each, so matrix paths
  # (Muon, projections) are exercised too.
  params = {
    dt.__name__: {"v": jnp.array([1.0, 2.0], dt), "m": jnp.array([[1.0, 2.0], [3.0, -1.0]], dt)}
    for dt in (jnp.bfloat16, jnp.float32)
  }
  grads = jax.grad(lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p)))(params)
  tx = _build(name)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for x, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert x.dtype == p.dtype and bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
  acc = optax.MultiSteps(tx, every_k_schedule=4)
  u, _ = jax.jit(acc.update)(grads, acc.init(params), params)
  for x, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert x.dtype == p.dtype
    np.testing.assert_array_equal(x, jnp.zeros_like(x))
