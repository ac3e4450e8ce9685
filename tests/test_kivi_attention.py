"""pallas_kernels.kivi_attention.quantized_attention: the reference against NumPy, every
implementation (XLA path, TPU and GPU kernels in interpret mode) against the reference, the TPU
semantics simulator, lowering for TPU and CUDA without the hardware, and the op on an 8-device mesh.

Interpret mode is compile-bound here, so each case covers several features at once: ragged lengths
(0, a partial last block, all of T, one not on a group boundary), NaN garbage past the lengths,
and T over several blocks (small block_t)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import racy_kernel
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import sharding
from pallas_kernels.compat import lowering_for
from pallas_kernels.kivi_attention import IMPLS, gpu, quantized_attention, quantized_attention_reference
from pallas_kernels.kivi_attention import quantize as kq

T, D = 256, 64
LENGTHS = (0, 160, T, 100)  # nothing; ends inside a block; everything; mid-group


def _block_t(impl, group):
  """Small blocks: several per row. TPU: 3 x 32-token tiles (or groups), so T's last block is ragged
  (it reaches past T); GPU: capped by the group; XLA: a 64-token chunk."""
  return {"tpu": 3 * max(group, 32), "gpu": 32, "xla": 64}[impl]


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _quantize(q, k, v, bits, group, dtype):
  return (q.astype(dtype), *kq.quantize_keys(k, bits, group, dtype), *kq.quantize_values(v, bits, group, dtype))


def _cache(seed, b, kvh, m, bits, group, dtype):
  """q and a quantized cache of random keys/values (scales and minimums in `dtype`)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, kvh, m, D), np.float32)
  k = rng.standard_normal((b, kvh, T, D), np.float32) * (1 + 3 * (np.arange(D) % 7 == 0))  # outlier channels
  v = rng.standard_normal((b, kvh, T, D), np.float32)
  return _quantize(q, k.astype(np.float32), v, bits, group, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _poison(args, lengths, group):
  """NaN in every key scale/min group and value scale/min row wholly past each row's length."""
  q, kc, ks, km, vc, vs, vm = args
  lens = jnp.asarray(lengths)[:, None, None, None]
  dead_group = (jnp.arange(ks.shape[2]) * group)[None, None, :, None] >= lens
  dead_tok = jnp.arange(T)[None, None, :, None] >= lens
  nan = lambda x, dead: jnp.where(dead, jnp.nan, x).astype(x.dtype)
  return q, kc, nan(ks, dead_group), nan(km, dead_group), vc, nan(vs, dead_tok), nan(vm, dead_tok)


def _close(got, want, dtype, what):
  (out, lse), (w_out, w_lse) = (tuple(np.asarray(x, np.float32) for x in pair) for pair in (got, want))
  assert out.shape == w_out.shape and lse.shape == w_lse.shape, what
  assert np.isfinite(out).all(), what
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(w_lse), err_msg=what)
  # bf16: q, (q * scale) and the probabilities enter the dots rounded to bf16.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(out, w_out, rtol=tol, atol=tol * max(1.0, np.abs(w_out).max()), err_msg=what)
  live = np.isfinite(w_lse)
  np.testing.assert_allclose(lse[live], w_lse[live], rtol=tol, atol=tol, err_msg=what)


def _np_attention(q, kc, ks, km, vc, vs, vm, lengths, bits, group, sm_scale):
  """Softmax attention over the cache dequantized in NumPy (float64) from the storage format."""
  f = lambda x: np.asarray(x, np.float64)
  per = 8 // bits
  unpack = lambda c: np.concatenate([(np.asarray(c) >> (j * bits)) & (2**bits - 1) for j in range(per)], -1)
  k = unpack(kc) * np.repeat(f(ks), group, axis=2) + np.repeat(f(km), group, axis=2)
  vg = min(group, D)
  v = unpack(vc) * np.repeat(f(vs), vg, axis=3) + np.repeat(f(vm), vg, axis=3)
  b, kvh, m, _ = q.shape
  out, lse = np.zeros((b, kvh, m, D)), np.full((b, kvh, m), -np.inf)
  for i, n in enumerate(lengths):
    if n:
      s = np.einsum("hmd,htd->hmt", f(q[i]), k[i, :, :n]) * sm_scale
      top = s.max(-1, keepdims=True)
      p = np.exp(s - top)
      out[i] = np.einsum("hmt,htd->hmd", p, v[i, :, :n]) / p.sum(-1, keepdims=True)
      lse[i] = (top + np.log(p.sum(-1, keepdims=True)))[..., 0]
  return out, lse


def test_reference_matches_numpy_softmax_over_the_dequantized_cache():
  args = _cache(0, 4, 2, 3, 2, 32, jnp.float32)
  # The op's "reference" impl is quantized_attention_reference itself (one jit entry with the cases below).
  got = _op(args, jnp.array(LENGTHS, jnp.int32), impl="reference", bits=2, group=32, block_t=None, interpret=False)
  want = _np_attention(*args, LENGTHS, 2, 32, D**-0.5)
  _close(got, want, jnp.float32, "reference")
  assert (np.asarray(got[0])[0] == 0).all() and np.isneginf(np.asarray(got[1])[0]).all()


# (bits, dtype, M, group): M = 1 (one query head) and M > 1 (GQA group x chunk); group 16 puts two
# value groups in one 4-bit plane, group 64 a 2-bit plane inside one value group.
CASES = [(2, jnp.float32, 3, 32), (4, jnp.float32, 1, 16), (2, jnp.bfloat16, 1, 64), (4, jnp.bfloat16, 5, 32)]


@functools.partial(jax.jit, static_argnames=("impl", "bits", "group", "block_t", "interpret"))
def _op(args, lengths, *, impl, bits, group, block_t, interpret):
  return quantized_attention(
    *args, lengths, bits=bits, group=group, sm_scale=D**-0.5, impl=impl, block_t=block_t, interpret=interpret
  )


@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu"])
@pytest.mark.parametrize("bits,dtype,m,group", CASES, ids=[f"int{c[0]}-{jnp.dtype(c[1]).name}-m{c[2]}" for c in CASES])
def test_impl_matches_reference(impl, bits, dtype, m, group, monkeypatch):
  if impl == "gpu" and m == 1:  # 3 splits of several blocks each (by default 1 block per split at this size)
    monkeypatch.setattr(gpu, "TARGET_PROGRAMS", 24)
  args = _cache(bits * 10 + m, 4, 2, m, bits, group, dtype)
  lengths = jnp.array(LENGTHS, jnp.int32)
  kw = dict(bits=bits, group=group, interpret=impl != "xla")
  want = _op(args, lengths, impl="reference", bits=bits, group=group, block_t=None, interpret=False)
  got = _op(_poison(args, LENGTHS, group), lengths, impl=impl, block_t=_block_t(impl, group), **kw)
  _close(got, want, dtype, impl)
  out, lse = (np.asarray(x) for x in got)
  assert (out[0] == 0).all() and np.isneginf(lse[0]).all()  # lengths 0: zeros, -inf, no NaN


# --- TPU-semantics simulator ---------------------------------------------------------------------


@pytest.mark.slow
def test_tpu_kernel_in_tpu_simulator_finds_no_race(capfd):
  jax.block_until_ready(racy_kernel(jnp.ones((8, 128), jnp.float32)))
  assert "RACE DETECTED" in capfd.readouterr().out  # the detector works and its report reaches us
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=1)
  # 2 rows x 1 kv head: the parallel grid spreads over the 2 simulated cores; blocks 0-1 of row 0
  # run (the second masked), row 1 skips its second block.
  args = _cache(3, 2, 1, 3, 2, 32, jnp.float32)
  lengths = jnp.array([160, 64], jnp.int32)
  kw = dict(bits=2, group=32, sm_scale=D**-0.5)
  got = quantized_attention(*_poison(args, (160, 64), 32), lengths, **kw, impl="tpu", block_t=128, interpret=params)
  got = jax.block_until_ready(got)
  report = capfd.readouterr().out
  assert "RACE DETECTED" not in report, report[:2000]
  _close(got, jax.jit(functools.partial(quantized_attention_reference, **kw))(*args, lengths), jnp.float32, "sim")


# --- lowering without the hardware ---------------------------------------------------------------


def _abstract(b, kvh, m, t, d, bits, group, dtype, mesh=None):
  def sds(shape, dt, spec=P(("data", "fsdp"), "tensor")):
    return jax.ShapeDtypeStruct(shape, dt, sharding=None if mesh is None else NamedSharding(mesh, spec))

  codes = sds((b, kvh, t, d * bits // 8), jnp.uint8)
  key_scale = sds((b, kvh, t // group, d), dtype)
  value_scale = sds((b, kvh, t, d // min(group, d)), dtype)
  lengths = sds((b,), jnp.int32, P(("data", "fsdp")))
  return sds((b, kvh, m, d), dtype), codes, key_scale, key_scale, codes, value_scale, value_scale, lengths


def _lower(platform, impl, args, bits, group, mesh=None):
  f = functools.partial(quantized_attention, bits=bits, group=group, sm_scale=0.1, impl=impl)
  with jax.set_mesh(mesh) if mesh is not None else _nullcontext(), lowering_for(platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


LOWERING = [(64, 3, 2, jnp.bfloat16), (128, 8, 4, jnp.bfloat16), (128, 3, 2, jnp.float32), (64, 8, 4, jnp.float32)]


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("d,m,bits,dtype", LOWERING, ids=[f"d{c[0]}-m{c[1]}-int{c[2]}" for c in LOWERING])
def test_lowers_for_tpu_and_cuda_at_decode_shapes(platform, impl, d, m, bits, dtype):
  text = _lower(platform, impl, _abstract(8, 8, m, 4096, d, bits, 32, dtype), bits, 32)
  call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(f"@{call}(") == 1


# --- on a device mesh ----------------------------------------------------------------------------


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
def test_lowers_per_shard_on_a_mesh(platform, impl):
  """Mosaic refuses automatic partitioning: the op must run its kernel in shard_map, on local blocks."""
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  text = _lower(platform, impl, _abstract(8, 8, 4, 4096, 128, 2, 32, jnp.bfloat16, mesh), 2, 32, mesh)
  call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(f"@{call}(") == 1
  assert "sdy.manual_computation" in text or "shard_map" in text
  operand_types = re.findall(rf"@{re.escape(call)}\([^)]*\)[^\n]*: \(([^)]*)\)", text)
  assert operand_types and "4x2x4096x32xui8" in operand_types[0], operand_types[:1]  # batch / 2, heads / 4


@pytest.mark.parametrize("impl", ["xla", "tpu"])
def test_op_on_a_mesh_equals_one_device(impl):
  """Split over batch (data=4) and kv heads (tensor=2); the one-device program is the first of CASES'
  (the same jit entry as test_impl_matches_reference)."""
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  bits, dtype, m, group = CASES[0]
  args = _poison(_cache(bits * 10 + m, 4, 2, m, bits, group, dtype), LENGTHS, group)
  lengths = jnp.array(LENGTHS, jnp.int32)
  kw = dict(impl=impl, bits=bits, group=group, block_t=_block_t(impl, group), interpret=impl == "tpu")
  want = _op(args, lengths, **kw)
  split = NamedSharding(mesh, P("data", "tensor"))
  sharded = tuple(jax.device_put(a, split) for a in args)
  with jax.set_mesh(mesh):
    got = _op(sharded, jax.device_put(lengths, NamedSharding(mesh, P("data"))), **kw)
  assert got[0].sharding.spec[:2] == ("data", "tensor")  # computed in place, not gathered
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# --- errors --------------------------------------------------------------------------------------


def _bad(**change):
  args = dict(zip(("q", "kc", "ks", "km", "vc", "vs", "vm"), _cache(0, 2, 2, 3, 2, 32, jnp.float32)))
  args["lengths"] = jnp.array([64, 32], jnp.int32)
  kw = dict(bits=2, group=32, sm_scale=0.1)
  for name, value in change.items():
    (args if name in args else kw)[name] = value
  names = ("q", "kc", "ks", "km", "vc", "vs", "vm", "lengths")
  return lambda: quantized_attention(*(args[n] for n in names), **kw)


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(q=jnp.zeros((2, 2, 64))), "q must be floating"),
    (dict(bits=3), "bits must be one of"),
    (dict(kc=jnp.zeros((2, 2, T, 8), jnp.uint8)), r"k_codes must be \[2, 2, T, 16\]"),
    (dict(kc=jnp.zeros((2, 2, T, 16), jnp.int8)), "must be uint8"),
    (dict(vc=jnp.zeros((2, 2, 128, 16), jnp.uint8)), "v_codes must have"),
    (dict(ks=jnp.zeros((2, 2, 4, D))), "k_scale and k_min must be"),
    (dict(vm=jnp.zeros((2, 2, T, 1))), "v_scale and v_min must be"),
    (dict(km=jnp.zeros((2, 2, T // 32, D), jnp.bfloat16)), "share one floating dtype"),
    (dict(lengths=jnp.zeros((2,))), "lengths must be integers"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(impl="tpu", block_t=48), "TPU block_t must be a multiple of 32"),
    (dict(impl="gpu", block_t=24), "GPU block_t must be a power of two"),
  ],
)
def test_bad_inputs_raise(change, match):
  with pytest.raises(ValueError, match=match):
    _bad(**change)()


def test_gpu_refuses_planes_narrower_than_a_triton_dot():
  codes = jnp.zeros((1, 1, 64, 8), jnp.uint8)  # D=32 at 2 bits: 8-byte planes
  ks, vs = jnp.zeros((1, 1, 2, 32)), jnp.zeros((1, 1, 64, 1))
  with pytest.raises(ValueError, match="power of two >= 16"):
    quantized_attention(
      jnp.zeros((1, 1, 2, 32)),
      codes,
      ks,
      ks,
      codes,
      vs,
      vs,
      jnp.array([64]),
      bits=2,
      group=32,
      sm_scale=0.1,
      impl="gpu",
    )


def test_impls_are_exported():
  assert IMPLS == ("tpu", "gpu", "xla", "reference")
