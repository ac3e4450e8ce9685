"""pallas_kernels.quant_matmul: the weight format, the kernels (interpret mode), the CPU path, lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels.quant_matmul import weights as weights_lib

# Small blocks so that shapes <= 512 still take several grid / loop steps with ragged edges.
SMALL_BLOCKS = {"tpu": (8, 128, 128), "gpu": (16, 32, 32, 4, 1), "cpu": 8}


def _data(m, k, n, dtype=jnp.float32, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
  return x, w


def _row_scales(qw):
  """Each weight element's scale, [K, N]."""
  g = qw.group_size or qw.padded_in_features
  return jnp.repeat(qw.scale, g, axis=0)[: qw.in_features]


def _check_against_reference(y, x, qw, w):
  """Tight vs dequantize-then-dot; loose vs the float matmul, by the exact rounding bound."""
  ref = np.asarray(pk.quant_matmul_reference(x, qw), np.float32)
  y = np.asarray(y, np.float32)
  assert y.shape == ref.shape and np.isfinite(y).all()
  tight = 1e-5 if x.dtype == jnp.float32 else 2e-2  # bf16: the output's own rounding
  scale = np.abs(ref).max() + 1e-6
  np.testing.assert_allclose(y, ref, atol=tight * scale, rtol=tight)
  # |x @ w - x @ dequant(w)| <= |x| @ (scale / 2): each weight is off by at most half a step.
  x32 = np.asarray(x, np.float32)
  bound = np.abs(x32) @ (np.asarray(_row_scales(qw)) / 2) + tight * scale
  assert (np.abs(y - x32 @ np.asarray(w)) <= bound * 1.001).all()


# --- the quantized-weight format -------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,k", [(8, None, 100), (4, None, 101), (8, 32, 100), (4, 128, 384)])
def test_quantize_round_trip_within_half_step(bits, group_size, k):
  _, w = _data(1, k, 48)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  assert qw.shape == (k, 48) and qw.qvalue.dtype == jnp.int8
  assert qw.qvalue.shape[0] == qw.padded_in_features * bits // 8
  err = jnp.abs(w - pk.dequantize(qw))
  assert bool(jnp.all(err <= _row_scales(qw) / 2 * (1 + 1e-6)))
  assert int(jnp.abs(weights_lib.unpacked_qvalue(qw)).max()) <= weights_lib.QMAX[bits]


def test_int4_pack_round_trip():
  q = jax.random.randint(jax.random.key(0), (64, 40), -8, 8).astype(jnp.int8)
  lo, hi = weights_lib.unpack_int4(weights_lib.pack_int4(q))
  np.testing.assert_array_equal(np.asarray(jnp.stack([lo, hi], 1).reshape(64, 40)), np.asarray(q))


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
  np.testing.assert_array_equal(np.asarray(pk.dequantize(layer1)),
                                np.asarray(pk.dequantize(pk.quantize_weight(w[1], bits=4, group_size=32))))


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


@settings(deadline=None, max_examples=10, derandomize=True)
@given(_cases())
@example(_ODD_INT4_GROUPS)
def test_kernels_in_interpret_mode_match_reference(case):
  x, w = _data(case["m"], case["k"], case["n"], case["dtype"])
  qw = pk.quantize_weight(w, bits=case["bits"], group_size=case["group_size"])
  for impl in ("tpu", "gpu"):
    blocks = SMALL_BLOCKS[impl] if case["small_blocks"] else None
    _check_against_reference(pk.quant_matmul(x, qw, impl=impl, interpret=True, block_sizes=blocks), x, qw, w)


@settings(deadline=None, max_examples=8, derandomize=True)
@given(_cases())
@example(_ODD_INT4_GROUPS)
def test_cpu_path_matches_reference(case):
  x, w = _data(case["m"], case["k"], case["n"], case["dtype"])
  qw = pk.quantize_weight(w, bits=case["bits"], group_size=case["group_size"])
  blocks = SMALL_BLOCKS["cpu"] if case["small_blocks"] else None
  _check_against_reference(pk.quant_matmul(x, qw, impl="cpu", block_sizes=blocks), x, qw, w)


def test_default_impl_on_cpu_and_leading_batch_dims():
  x, w = _data(6, 96, 40)
  qw = pk.quantize_weight(w, bits=8)
  y = pk.quant_matmul(x.reshape(2, 3, 96), qw)  # CPU backend: the chunked CPU path
  assert y.shape == (2, 3, 40) and y.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(y).reshape(6, 40), np.asarray(pk.quant_matmul_reference(x, qw)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not match"):
    pk.quant_matmul(x[:, :95], qw)


@pytest.mark.slow
@pytest.mark.parametrize("bits,group_size,m,k,n", [(8, None, 1, 300, 200), (4, 64, 20, 384, 256)])
def test_tpu_kernel_in_tpu_simulator(bits, group_size, m, k, n):
  """TPU semantics: race detection, NaN-filled uninitialized memory, edge blocks on every axis."""
  x, w = _data(m, k, n)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size)
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
  y = pk.quant_matmul(x, qw, impl="tpu", interpret=params, block_sizes=SMALL_BLOCKS["tpu"])
  _check_against_reference(y, x, qw, w)


# --- lowering for TPU (Mosaic) and GPU (Triton) without the hardware ----------------------------


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("bits,group_size,m,k,n", [
    (8, None, 1, 4096, 4096),  # decode, per-channel
    (4, 128, 16, 4096, 11008),  # int4 groups
    (4, None, 300, 1000, 300),  # prefill, ragged everything
    (8, 128, 1, 384, 256),  # odd group count
])
def test_kernels_lower_for_tpu_and_cuda(platform, impl, bits, group_size, m, k, n):
  qw = jax.eval_shape(lambda w: pk.quantize_weight(w, bits=bits, group_size=group_size),
                      jax.ShapeDtypeStruct((k, n), jnp.float32))
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  lowered = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl)).trace(x, qw).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)


def test_bench_quick_smoke(capsys):
  from jaxeff.bench import quant

  assert quant.main(["--quick", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  assert "| 512x512 | 1 | int4 |" in out and "copy bandwidth" in out
