"""pallas_kernels.sharding.shard_kernel: kernels run per shard, split as their operands are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import sharding
from pallas_kernels.sharding import resolve_axes, shard_kernel

MATMUL_AXES = {"m": ("data", "fsdp"), "k": "fsdp", "n": "tensor"}


def _matmul(x, w):
  return shard_kernel(lambda a, b: a @ b, x, w, in_dims=("mk", "kn"), out_dims="mn", axes=MATMUL_AXES)


@pytest.mark.parametrize("shape", [{"data": 2, "fsdp": 2, "tensor": 2}, {"tensor": 8}, {"fsdp": 8}, {"data": 8}])
def test_matmul_on_a_mesh_equals_one_device(shape):
  mesh = sharding.make_mesh(shape)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  want = x @ w
  x_s = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None)))
  w_s = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
  with jax.set_mesh(mesh):
    got = jax.jit(_matmul)(x_s, w_s)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_row_parallel_sums_partial_products_and_gathers_no_weight():
  mesh = sharding.make_mesh({"tensor": 8})
  x = jnp.ones((1, 256), jnp.float32)
  w = jax.device_put(jnp.ones((256, 128), jnp.float32), NamedSharding(mesh, P("tensor", None)))
  f = lambda x, w: shard_kernel(lambda a, b: a @ b, x, w, in_dims=("mk", "kn"), out_dims="mn", axes={"k": "tensor"})
  with jax.set_mesh(mesh):
    compiled = jax.jit(f).lower(x, w).compile()
    y = compiled(x, w)
  np.testing.assert_allclose(np.asarray(y), 256.0)
  hlo = compiled.as_text()
  assert "all-reduce" in hlo
  assert "all-gather" not in hlo


def test_axes_that_do_not_divide_are_dropped_and_tied_letters_stay_aligned():
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  q = jnp.zeros((2, 8, 16, 4))  # [b, heads, s, d]
  k = jnp.zeros((2, 2, 16, 4))  # [b, kv heads, t, d]: 2 kv heads cannot split over tensor=4
  split = resolve_axes([q, k], ("bhsd", "bgtd"), {"b": "data", "h": "tensor", "g": "tensor"}, mesh)
  assert split == {"b": ("data",)}  # heads stay whole because kv heads must
  k4 = jnp.zeros((2, 4, 16, 4))
  split = resolve_axes([q, k4], ("bhsd", "bgtd"), {"b": "data", "h": "tensor", "g": "tensor"}, mesh)
  assert split == {"b": ("data",), "h": ("tensor",), "g": ("tensor",)}
  # One mesh axis splits one dimension of an operand: m takes fsdp first, k stays whole.
  mesh = sharding.make_mesh({"fsdp": 8})
  split = resolve_axes([jnp.zeros((8, 64)), jnp.zeros((64, 32))], ("mk", "kn"), MATMUL_AXES, mesh)
  assert split == {"m": ("fsdp",)}


def test_without_a_mesh_the_kernel_is_called_directly():
  calls = []

  def fn(a):
    calls.append(a.shape)
    return a * 2

  y = shard_kernel(fn, jnp.ones((4, 4)), in_dims=("ab",), out_dims="ab", axes={"a": "data"})
  assert calls == [(4, 4)] and float(y.sum()) == 32.0
