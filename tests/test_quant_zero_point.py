"""Asymmetric (zero-point) quantization and GGUF weights served as they are stored.

The format against NumPy written from its definition; every quant_matmul implementation (the
Pallas kernels in interpret mode, the CPU path, XLA, the reference) with a zero point, on one
device and on meshes, and lowered for TPU and CUDA; `jaxeff.quantize(zero_point=True)`; GGUF Q8_0 /
Q4_0 / Q4_1 blocks loaded bit for bit; and the reason it all exists, SmolLM2's perplexity."""

import logging

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import smollm2
import tiny_gguf
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_quant_matmul import LAYERS, MESHES, SMALL_BLOCKS

import jaxeff
import pallas_kernels as pk
from jaxeff import gguf as jaxeff_gguf
from jaxeff import quantization, sharding
from jaxeff.bench import quant_accuracy
from pallas_kernels.compat import lowering_for
from pallas_kernels.quant_matmul import weights as weights_lib


def _numpy_asymmetric(w, bits, group_size):
  """Per group: m = min, s = (max - min) / (2^bits - 1), q = clip(round((w - m) / s)), w' = q s + m."""
  w = np.asarray(w, np.float64)
  k, n = w.shape
  g = group_size or k
  out = np.zeros_like(w)
  for start in range(0, k, g):
    block = w[start : start + g]
    lo, hi = block.min(0), block.max(0)
    s = (hi - lo) / (2**bits - 1)
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.round((block - lo) / safe), 0, 2**bits - 1)
    out[start : start + g] = q * s + lo
  return out


def _weight(k, n, seed=0):
  # An offset per column, as real weights have: symmetric grids waste levels on it.
  kw, ko = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kw, (k, n)) * 0.05 + jax.random.normal(ko, (1, n)) * 0.03


@pytest.mark.parametrize(
  "bits,group_size,k", [(4, 32, 576), (4, 128, 576), (4, 64, 100), (8, None, 576), (8, 32, 200), (4, None, 101)]
)
def test_zero_point_format_matches_numpy_and_uses_every_level(bits, group_size, k):
  w = _weight(k, 48)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size, zero_point=True)
  assert qw.zero_point and qw.minimum.shape == qw.scale.shape
  got = np.asarray(pk.dequantize(qw))
  want = _numpy_asymmetric(w, bits, group_size) if (group_size is None or k % group_size == 0) else None
  step = np.repeat(np.asarray(qw.scale), group_size or qw.padded_in_features, axis=0)[:k]
  if want is not None:  # f32 vs f64 may round an exact .5 the other way: one step, rarely
    off = np.abs(got - want)
    assert (off <= step * 1.001 + 1e-6).all() and (off > 1e-6).mean() < 0.005, (off > 1e-6).mean()
  # Within half a step of the float weight everywhere, with the group's own range.
  assert (np.abs(got - np.asarray(w)) <= step / 2 * 1.0001 + 1e-7).all()
  q = np.asarray(weights_lib.unpacked_qvalue(qw))[:k] + weights_lib.ZERO_SHIFT[bits]
  assert q.min() == 0 and q.max() == 2**bits - 1  # the full unsigned range
  if bits == 4:  # all 16 levels in use (symmetric int4 has 15)
    assert len(np.unique(q)) == 16


def test_zero_point_constant_and_zero_groups_are_exact():
  w = jnp.zeros((64, 3)).at[:, 1].set(0.37).at[:32, 2].set(-1.5).at[32:, 2].set(2.0)
  for bits in (8, 4):
    qw = pk.quantize_weight(w, bits=bits, group_size=32, zero_point=True)
    np.testing.assert_array_equal(np.asarray(pk.dequantize(qw)), np.asarray(w))


def test_zero_point_lowers_int4_error_on_offset_weights():
  w = _weight(512, 64, seed=3)
  err = {
    zp: float(jnp.sqrt(jnp.mean((pk.dequantize(pk.quantize_weight(w, bits=4, group_size=32, zero_point=zp)) - w) ** 2)))
    for zp in (False, True)
  }
  assert err[True] < 0.8 * err[False], err  # measured 0.72x here


@pytest.mark.parametrize(
  "bits,group_size,m,k,n",
  [(4, 32, 3, 576, 96), (4, 128, 1, 576, 40), (8, None, 5, 200, 72), (8, 64, 37, 300, 130), (4, None, 2, 101, 33)],
)
def test_every_impl_with_a_zero_point_matches_the_reference(bits, group_size, m, k, n):
  x = jax.random.normal(jax.random.key(1), (m, k))
  w = _weight(k, n, seed=2)
  qw = pk.quantize_weight(w, bits=bits, group_size=group_size, zero_point=True)
  want = np.asarray(pk.quant_matmul_reference(x, qw))
  # The reference is the dequantized weight, dotted: check it once against NumPy's.
  np.testing.assert_allclose(
    want, np.asarray(x, np.float64) @ np.asarray(pk.dequantize(qw), np.float64), rtol=1e-5, atol=1e-5
  )
  scale = np.abs(want).max()
  for impl, interpret, blocks in [
    ("tpu", True, SMALL_BLOCKS["tpu"]),
    ("gpu", True, SMALL_BLOCKS["gpu"]),
    ("tpu", True, None),
    ("cpu", False, None),
    ("xla", False, None),
  ]:
    got = np.asarray(pk.quant_matmul(x, qw, impl=impl, interpret=interpret, block_sizes=blocks))
    np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=1e-4, err_msg=f"{impl} {blocks}")
  # bf16 activations: the kernels' output dtype and tolerance follow x.
  got = pk.quant_matmul(x.astype(jnp.bfloat16), qw, impl="tpu", interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * scale, rtol=3e-2)


def _placed_zero_point(mesh, logical, bits, group_size, k=2048, n=128, m=8, abstract=False):
  from jaxeff.quantization import matmul_axes

  spec = sharding.fit_spec(sharding.logical_to_spec(logical), (k, n), mesh)
  x_spec = sharding.fit_spec(sharding.logical_to_spec(("batch", logical[0])), (m, k), mesh)
  q_sh, s_sh = NamedSharding(mesh, spec), NamedSharding(mesh, P(None, spec[1]))
  x = jax.random.normal(jax.random.key(0), (m, k))
  qw = pk.quantize_weight(_weight(k, n), bits=bits, group_size=group_size, zero_point=True)
  if abstract:
    qw = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      qw,
      pk.QuantizedWeight(q_sh, s_sh, bits=bits, group_size=group_size, in_features=k, minimum=s_sh),
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, x_spec))
  else:
    qw = pk.QuantizedWeight(
      jax.device_put(qw.qvalue, q_sh),
      jax.device_put(qw.scale, s_sh),
      bits=bits,
      group_size=group_size,
      in_features=k,
      minimum=jax.device_put(qw.minimum, s_sh),
    )
    x = jax.device_put(x, NamedSharding(mesh, x_spec))
  return x, qw, matmul_axes(logical)


@pytest.mark.parametrize(
  "mesh_name,layer,bits,group_size,split",
  [
    ("tensor", "row", 4, 32, {"k": ("tensor",)}),  # K split: zero-point terms summed with the partial products
    ("tensor", "column", 4, 128, {"n": ("tensor",)}),
    ("mixed", "row", 8, None, {"m": ("data",), "k": ("tensor",), "n": ("fsdp",)}),  # per-channel minimum, K split
  ],
)
def test_zero_point_on_a_mesh_equals_unsharded(mesh_name, layer, bits, group_size, split):
  mesh = sharding.make_mesh(MESHES[mesh_name])
  x, qw, axes = _placed_zero_point(mesh, LAYERS[layer], bits, group_size)
  host = jax.tree.map(jax.device_get, qw)
  want = pk.quant_matmul(jax.device_get(x), host, impl="reference")
  with jax.set_mesh(mesh):
    assert pk.partition(x.shape, qw, axes) == split
    for impl in ("tpu", "cpu"):
      got = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl, interpret=impl == "tpu", axes=axes))(x, qw)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_zero_point_kernels_lower_for_tpu_and_cuda_on_a_mesh(layer):
  mesh = sharding.make_mesh(MESHES["mixed"])
  x, qw, axes = _placed_zero_point(mesh, LAYERS[layer], 4, 32, k=2048, n=256, abstract=True)
  with jax.set_mesh(mesh):
    for platform, impl in [("tpu", "tpu"), ("cuda", "gpu")]:
      with lowering_for(platform):
        text = (
          jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl, axes=axes))
          .trace(x, qw)
          .lower(lowering_platforms=(platform,))
          .as_text()
        )
      assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)
      assert "manual_computation" in text or "shard_map" in text


def test_quantize_model_with_zero_point_and_checkpoint_round_trip(tmp_path):
  from jaxeff.config import ModelConfig
  from jaxeff.models import Llama

  cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  want = model(tokens)
  q = quantization.quantize(model, bits=4, group_size=32, zero_point=True)
  layer = q.layers[0].mlp.up_proj
  assert isinstance(layer, quantization.QuantizedLinear) and layer.weight().zero_point
  got = q(tokens)
  # Exactly the float model with each Linear's weight replaced by its dequantized zero-point weight.
  same = nnx.clone(model)
  for i in range(cfg.num_layers):
    for block, proj in [
      ("self_attn", "q_proj"),
      ("self_attn", "k_proj"),
      ("self_attn", "v_proj"),
      ("self_attn", "o_proj"),
      ("mlp", "gate_proj"),
      ("mlp", "up_proj"),
      ("mlp", "down_proj"),
    ]:
      src = getattr(getattr(q.layers[i], block), proj)
      getattr(getattr(same.layers[i], block), proj).kernel[...] = pk.dequantize(src.weight())
  np.testing.assert_allclose(np.asarray(got), np.asarray(same(tokens)), rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(got), np.asarray(want), atol=1e-4)  # it is quantized
  assert quantization.quantization_settings(q)["zero_point"] is True
  path = quantization.save_quantized(q, tmp_path / "q")
  np.testing.assert_array_equal(np.asarray(quantization.load_quantized(path)(tokens)), np.asarray(got))


# ---------------------------------------------------------------- GGUF blocks as they are stored


def _mixed_gguf(path):
  """A tiny llama GGUF whose matrices use Q8_0 (embedding), Q4_0 (attention), Q4_1 (MLP) and Q5_0
  (the last layer's down projection: a type not served as stored)."""
  model = tiny_gguf.hf_tiny("llama")
  T = gguf.GGMLQuantizationType

  def quant_for(name):
    if name == "token_embd.weight":
      return T.Q8_0
    if name == "blk.1.ffn_down.weight":
      return T.Q5_0
    return T.Q4_1 if ".ffn_" in name else T.Q4_0

  return tiny_gguf.write_gguf(path, model, "llama", quant=quant_for), model


def test_gguf_blocks_load_bit_exact_and_logits_match_float(tmp_path, caplog, monkeypatch):
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  path, _ = _mixed_gguf(tmp_path / "mixed.gguf")
  _, weights, others = jaxeff_gguf.quantized_weights(path)
  _, floats = jaxeff_gguf.read(path)  # the gguf package's own dequantization
  kinds = {name: (qw.bits, qw.zero_point) for name, qw in weights.items()}
  assert kinds["model.embed_tokens.weight"] == (8, False)
  assert kinds["model.layers.0.self_attn.q_proj.weight"] == (4, False)
  assert kinds["model.layers.0.mlp.up_proj.weight"] == (4, True)
  assert others == {"Q5_0": ["model.layers.1.mlp.down_proj.weight"]}
  for name, qw in weights.items():  # q/k included: the rotary row order is undone on the blocks
    np.testing.assert_array_equal(np.asarray(pk.dequantize(qw)), floats[name].T, err_msg=name)
  float_model, _ = jaxeff.load(path)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="jaxeff"):
    served, _ = jaxeff.load(path, quant="gguf")
  assert [r.getMessage() for r in caplog.records] == [
    "jaxeff.load: 1 Q5_0 tensor(s) dequantized to float (served as stored: Q8_0, Q4_0, Q4_1)"
  ]
  assert isinstance(served.layers[0].self_attn.q_proj, quantization.QuantizedLinear)
  assert isinstance(served.embed_tokens, quantization.QuantizedEmbed)
  assert not isinstance(served.layers[1].mlp.down_proj, quantization.QuantizedLinear)
  tokens = jnp.asarray([[1, 5, 9, 33, 200, 7, 7, 150]])
  want, got = np.asarray(float_model(tokens)), np.asarray(served(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------- SmolLM2: why zero points


@pytest.fixture(scope="module")
def smollm2_windows():
  path = smollm2.smollm2_path()
  text = quant_accuracy.default_text()
  if text is None:  # a clone without ../shared/data: the embedded default corpus (Python's own source)
    from jaxeff.data.sources import default_corpus_files

    text = "".join(p.read_text(errors="replace") for p in default_corpus_files(200_000))
  else:
    text = text.read_text()
  return path, quant_accuracy.token_windows(path, text, 2, 192)


@pytest.mark.slow
def test_smollm2_perplexity_zero_point_int4_keeps_quality_and_gguf_as_is_equals_float(smollm2_windows):
  """384 tokens are enough to see it (measured +23% / +40% on Shakespeare / the Python corpus):
  symmetric int4 g32 loses >10%, with a zero point <3%; the GGUF served as stored equals the
  float-loaded model. (int8's bar is test_quantize's trained model and the bench's 3072 tokens.)"""
  path, windows = smollm2_windows
  variants = [v for v in quant_accuracy.VARIANTS if v[0] in ("int4 g32, symmetric", "int4 g32, zero point")]
  table = {
    r["weights"]: r for r in quant_accuracy.rows(path, windows, variants=variants, llama_cpp=False, log=lambda *_: None)
  }
  vs = lambda label: table[label]["vs_float"]
  assert vs("jaxeff.quantize int4 g32, symmetric") > 0.10, table
  assert abs(vs("jaxeff.quantize int4 g32, zero point")) < 0.03, table
  assert abs(vs("GGUF as stored (Q4_1 Linears, Q8_0 embedding)")) < 1e-4, table
  # 4-bit Linears are ~1/6 of float's bytes (4 bits + f32 scale and minimum per 32 weights).
  ratio = (
    table["GGUF as stored (Q4_1 Linears, Q8_0 embedding)"]["linear_bytes"]
    / table["float (the GGUF dequantized to f32)"]["linear_bytes"]
  )
  assert 0.18 < ratio < 0.20, ratio


def test_generate_cli_serves_gguf_blocks_as_stored(tmp_path, monkeypatch):
  import io

  from jaxeff.generate import __main__ as generate_main

  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  path, _ = _mixed_gguf(tmp_path / "mixed.gguf")
  outputs, stats = {}, {}
  for mode in ([], ["--quant", "gguf"]):
    out, err = io.StringIO(), io.StringIO()
    argv = ["--hf", str(path), "--prompt", "Hello", "--max-new-tokens", "6", *mode]
    assert generate_main.main(argv, out=out, err=err) == 0, err.getvalue()
    outputs[bool(mode)], stats[bool(mode)] = out.getvalue(), err.getvalue().strip().splitlines()[-1]
  assert outputs[True] == outputs[False]  # the same weights: the same greedy text
  mib = {k: float(v.split("weights: ")[1].split(" MiB")[0]) for k, v in stats.items()}
  assert mib[True] < 0.5 * mib[False], stats  # 4/8-bit blocks read instead of f32
  for argv, message in (
    (["--checkpoint", str(tmp_path), "--quant", "gguf"], "give --hf FILE.gguf"),
    (["--hf", str(path), "--zero-point"], "--zero-point needs --quant int8 or int4"),
  ):
    err = io.StringIO()
    assert generate_main.main([*argv, "--prompt", "x"], out=io.StringIO(), err=err) == 2
    line = err.getvalue().strip()
    assert line.startswith("error: ") and message in line and "\n" not in line, line


def test_gguf_as_stored_on_a_mesh_equals_one_device(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  path, _ = _mixed_gguf(tmp_path / "mixed.gguf")
  tokens = jnp.asarray([[1, 5, 9, 33, 200, 7, 7, 150]] * 4)
  want = np.asarray(jaxeff.load(path, quant="gguf")[0](tokens))
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  model, _ = jaxeff.load(path, quant="gguf", mesh=mesh)
  qvalue = model.layers[0].mlp.up_proj.qvalue[...]
  assert not qvalue.sharding.is_fully_replicated  # placed by its logical axes, not copied whole
  with jax.set_mesh(mesh):
    got = nnx.jit(lambda m, t: m(t))(model, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
