"""jaxeff.optim API: build(), composition (chain, inject_hyperparams, MultiSteps), sharded ==
unsharded on 8 devices, bf16 states, checkpointable state, nnx logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import optimizer_runner
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import optim

LR = 1e-2
SHAPES = {"w": (32, 48), "stack": (2, 32, 48), "emb": (64, 32), "norm": (32,)}
AXES = {"w": ("embed", "mlp"), "stack": ("layers", "embed", "mlp"), "emb": ("vocab", "embed"), "norm": ("norm",)}
SPECS = {"w": P(None, "data"), "stack": P(None, None, "data"), "emb": P("data", None), "norm": P("data")}
NAMES = ["adamw", "c_adamw", "lion", "c_lion", "muon", "c_muon", "galore", "osd"]
EXTRA = {"galore": {"rank": 4, "update_proj_gap": 2}, "osd": {"rank": 4}}


def _kw(name):
  axes = {"logical_axes": AXES} if optim.spec(name).takes_logical_axes else {}
  return dict(EXTRA.get(name, {}), **axes)


def _tree(seed, scale=1.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


def _close(a, b, atol=2e-6):
  for k in SHAPES:
    np.testing.assert_allclose(
      np.asarray(a[k], np.float32), np.asarray(b[k], np.float32), atol=atol, rtol=1e-5, err_msg=k
    )


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_build_errors():
  with pytest.raises(ValueError, match="valid names: adamw, c_adamw, lion, c_lion, distributed_lion"):
    optim.build("sgdd", learning_rate=LR)
  with pytest.raises(ValueError, match="'betas'"):
    optim.build("c_adamw", learning_rate=LR, betas=(0.9, 0.99))
  # logical_axes is accepted everywhere and dropped where it has no use.
  assert isinstance(optim.build("adamw", learning_rate=LR, logical_axes=AXES), optax.GradientTransformation)
  assert set(optim.OPTIMIZERS) == set(NAMES) | {"distributed_lion"}


@pytest.mark.parametrize("name", NAMES)
def test_composition_and_sharding(name, mesh):
  params = _tree(0, 0.1)
  grads = [_tree(s) for s in range(1, 5)]
  sched = optax.cosine_decay_schedule(LR, 10)
  factory = optim.OPTIMIZERS[name].factory
  plain = optimizer_runner(factory(learning_rate=sched, **_kw(name)))
  want, _ = plain(params, grads[:2])

  # chain + inject_hyperparams (hyperparameters become state arrays) give the same trajectory.
  # rank sets state shapes, so it must be static for GaLore/OSD (ints are injected otherwise).
  static = ("rank",) if name in ("galore", "osd") else ()
  injected = optax.chain(
    optax.clip_by_global_norm(1e9),
    optax.inject_hyperparams(factory, static_args=static)(learning_rate=sched, **_kw(name)),
  )
  got, state = optimizer_runner(injected)(params, grads[:2])
  _close(got, want)
  assert float(state[1].hyperparams["learning_rate"]) == pytest.approx(float(sched(1)))

  # MultiSteps(k=2) over 4 micro-batches == 2 steps on the averaged gradients.
  avg = [
    jax.tree.map(lambda a, b: (a + b) / 2, grads[0], grads[1]),
    jax.tree.map(lambda a, b: (a + b) / 2, grads[2], grads[3]),
  ]
  ref, _ = plain(params, avg)
  got, _ = optimizer_runner(optax.MultiSteps(factory(learning_rate=sched, **_kw(name)), every_k_schedule=2))(
    params, grads
  )
  _close(got, ref, atol=1e-5)

  # Sharded params and grads on an 8-device mesh (NamedSharding, GSPMD) == unsharded.
  shard = lambda t: {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in t.items()}
  got, state = plain(shard(params), [shard(g) for g in grads[:2]])
  _close(got, want, atol=1e-5)
  assert got["w"].sharding.spec == SPECS["w"]


def test_traced_rank_has_clear_error():
  tx = optax.inject_hyperparams(optim.galore)(learning_rate=LR, rank=4)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.init)(_tree(0))


@pytest.mark.parametrize("name", ["c_adamw", "c_lion", "muon", "galore", "osd"])
def test_bf16_and_checkpointable_state(name):
  params = _tree(0, 0.1, jnp.bfloat16)
  tx = optim.build(name, learning_rate=LR, mu_dtype=jnp.bfloat16, **_kw(name))
  update = jax.jit(tx.update)
  state = tx.init(params)
  u, state = update(_tree(1, dtype=jnp.bfloat16), state, params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)  # a pytree of arrays only
  assert any(x.dtype == jnp.bfloat16 and x.ndim >= 2 for x in leaves)  # bf16 first moments
  # Checkpoint round trip through host numpy: same structure, same next step.
  restored = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  g2 = _tree(2, dtype=jnp.bfloat16)
  a, _ = update(g2, state, params)
  b, _ = update(g2, restored, params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_nnx_logical_axes():
  from flax import nnx

  class Tiny(nnx.Module):
    def __init__(self):
      mk = lambda s, axes: nnx.Param(jnp.ones(s) * 0.1, out_sharding=axes, eager_sharding=False)
      self.emb = mk((64, 32), ("vocab", "embed"))
      self.up = mk((32, 48), ("embed", "mlp"))
      self.stack = mk((2, 48, 32), ("layers", "mlp", "embed"))
      self.norm = mk((32,), ("norm",))

  model = Tiny()
  axes = optim.logical_axes_from_state(nnx.state(model, nnx.Param))
  tx = optim.muon(LR, logical_axes=axes)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  opt.update(model, grads)
  mu = opt.opt_state.inner_states["muon"].inner_state[0].mu
  leaves = jax.tree.leaves(mu)
  assert sorted(x.shape for x in leaves) == [(2, 48, 32), (32, 48)]  # emb and norm -> AdamW
  assert bool(jnp.all(jnp.isfinite(model.up[...])))


def test_specs_say_what_the_loop_must_do():
  per_device = [n for n, s in optim.OPTIMIZERS.items() if s.gradients == "per_device"]
  assert per_device == ["distributed_lion"]
  assert not optim.spec("distributed_lion").clip and optim.spec("distributed_lion").takes_mesh
  assert all(s.clip and not s.takes_mesh for n, s in optim.OPTIMIZERS.items() if n != "distributed_lion")
  assert {n for n, s in optim.OPTIMIZERS.items() if s.takes_logical_axes} == {
    "c_adamw",
    "c_lion",
    "muon",
    "c_muon",
    "galore",
    "osd",
  }
  with pytest.raises(ValueError, match="valid names"):
    optim.spec("sgdd")
  with pytest.raises(ValueError, match="gradients must be one of"):
    optim.OptimizerSpec(optax.sgd, gradients="sum")
