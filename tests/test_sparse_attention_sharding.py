"""sparse_attention on a device mesh: lowering for TPU (Mosaic) and CUDA (Triton) unsharded and
sharded on the 8 fake CPU devices, the interpret-mode op on a mesh against the unsharded op, and the
shard_kernel behaviour it relies on (kv heads tied to query heads are not a contraction)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_sparse_attention import _GRAD_CASES, _close, grad_case, value_and_grads

import pallas_kernels as pk
from jaxeff import sharding
from pallas_kernels.compat import lowering_for
from pallas_kernels.sharding import shard_kernel
from pallas_kernels.sparse_attention import BlockSizes

HEAD_AXES = {"b": ("data", "fsdp"), "h": "tensor", "g": "tensor"}


def test_shard_kernel_does_not_sum_kv_heads_tied_to_query_heads():
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  q = jnp.arange(4 * 4 * 8, dtype=jnp.float32).reshape(4, 4, 8, 1)
  k = 1000 * jnp.arange(4 * 2 * 8, dtype=jnp.float32).reshape(4, 2, 8, 1)
  local = lambda q, k: q + jnp.repeat(k, q.shape[1] // k.shape[1], axis=1)  # query head h reads kv head h // 2
  with jax.set_mesh(mesh):
    got = jax.jit(lambda q, k: shard_kernel(local, q, k, in_dims=("bhsd", "bgtd"), out_dims="bhsd", axes=HEAD_AXES))(
      q, k
    )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(local(q, k)))


# --- lowering without the hardware ---------------------------------------------------------------

_B, _H, _KVH, _S, _D = 8, 8, 4, 2048, 128


def _abstract_inputs(mesh):
  """bf16 q/k/v (+ sink logits, top-k ids), NamedSharding'd over batch and heads on `mesh`."""

  def sds(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=None if mesh is None else NamedSharding(mesh, spec))

  bh = P(("data", "fsdp"), "tensor")
  return (
    sds((_B, _H, _S, _D), jnp.bfloat16, bh),
    sds((_B, _KVH, _S, _D), jnp.bfloat16, bh),
    sds((_B, _KVH, _S, _D), jnp.bfloat16, bh),
    sds((_H,), jnp.float32, P("tensor")),
    sds((_B, _KVH, _S // 64, 4), jnp.int32, bh),
  )


@pytest.mark.parametrize(
  "mesh_shape", [None, {"data": 8}, {"data": 2, "tensor": 4}], ids=["unsharded", "data8", "data2-tensor4"]
)
@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
def test_forward_and_backward_lower_for_tpu_and_cuda(platform, impl, mesh_shape):
  mesh = None if mesh_shape is None else sharding.make_mesh(mesh_shape)
  # NSA-style: 64-key selection blocks on GPU; TPU lanes need 128-key blocks (then 2 query blocks
  # of 64 per selection row: block_q 64, block_kv 128).
  blocks = BlockSizes(64, 128) if impl == "tpu" else None

  def step(q, k, v, sink, idx):
    loss = lambda q, k, v, sink: pk.sparse_attention(
      q, k, v, window=512, sinks=4, sink_logits=sink, block_indices=idx, impl=impl, block_sizes=blocks
    ).sum()
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sink)

  args = _abstract_inputs(mesh)
  with jax.set_mesh(mesh) if mesh is not None else _nullcontext():
    with lowering_for(platform):
      text = jax.jit(step).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(f"@{call}(") == 3  # forward, dq, dk/dv
  # Each kernel sees the local shard of q: batch / data, heads / tensor.
  split = mesh_shape or {}
  local_q = f"{_B // split.get('data', 1)}x{_H // split.get('tensor', 1)}x{_S}x{_D}xbf16"
  kernel_args = re.findall(rf"@{re.escape(call)}\(([^)]*)\)[^\n]*: \(([^)]*)\)", text)
  assert kernel_args and all(local_q in types for _, types in kernel_args), kernel_args[:1]
  if mesh is not None:
    assert "sdy.manual_computation" in text or "shard_map" in text


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


# --- interpret mode on a mesh == unsharded -------------------------------------------------------


@pytest.mark.parametrize(
  "impl,mesh_shape",
  [("tpu", {"data": 2, "tensor": 2, "fsdp": 2}), ("cpu", {"data": 2, "tensor": 4})],
  ids=["tpu-data-fsdp-tensor", "cpu-data2-tensor4"],
)
def test_op_on_a_mesh_equals_unsharded_values_and_gradients(impl, mesh_shape):
  """Forward and all gradients (sink logits included) of the op split over batch and heads equal
  the unsharded op's. With tensor=4 the 2 kv heads do not divide: heads stay whole (replicated
  over tensor) and the sink-logit gradient must not be summed over it."""
  case = next(c for c in _GRAD_CASES if c[0] == impl)
  op, _, args, do = grad_case(*case)
  want = value_and_grads(op, args, do)  # the same program as test_gradients_match_reference
  mesh = sharding.make_mesh(mesh_shape)
  q, k, v, sink = args
  if mesh_shape.get("tensor", 1) <= 2:  # operands already split as a model would hold them
    q, k, v = (jax.device_put(x, NamedSharding(mesh, P("data", "tensor"))) for x in (q, k, v))
  with jax.set_mesh(mesh):
    got = value_and_grads(op, (q, k, v, sink), do)
  for name, g, w in zip(("out", "dq", "dk", "dv", "dsink"), got, want):
    _close(g, w, jnp.float32, name)
