"""pallas_kernels.kivi_attention.quantize against NumPy written from KIVI's definitions (Liu et al.
2024): asymmetric b-bit quantization, scale = (max - min) / (2^b - 1), code = round((x - min) /
scale); keys per channel over groups of `group` tokens, values per token over groups of channels;
codes packed planar along the head dim (byte i holds channels i, i + P, i + 2P, ... low bits first)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kivi_attention import quantize as kq


def np_quantize(x, bits, axis):
  """(codes, scale, min) with min/max over `axis`, in f32 as the definition reads."""
  x = x.astype(np.float32)
  lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
  scale = (hi - lo) / np.float32(2**bits - 1)
  with np.errstate(divide="ignore", invalid="ignore"):
    q = np.where(scale > 0, np.round((x - lo) / scale), 0)
  return np.clip(q, 0, 2**bits - 1).astype(np.uint8), scale, lo, (x - lo) / np.where(scale > 0, scale, 1)


def np_pack(codes, bits):
  per = 8 // bits
  p = codes.shape[-1] // per
  out = np.zeros(codes.shape[:-1] + (p,), np.uint8)
  for j in range(per):
    out |= (codes[..., j * p : (j + 1) * p] << (j * bits)).astype(np.uint8)
  return out


def np_keys(k, bits, group):
  *lead, t, d = k.shape
  codes, scale, lo, exact = np_quantize(k.reshape(*lead, t // group, group, d), bits, axis=-2)
  return codes.reshape(k.shape), scale[..., 0, :], lo[..., 0, :], exact.reshape(k.shape)


def np_values(v, bits, group):
  *lead, t, d = v.shape
  g = min(group, d)
  codes, scale, lo, exact = np_quantize(v.reshape(*lead, t, d // g, g), bits, axis=-1)
  return codes.reshape(v.shape), scale[..., 0], lo[..., 0], exact.reshape(v.shape)


@functools.partial(jax.jit, static_argnames=("bits", "group", "dtype"))
def _roundtrip(k, v, *, bits, group, dtype):
  kq_ = kq.quantize_keys(k, bits, group, dtype)
  vq_ = kq.quantize_values(v, bits, group, dtype)
  return kq_, vq_, kq.dequantize_keys(*kq_, bits, group), kq.dequantize_values(*vq_, bits, group)


def _cache(seed, shape):
  """Normal keys/values with an outlier channel (keys) and an outlier token (values), and one constant
  key group (channel 1, first 64 tokens) and one constant value token (token 2) to hit scale 0."""
  rng = np.random.default_rng(seed)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  k[..., 3] *= 20.0
  v[..., 5, :] *= 20.0
  k[..., :64, 1] = 1.7
  v[..., 2, :] = -0.3
  return k, v


def _check_codes(got_packed, want_codes, exact, bits, what):
  """Packed codes equal NumPy's, except where (x - min) / scale sits within 1e-4 of a rounding tie
  (one ulp of f32 division may round the other way there)."""
  got = np.asarray(kq.unpack(got_packed, bits))
  tie = np.abs(exact - np.floor(exact) - 0.5) < 1e-4
  assert (got == want_codes)[~tie].all(), what
  assert (np.abs(got.astype(int) - want_codes)[tie] <= 1).all(), what
  if not tie.any():
    np.testing.assert_array_equal(np.asarray(got_packed), np_pack(want_codes, bits), err_msg=what)


@pytest.mark.parametrize("bits,group,seed", [(2, 32, 0), (4, 32, 1), (2, 16, 2), (4, 64, 3), (8, 32, 4)])
def test_codes_scales_and_error_match_the_definition(bits, group, seed):
  k, v = _cache(seed, (2, 3, 128, 64))
  (kc, ks, km), (vc, vs, vm), kd, vd = _roundtrip(k, v, bits=bits, group=group, dtype=jnp.float32)
  for x, (codes, scale, lo, exact), (pc, s, m), deq, per_token, name in (
    (k, np_keys(k, bits, group), (kc, ks, km), kd, False, "keys"),
    (v, np_values(v, bits, group), (vc, vs, vm), vd, True, "values"),
  ):
    assert pc.dtype == jnp.uint8 and pc.shape == x.shape[:-1] + (x.shape[-1] * bits // 8,), name
    _check_codes(pc, codes, exact, bits, name)
    np.testing.assert_allclose(np.asarray(s), scale, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(m), lo, err_msg=name)
    # Dequantization error within half a step of the token's own (per-channel or per-token) scale.
    rep = np.repeat(scale, group, axis=-2) if not per_token else np.repeat(scale, min(group, x.shape[-1]), axis=-1)
    err = np.abs(np.asarray(deq) - x)
    assert np.isfinite(np.asarray(deq)).all(), name
    assert (err <= rep / 2 + 4 * np.finfo(np.float32).eps * (np.abs(x) + rep * 2**bits)).all(), (name, err.max())
  # Constant groups: scale exactly 0, every code 0, exact dequantization.
  assert (np.asarray(ks)[..., 0, 1] == 0).all() and (np.asarray(kd)[..., :64, 1] == np.float32(1.7)).all()
  assert (np.asarray(vs)[..., 2, :] == 0).all() and (np.asarray(vd)[..., 2, :] == np.float32(-0.3)).all()
  assert (np.asarray(kq.unpack(kc, bits))[..., :64, 1] == 0).all()


def test_bf16_scales_keep_the_codes_and_round_only_the_scales():
  k, v = _cache(5, (1, 2, 64, 32))
  (kc, ks, km), (vc, vs, vm), kd, vd = _roundtrip(k, v, bits=4, group=32, dtype=jnp.bfloat16)
  assert ks.dtype == km.dtype == vs.dtype == vm.dtype == jnp.bfloat16
  codes, scale, lo, exact = np_keys(k, 4, 32)
  _check_codes(kc, codes, exact, 4, "keys")
  want = np.repeat(np.asarray(ks, np.float32), 32, axis=-2) * codes + np.repeat(np.asarray(km, np.float32), 32, -2)
  np.testing.assert_allclose(np.asarray(kd), want, rtol=1e-6, atol=1e-6)
  # bf16 rounding of scale and min (2^-8 relative) on top of the half step.
  step = np.repeat(scale, 32, axis=-2)
  assert (np.abs(np.asarray(kd) - k) <= step / 2 + 2**-8 * (np.abs(k) + 16 * step) + 1e-6).all()
  assert np.isfinite(np.asarray(vd)).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, (3, 5, 32), dtype=np.uint8)
  packed = jax.jit(kq.pack, static_argnums=1)(codes, bits)
  np.testing.assert_array_equal(np.asarray(packed), np_pack(codes, bits))
  np.testing.assert_array_equal(np.asarray(jax.jit(kq.unpack, static_argnums=1)(packed, bits)), codes)


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: kq.quantize_keys(jnp.zeros((64, 16)), 3, 32), "bits must be one of"),
    (lambda: kq.quantize_values(jnp.zeros((64, 16)), 1, 32), "bits must be one of"),
    (lambda: kq.quantize_keys(jnp.zeros((64, 16)), 2, 0), "group must be >= 1"),
    (lambda: kq.quantize_keys(jnp.zeros((64, 6)), 2, 32), "head_dim 6 is not a multiple of 4"),
    (lambda: kq.quantize_values(jnp.zeros((64, 48)), 4, 32), "not a multiple of the value group"),
    (lambda: kq.quantize_keys(jnp.zeros((48, 16)), 2, 32), "whole groups of 32 tokens"),
  ],
)
def test_bad_formats_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()
