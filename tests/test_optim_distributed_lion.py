"""Distributed Lion on 8 CPU devices vs a NumPy simulation of 8 workers; collective bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import optim
from jaxeff.hlo import collectives, wire_bytes

LR, WD, STEPS = 1e-2, 0.1, 4
SHAPES = {"w": (32, 48), "b": (48,)}


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _local_grads(seed, n=8, unseen_rows=False):
  rng = np.random.default_rng(seed)
  g = {k: rng.standard_normal((n,) + s).astype(np.float32) for k, s in SHAPES.items()}
  if unseen_rows:  # like embedding rows absent from a worker's batch: exact zeros, varying by worker
    for i in range(n):
      g["w"][i, rng.random(SHAPES["w"][0]) < 0.3] = 0.0
  return g


def np_distributed_lion(params, grads_per_step, vote, b1=0.9, b2=0.99):
  """Paper's rule: worker i: d_i = sign(b1 m_i + (1-b1) g_i), m_i = b2 m_i + (1-b2) g_i;
  D = sign(sum_i d_i) or mean_i d_i; p -= lr (D + wd p)."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  n = len(next(iter(grads_per_step[0].values())))  # workers
  m = {k: np.zeros((n,) + v.shape) for k, v in p.items()}
  for g in grads_per_step:
    for k in p:
      d = np.sign(b1 * m[k] + (1 - b1) * g[k])  # [8, ...], one row per worker
      m[k] = b2 * m[k] + (1 - b2) * g[k]
      big_d = np.sign(d.sum(0)) if vote == "majority" else d.mean(0)
      p[k] = p[k] - LR * (big_d + WD * p[k])
  return p


def _shard(mesh, tree, spec):
  return jax.device_put(tree, NamedSharding(mesh, spec))


@pytest.mark.parametrize("vote", ["majority", "average"])
def test_matches_numpy_simulation(mesh, vote):
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [_local_grads(s) for s in range(1, STEPS + 1)]
  tx = optim.distributed_lion(LR, weight_decay=WD, mesh=mesh, vote=vote)
  state = tx.init(params)
  assert state[0].mu["w"].shape == (8, 32, 48)
  assert state[0].mu["w"].sharding.spec[0] == "data"  # per-device momentum, never averaged
  update = jax.jit(tx.update)
  p = params
  for g in grads:
    u, state = update(_shard(mesh, g, P("data")), state, p)
    p = optax.apply_updates(p, u)
  want = np_distributed_lion(params, grads, vote)
  if vote == "majority":  # 8 workers: ties happen and must give 0
    d = np.sign(np.sign(0.1 * grads[0]["w"]).sum(0))
    assert (d == 0).any()
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Each device's momentum is its own EMA of its local gradients.
  np.testing.assert_allclose(
    state[0].mu["w"][3],
    sum(0.01 * 0.99 ** (STEPS - 1 - i) * g["w"][3] for i, g in enumerate(grads)),
    rtol=1e-5,
    atol=1e-7,
  )


def test_zero_grads_only_decay(mesh):
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  tx = optim.distributed_lion(LR, weight_decay=WD, mesh=mesh)
  zeros = {k: jnp.zeros((8,) + s) for k, s in SHAPES.items()}
  u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  for k in params:  # sign(0) = 0 on every worker -> D = 0
    np.testing.assert_allclose(u[k], -LR * WD * params[k], rtol=1e-6)


def test_wrong_grad_shape_raises(mesh):
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  tx = optim.distributed_lion(LR, mesh=mesh)
  with pytest.raises(ValueError, match="stacked"):
    tx.update(params, tx.init(params), params)


def _loss(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def test_train_step_collective_bytes(mesh):
  """Compiled HLO of a full step: only bit-packed collectives, >= 16x fewer bytes than the
  f32 gradient all-reduce of plain data parallelism."""
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  batch = _shard(
    mesh,
    (jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)),
    P("data"),
  )
  n_params = sum(int(np.prod(s)) for s in SHAPES.values())
  tx = optim.distributed_lion(LR, mesh=mesh)
  state = tx.init(params)

  def dlion_step(params, state, batch):
    grads = optim.local_grads(jax.grad(_loss), params, batch, mesh=mesh)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def dp_step(params, batch):  # plain data parallelism: GSPMD all-reduces the f32 gradient
    return jax.tree.map(lambda p, g: p - LR * g, params, jax.grad(_loss)(params, batch))

  ours = collectives(jax.jit(dlion_step).lower(params, state, batch).compile().as_text())
  base = collectives(jax.jit(dp_step).lower(params, batch).compile().as_text())
  assert {c.kind for c in ours} == {"all-to-all", "all-gather"}, [c.line for c in ours]
  assert all("u32" in c.line.split("=")[1].split("all-")[0] for c in ours)  # packed words only
  base_bytes = sum(c.operand_bytes for c in base if c.kind == "all-reduce")
  assert base_bytes >= 4 * n_params  # the f32 gradient
  our_bytes = sum(c.operand_bytes for c in ours)
  ratio = base_bytes / our_bytes
  wire_ratio = sum(wire_bytes(c.kind, c.operand_bytes, 8) for c in base) / sum(
    wire_bytes(c.kind, c.operand_bytes, 8) for c in ours
  )
  print(
    f"\ncollective operand bytes/step: f32 all-reduce {base_bytes}, distributed lion {our_bytes} "
    f"({ratio:.1f}x fewer); per-device wire model {wire_ratio:.1f}x fewer"
  )
  assert ratio >= 16 and wire_ratio >= 16
  # And the step trains: the loss goes down.
  step = jax.jit(dlion_step)
  l0 = _loss(params, batch)
  for _ in range(5):
    params, state = step(params, state, batch)
  assert _loss(params, batch) < l0


def test_inject_hyperparams_and_chain(mesh):
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  g = _shard(mesh, _local_grads(0), P("data"))
  sched = optax.linear_schedule(LR, 0.0, 10)
  # A Mesh is callable, so inject_hyperparams must be told it is not a schedule.
  tx = optax.chain(
    optax.inject_hyperparams(optim.distributed_lion, static_args=("mesh",))(learning_rate=sched, mesh=mesh)
  )
  u, state = jax.jit(tx.update)(g, tx.init(params), params)
  ref = optim.distributed_lion(LR, mesh=mesh)
  u2, _ = jax.jit(ref.update)(g, ref.init(params), params)
  for k in params:
    np.testing.assert_allclose(u[k], u2[k], rtol=1e-6)
  assert float(state[0].hyperparams["learning_rate"]) == pytest.approx(LR) and int(state[0].count) == 1


def test_exact_zero_abstains(mesh):
  """One worker with an exact-zero local update, three positive, four negative: the paper's
  D = sign(sum_i sign(c_i)) = sign(3 - 4) = -1; the zero must not vote."""
  params = {"w": jnp.zeros((1, 160)), "b": jnp.zeros((160,))}
  signs = np.array([0, 1, 1, 1, -1, -1, -1, -1], np.float32)
  for zero_worker in (0, 1):  # even and odd worker index
    order = np.roll(signs, zero_worker)
    g = {
      "w": jnp.asarray(np.broadcast_to(order[:, None, None], (8, 1, 160))),
      "b": jnp.asarray(np.broadcast_to(order[:, None], (8, 160))),
    }
    tx = optim.distributed_lion(1.0, weight_decay=0.0, mesh=mesh)
    u, _ = jax.jit(tx.update)(_shard(mesh, g, P("data")), tx.init(params), params)
    np.testing.assert_array_equal(u["w"], 1.0)  # updates are -lr * D
    np.testing.assert_array_equal(u["b"], 1.0)
    # Average vote: mean_i sign(c_i) = (3 - 4) / 8, the zero counted as 0.
    tx = optim.distributed_lion(1.0, weight_decay=0.0, mesh=mesh, vote="average")
    u, _ = jax.jit(tx.update)(_shard(mesh, g, P("data")), tx.init(params), params)
    np.testing.assert_allclose(u["w"], 1 / 8)


@pytest.mark.parametrize("vote", ["majority", "average"])
def test_unseen_rows_match_numpy(mesh, vote):
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [_local_grads(s, unseen_rows=True) for s in range(1, STEPS + 1)]
  tx = optim.distributed_lion(LR, weight_decay=WD, mesh=mesh, vote=vote)
  state, update, p = tx.init(params), jax.jit(tx.update), params
  for g in grads:
    u, state = update(_shard(mesh, g, P("data")), state, p)
    p = optax.apply_updates(p, u)
  want = np_distributed_lion(params, grads, vote)
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_default_mesh():
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  # No mesh: every device on a "data" axis.
  tx = optim.build("distributed_lion", learning_rate=LR)
  assert tx.init(params).__getitem__(0).mu["w"].shape == (len(jax.devices()),) + SHAPES["w"]
  # Inside `jax.set_mesh`, that mesh (its "data" axis).
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    tx = optim.distributed_lion(LR)
  assert tx.init(params)[0].mu["w"].shape == (4,) + SHAPES["w"]
  with pytest.raises(ValueError, match="axis 'workers'"):
    optim.distributed_lion(LR, mesh=mesh, axis_name="workers")


@pytest.mark.parametrize("vote", ["majority", "average"])
def test_2d_data_fsdp_mesh(vote):
  """4 workers on "data", parameters sharded over "fsdp": same result as the 4-worker NumPy
  simulation; momentum stays per worker; the vote crosses "data" as packed words only."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  param_specs = {"w": P("fsdp"), "b": P()}
  grads = [_local_grads(s, n=4, unseen_rows=True) for s in range(1, STEPS + 1)]
  tx = optim.distributed_lion(LR, weight_decay=WD, mesh=mesh, vote=vote)
  with jax.set_mesh(mesh):
    p = {k: jax.device_put(v, NamedSharding(mesh, param_specs[k])) for k, v in params.items()}
    state = jax.jit(tx.init)(p)
    update = jax.jit(tx.update)
    for g in grads:
      g = {k: jax.device_put(v, NamedSharding(mesh, P("data", *param_specs[k]))) for k, v in g.items()}
      u, state = update(g, state, p)
      p = optax.apply_updates(p, u)
    hlo = update.lower(g, state, p).compile().as_text()
  assert state[0].mu["w"].shape == (4,) + SHAPES["w"] and state[0].mu["w"].sharding.spec[0] == "data"
  want = np_distributed_lion(params, grads, vote)
  for k in params:
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  over_data = [c for c in collectives(hlo) if c.group_size == 4]
  assert over_data and all(c.kind in ("all-to-all", "all-gather") for c in over_data)
  assert all("u32" in c.line.split("=")[1].split("all-")[0] for c in over_data)
