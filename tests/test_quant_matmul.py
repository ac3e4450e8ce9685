"""pallas_kernels.quant_matmul: the weight format, the kernels (interpret mode, TPU simulator), the
CPU path, lowering for TPU and CUDA on one device and on 8-device meshes, and sharded execution."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import racy_kernel
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from jaxeff import hlo, sharding
from pallas_kernels.compat import lowering_for
from pallas_kernels.quant_matmul import cpu as cpu_lib
from pallas_kernels.quant_matmul import tpu as tpu_lib
from pallas_kernels.quant_matmul import weights as weights_lib

# Small blocks so that shapes <= 512 still take several grid / loop steps with ragged edges.
SMALL_BLOCKS = {"tpu": (8, 128, 128), "gpu": (16, 32, 32, 4, 1), "cpu": 128}


def _data(m, k, n, dtype=jnp.float32, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  return x, w


def _row_scales(qw):
  """Each weight element's scale, [K, N]."""
  g = qw.group_size or qw.padded_in_features
  return jnp.repeat(qw.scale, g, axis=0)[: qw.in_features]


def _check_against_reference(y, x, qw, w, compute_dtype=None):
  """Tight vs dequantize-then-dot; loose vs the float matmul, by the exact rounding bound."""
  cdt = jnp.dtype(compute_dtype or x.dtype)
  ref = np.asarray(pk.quant_matmul_reference(x, qw, cdt), np.float32)
  y = np.asarray(y, np.float32)
  assert y.shape == ref.shape and np.isfinite(y).all()
  low = x.dtype != jnp.float32 or cdt != jnp.float32
  tight = 2e-2 if low else 1e-5  # bf16: the output's / the dot inputs' own rounding
  scale = np.abs(ref).max() + 1e-6
  np.testing.assert_allclose(y, ref, atol=tight * scale, rtol=tight)
  # |x @ w - x @ dequant(w)| <= |x| @ (scale / 2): each weight is off by at most half a step.
  x32 = np.asarray(x.astype(cdt), np.float32)
  bound = np.abs(x32) @ (np.asarray(_row_scales(qw)) / 2) + tight * scale
  assert (np.abs(y - x32 @ np.asarray(w)) <= bound * 1.001).all()


# --- the quantized-weight format -------------------------------------------------------------


@pytest.mark.parametrize(
  "bits,group_size,k", [(8, None, 100), (4, None, 101), (8, 32, 100), (4, 128, 384), (8, 96, 200)]
)
def test_quantize_round_trip_within_half_step(bits, group_size, k):
  _, w = _data(1, k, 48)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  assert qw.shape == (k, 48) and qw.qvalue.dtype == jnp.int8
  assert qw.qvalue.shape[0] == qw.padded_in_features * bits // 8
  assert qw.padded_in_features % (group_size or 1) == 0
  err = jnp.abs(w - pk.dequantize(qw))
  assert bool(jnp.all(err <= _row_scales(qw) / 2 * (1 + 1e-6)))
  assert int(jnp.abs(weights_lib.unpacked_qvalue(qw)).max()) <= weights_lib.QMAX[bits]


@pytest.mark.parametrize("kp,half", [(1024, 128), (576, 32)])
def test_int4_tile_layout_pairs_rows_of_a_tile(kp, half):
  """Storage row r of tile t: low nibble = logical row 2Ht + r, high nibble = 2Ht + H + r."""
  assert weights_lib.int4_half_rows(kp) == half
  q = np.asarray(jax.random.randint(jax.random.key(0), (kp, 8), -8, 8), np.int8)
  lo, hi = (np.asarray(p) for p in weights_lib.unpack_int4(weights_lib.pack_int4(jnp.asarray(q))))
  for r in (0, half - 1, kp // 2 - 1):
    t, i = divmod(r, half)
    np.testing.assert_array_equal(lo[r], q[2 * half * t + i])
    np.testing.assert_array_equal(hi[r], q[2 * half * t + half + i])
  xs = weights_lib.activation_planes(
    jnp.arange(kp, dtype=jnp.float32)[None],
    pk.QuantizedWeight(jnp.zeros((kp // 2, 8), jnp.int8), jnp.ones((1, 8)), bits=4, in_features=kp),
  )
  rows = np.arange(kp // 2)
  np.testing.assert_array_equal(np.asarray(xs[1][0]), [weights_lib.logical_row(r, 1, half) for r in rows])


def test_int4_group_size_must_be_a_power_of_two():
  with pytest.raises(ValueError, match="power of two"):
    pk.quantize_weight(jnp.ones((256, 8)), bits=4, group_size=96)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_zero_columns_and_groups_give_zeros_not_nan(bits, group_size):
  x, w = _data(3, 64, 16)
  w = w.at[:, 3].set(0).at[:32, 5].set(0)  # a zero column; a zero group in another
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  dq = pk.dequantize(qw)
  assert bool(jnp.all(jnp.isfinite(dq))) and float(jnp.abs(dq[:, 3]).max()) == 0
  if group_size:
    assert float(qw.scale[0, 5]) == 0 and float(jnp.abs(dq[:32, 5]).max()) == 0
  for impl in ("cpu", "tpu"):
    assert bool(jnp.all(jnp.isfinite(pk.quant_matmul(x, qw, impl=impl, interpret=impl == "tpu"))))


def test_quantize_is_jittable_and_vmappable_over_stacked_layers():
  w = jax.random.normal(jax.random.key(0), (3, 64, 32))
  qw = jax.jit(jax.vmap(lambda w: pk.quantize_weight(w, bits=4, group_size=32)))(w)
  assert qw.qvalue.shape == (3, 32, 32) and qw.scale.shape == (3, 2, 32) and qw.in_features == 64
  layer1 = jax.tree.map(lambda a: a[1], qw)
  np.testing.assert_array_equal(
    np.asarray(pk.dequantize(layer1)), np.asarray(pk.dequantize(pk.quantize_weight(w[1], bits=4, group_size=32)))
  )


# --- kernels in interpret mode and the CPU path vs the reference --------------------------------


@st.composite
def _cases(draw):
  return dict(
    bits=draw(st.sampled_from([8, 4])),
    group_size=draw(st.sampled_from([None, 32, 64, 128])),
    m=draw(st.sampled_from([1, 3, 16, 37])),
    k=draw(st.integers(1, 512)),
    n=draw(st.integers(1, 384)),
    dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
    small_blocks=draw(st.booleans()),
  )


_ODD_INT4_GROUPS = dict(bits=4, group_size=128, m=1, k=384, n=200, dtype=jnp.float32, small_blocks=True)


@pytest.mark.slow
@settings(deadline=None, max_examples=10, derandomize=True)
@given(_cases())
@example(_ODD_INT4_GROUPS)
def test_kernels_in_interpret_mode_match_reference(case):
  x, w = _data(case["m"], case["k"], case["n"], case["dtype"])
  qw = pk.quantize_weight(w, bits=case["bits"], group_size=case["group_size"])
  for impl in ("tpu", "gpu"):
    blocks = SMALL_BLOCKS[impl] if case["small_blocks"] else None
    _check_against_reference(pk.quant_matmul(x, qw, impl=impl, interpret=True, block_sizes=blocks), x, qw, w)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 256), (4, 256), (8, 512), (4, 512)])
def test_group_sizes_32_to_512(bits, group_size):
  """Blocks of several groups, and groups longer than a block (GPU: bk independent of the group).
  Groups of 32, 64 and 128 also run in the randomized tests above."""
  x, w = _data(2, 1024, 128, seed=group_size)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  blocks = {"tpu": (8, 128, 256), "gpu": (16, 64, 64, 4, 1), "cpu": None}
  for impl in ("tpu", "gpu", "cpu"):
    y = pk.quant_matmul(x, qw, impl=impl, interpret=impl != "cpu", block_sizes=blocks[impl])
    _check_against_reference(y, x, qw, w)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128)])
def test_prefill_blocks_run_in_interpret_mode(bits, group_size):
  """M > 256: the TPU prefill table entry (256-row blocks, a ragged last one), and GPU prefill."""
  x, w = _data(300, 256, 64)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  assert tpu_lib.shape_class(300, qw)[0] == "prefill"
  bm, _, _, _ = tpu_lib.choose_blocks(300, qw.qvalue.shape[0], 64, qw)
  assert bm == 256  # two M blocks, the second ragged
  for impl in ("tpu", "gpu"):
    _check_against_reference(pk.quant_matmul(x, qw, impl=impl, interpret=True), x, qw, w)


def test_bf16_compute_by_default_on_accelerators_f32_in_interpret_mode():
  assert pk.default_compute_dtype(jnp.float32, "gpu") == jnp.bfloat16
  assert pk.default_compute_dtype(jnp.float32, "tpu") == jnp.bfloat16
  assert pk.default_compute_dtype(jnp.float32, "gpu", interpret=True) == jnp.float32
  assert pk.default_compute_dtype(jnp.float32, "cpu") == jnp.float32
  x, w = _data(4, 128, 64)
  qw = pk.quantize_weight(w, bits=8, group_size=64)
  for impl in ("tpu", "gpu"):
    y = pk.quant_matmul(x, qw, impl=impl, interpret=True, compute_dtype=jnp.bfloat16)
    _check_against_reference(y, x, qw, w, compute_dtype=jnp.bfloat16)
    # and it differs from the f32 result by bf16 rounding of x, so the option is really applied
    assert float(jnp.abs(y - pk.quant_matmul(x, qw, impl=impl, interpret=True)).max()) > 0


@settings(deadline=None, max_examples=8, derandomize=True)
@given(_cases())
@example(_ODD_INT4_GROUPS)
def test_cpu_path_matches_reference(case):
  x, w = _data(case["m"], case["k"], case["n"], case["dtype"])
  qw = pk.quantize_weight(w, bits=case["bits"], group_size=case["group_size"])
  rows = cpu_lib.chunk_rows(case["m"], case["n"], qw) if not case["small_blocks"] else None
  if case["small_blocks"]:  # a few rows per step: many steps (and a ragged tail when per-channel)
    run = cpu_lib.group_run(qw)
    rows = 7 if run is None else math.gcd(run, 16)
    cpu_lib.check_rows_per_step(rows, qw)
  _check_against_reference(pk.quant_matmul(x, qw, impl="cpu", block_sizes=rows), x, qw, w)


@pytest.mark.parametrize(
  "bits,group_size,good,bad",
  [
    (8, 64, [192], [48, 96]),  # inside a group (the randomized tests), or whole groups
    (4, 64, [8], [48, 96]),  # int4: inside a group, or whole 128-row half tiles and groups
    (4, 512, [128], [384]),  # a group spans tiles: 256 storage rows; a divisor or a multiple
    (8, None, [], [0, -8]),
  ],
)
def test_cpu_rows_per_step_is_validated(bits, group_size, good, bad):
  """A step straddling two groups would use the wrong scale (93% error before this check)."""
  x, w = _data(2, 1024, 64)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  for rows in good:
    _check_against_reference(pk.quant_matmul(x, qw, impl="cpu", block_sizes=rows), x, qw, w)
  for rows in bad:
    with pytest.raises(ValueError, match="rows_per_step"):
      pk.quant_matmul(x, qw, impl="cpu", block_sizes=rows)


def test_default_impl_on_cpu_and_leading_batch_dims():
  x, w = _data(6, 96, 40)
  qw = pk.quantize_weight(w, bits=8)
  y = pk.quant_matmul(x.reshape(2, 3, 96), qw)  # CPU backend: the chunked CPU path
  assert y.shape == (2, 3, 40) and y.dtype == x.dtype
  np.testing.assert_allclose(
    np.asarray(y).reshape(6, 40), np.asarray(pk.quant_matmul_reference(x, qw)), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="does not match"):
    pk.quant_matmul(x[:, :95], qw)


def test_tpu_decode_blocks_move_mibs_with_all_of_k_and_set_vmem_limit():
  for k, n, bits, group in [(4096, 4096, 8, None), (4096, 14336, 4, 128), (14336, 4096, 8, None)]:
    qw = jax.eval_shape(lambda w: pk.quantize_weight(w, bits, group), jax.ShapeDtypeStruct((k, n), jnp.float32))
    ks = qw.qvalue.shape[0]
    bm, bn, bk, vmem = tpu_lib.choose_blocks(1, ks, n, qw)
    assert bm == 1 and ks % bk == 0 and bk * bn >= 1 << 20  # >= 1 MiB of weights per grid step
    assert bk == ks or bk * bn >= 2 << 20  # all of K where it fits the budget
    assert vmem >= tpu_lib.vmem_bytes(bm, bn, bk, qw, jnp.bfloat16, jnp.float32)
    assert vmem <= tpu_lib.VMEM_LIMITS[1]


# --- the TPU simulator: race detection and NaN-filled memory ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bits,group_size,m,k,n", [(4, 64, 20, 520, 200)])
def test_tpu_kernel_in_tpu_simulator_finds_no_race(capfd, bits, group_size, m, k, n):
  """TPU semantics on two simulated cores: race detection, NaN-filled uninitialized memory, edge
  blocks on every axis. The detector only prints, so the test reads what it printed, and a
  deliberately racy kernel shows that a race would be seen."""
  jax.block_until_ready(racy_kernel(jnp.ones((8, 128), jnp.float32)))
  assert "RACE DETECTED" in capfd.readouterr().out
  x, w = _data(m, k, n)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2)
  y = pk.quant_matmul(x, qw, impl="tpu", interpret=params, block_sizes=SMALL_BLOCKS["tpu"])
  _check_against_reference(jax.block_until_ready(y), x, qw, w)
  assert "RACE DETECTED" not in capfd.readouterr().out


# --- lowering for TPU (Mosaic) and GPU (Triton) without the hardware ----------------------------


def _abstract_weight(k, n, bits, group_size, sharding_=None):
  qw = jax.eval_shape(
    lambda w: pk.quantize_weight(w, bits=bits, group_size=group_size), jax.ShapeDtypeStruct((k, n), jnp.float32)
  )
  if sharding_ is None:
    return qw
  q_spec, s_spec = sharding_
  return pk.QuantizedWeight(
    jax.ShapeDtypeStruct(qw.qvalue.shape, qw.qvalue.dtype, sharding=q_spec),
    jax.ShapeDtypeStruct(qw.scale.shape, qw.scale.dtype, sharding=s_spec),
    bits=bits,
    group_size=group_size,
    in_features=k,
  )


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize(
  "bits,group_size,m,k,n",
  [
    (8, None, 1, 4096, 4096),  # decode, per-channel
    (4, 128, 16, 4096, 11008),  # int4 groups
    (4, None, 300, 1000, 300),  # prefill, ragged everything
    (8, 512, 1, 14336, 4096),  # long K, big groups
  ],
)
def test_kernels_lower_for_tpu_and_cuda(platform, impl, bits, group_size, m, k, n):
  qw = _abstract_weight(k, n, bits, group_size)
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  with lowering_for(platform):
    lowered = (
      jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl)).trace(x, qw).lower(lowering_platforms=(platform,))
    )
  text = lowered.as_text()
  assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)


MESHES = {
  "tensor": {"tensor": 8},
  "fsdp": {"fsdp": 8},
  "data": {"data": 8},
  "mixed": {"data": 2, "fsdp": 2, "tensor": 2},
}
# A column-parallel (embed -> mlp) and a row-parallel (mlp -> embed) layer, as jaxeff's rules shard them.
LAYERS = {"column": ("embed", "mlp"), "row": ("mlp", "embed")}


def _placed(mesh, logical, bits, group_size, k=2048, n=256, m=8, x_dtype=jnp.bfloat16, abstract=True):
  """x and a quantized weight with the shardings jaxeff's rules give them on `mesh`."""
  from jaxeff.quantization import matmul_axes

  spec = sharding.fit_spec(sharding.logical_to_spec(logical), (k, n), mesh)
  x_spec = sharding.fit_spec(sharding.logical_to_spec(("batch", logical[0])), (m, k), mesh)
  q_sh, s_sh = NamedSharding(mesh, spec), NamedSharding(mesh, P(None, spec[1]))
  if abstract:
    qw = _abstract_weight(k, n, bits, group_size, (q_sh, s_sh))
    x = jax.ShapeDtypeStruct((m, k), x_dtype, sharding=NamedSharding(mesh, x_spec))
  else:
    x, w = _data(m, k, n)
    qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
    qw = pk.QuantizedWeight(
      jax.device_put(qw.qvalue, q_sh), jax.device_put(qw.scale, s_sh), bits=bits, group_size=group_size, in_features=k
    )
    x = jax.device_put(x.astype(x_dtype), NamedSharding(mesh, x_spec))
  return x, qw, matmul_axes(logical)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_kernels_lower_for_tpu_and_cuda_on_8_device_meshes(mesh_name, layer):
  """Mosaic refuses to be partitioned automatically; the op's shard_map must make both lower,
  with the weight split exactly as it is stored (no weight moves)."""
  from jaxeff.quantization import kernel_takes_stored_split

  mesh = sharding.make_mesh(MESHES[mesh_name])
  for bits, group_size in [(8, None), (4, 128)]:
    x, qw, axes = _placed(mesh, LAYERS[layer], bits, group_size)
    with jax.set_mesh(mesh):
      assert kernel_takes_stored_split(x.shape, qw, LAYERS[layer], mesh)
      for platform, impl in [("tpu", "tpu"), ("cuda", "gpu")]:
        f = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl, axes=axes))
        with lowering_for(platform):
          text = f.trace(x, qw).lower(lowering_platforms=(platform,)).as_text()
        assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)
        assert "manual_computation" in text or "shard_map" in text


def test_unwrapped_mosaic_call_is_refused_on_a_mesh():
  """Why the op wraps itself: without `axes`, Mosaic lowering on a multi-device jit fails."""
  mesh = sharding.make_mesh(MESHES["tensor"])
  x, qw, _ = _placed(mesh, LAYERS["column"], 8, None)
  with jax.set_mesh(mesh), pytest.raises(Exception, match="cannot be automatically partitioned"):
    jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl="tpu")).trace(x, qw).lower(lowering_platforms=("tpu",))


@pytest.mark.parametrize(
  "mesh_name,layer,bits,group_size,split",
  [
    ("tensor", "row", 4, 128, {"k": ("tensor",)}),  # K split: f32 partial products summed (psum)
    ("fsdp", "column", 4, 128, {"k": ("fsdp",)}),  # int4 tiles and groups split with K
    ("mixed", "row", 8, 64, {"m": ("data",), "k": ("tensor",), "n": ("fsdp",)}),  # and rows of x split
  ],
)
def test_interpret_mode_on_a_mesh_equals_unsharded(mesh_name, layer, bits, group_size, split):
  """The Pallas TPU kernel (interpret mode) per shard == the same kernel on one device."""
  mesh = sharding.make_mesh(MESHES[mesh_name])
  x, qw, axes = _placed(mesh, LAYERS[layer], bits, group_size, k=2048, n=128, abstract=False)
  want = pk.quant_matmul(jax.device_get(x), jax.tree.map(jax.device_get, qw), impl="tpu", interpret=True)
  with jax.set_mesh(mesh):
    assert pk.partition(x.shape, qw, axes) == split
    got = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl="tpu", interpret=True, axes=axes))(x, qw)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_sharded_op_gathers_no_weight(layer):
  """Compiled for the 8 CPU devices (tensor-parallel): no all-gather; a row-parallel layer
  sums its partial products with one all-reduce of the [M, N] output."""
  mesh = sharding.make_mesh(MESHES["tensor"])
  x, qw, axes = _placed(mesh, LAYERS[layer], 8, None, m=1, x_dtype=jnp.float32, abstract=False)
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl="cpu", axes=axes)).lower(x, qw).compile()
    y = compiled(x, qw)
  hlo = compiled.as_text()
  assert "all-gather" not in hlo
  assert ("all-reduce" in hlo) == (layer == "row")
  want = pk.quant_matmul_reference(jax.device_get(x), jax.tree.map(jax.device_get, qw))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_int4_k_split_that_would_cut_a_tile_is_dropped():
  mesh = sharding.make_mesh(MESHES["tensor"])
  qw = _abstract_weight(512, 256, 4, None)  # 256 storage rows / 8 shards = 32 < the 128-row half tile
  with jax.set_mesh(mesh):
    assert pk.partition((1, 512), qw, {"k": "tensor"}) == {}
    assert pk.partition((1, 2048), _abstract_weight(2048, 256, 4, None), {"k": "tensor"}) == {"k": ("tensor",)}


def test_layers_the_kernel_cannot_split_fall_back_to_xla_without_moving_the_weight():
  """int4 row-parallel, 512 storage rows over 8 shards = 64 < the 128-row half tile: the quantized
  model's matmul takes the storage-order XLA path; collectives move only activation-sized data."""

  from jaxeff.quantization import kernel_takes_stored_split, quantized_matmul

  mesh = sharding.make_mesh(MESHES["tensor"])
  x, qw, _ = _placed(mesh, LAYERS["row"], 4, 128, k=1024, n=256, m=1, x_dtype=jnp.float32, abstract=False)
  with jax.set_mesh(mesh):
    assert not kernel_takes_stored_split(x.shape, qw, LAYERS["row"], mesh)
    compiled = jax.jit(lambda x, qw: quantized_matmul(x, qw, LAYERS["row"])).lower(x, qw).compile()
    y = compiled(x, qw)
  want = pk.quant_matmul_reference(jax.device_get(x), jax.tree.map(jax.device_get, qw))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-4)
  moved = [c.result_bytes for c in hlo.collectives(compiled.as_text())]
  assert moved and max(moved) <= 1024 * 4  # x's 1024 f32 values at most; the weight has 131072 bytes


def test_bench_quick_smoke(capsys):
  from jaxeff.bench import quant

  assert quant.main(["--quick", "--repeats", "1", "--matmul-only"]) == 0
  out = capsys.readouterr().out
  assert "| 512x512 | 1 | int4 |" in out and "copy bandwidth" in out
