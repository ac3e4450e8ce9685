"""jaxeff.quantize (jaxeff.quantization): a quantized tiny Llama matches the float one, shrinks, jits, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.models import Linear, Llama
from jaxeff.quantization import QuantizedEmbed, QuantizedLinear, quantize

CFG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)


def _model(scan=False, seed=0, **kw):
  return Llama(ModelConfig(**CFG, scan_layers=scan, **kw), rngs=nnx.Rngs(seed))


def _nbytes(model):
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def _rel_err(y, ref):
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("bits,group_size,tol", [(8, None, 0.03), (4, 64, 0.3)])
def test_quantized_logits_close_to_float(scan, bits, group_size, tol):
  model = _model(scan)
  ref = model(TOKENS)
  qmodel = quantize(model, bits=bits, group_size=group_size)
  y = nnx.jit(lambda m, t: m(t))(qmodel, TOKENS)
  assert y.shape == ref.shape and y.dtype == ref.dtype
  assert _rel_err(y, ref) < tol
  assert isinstance(model.lm_head, Linear)  # the original is left alone (copy=True)
  kinds = {type(m) for _, m in nnx.iter_modules(qmodel)}
  assert QuantizedLinear in kinds and isinstance(qmodel.lm_head, Linear)  # head float by default
  positions = jnp.broadcast_to(jnp.arange(8), TOKENS.shape)
  np.testing.assert_allclose(np.asarray(qmodel(TOKENS, positions)), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_everything_quantized_shrinks_parameter_bytes():
  model = _model(tie_embeddings=True)
  q8 = quantize(model, bits=8, include_embeddings=True)
  q4 = quantize(model, bits=4, group_size=64, include_embeddings=True)
  assert not any(isinstance(m, Linear) for _, m in nnx.iter_modules(q4))
  assert isinstance(q4.embed_tokens, QuantizedEmbed)
  assert _nbytes(q8) < 0.27 * _nbytes(model)  # int8 + per-channel f32 scales (+ f32 norms)
  assert _nbytes(q4) < 0.16 * _nbytes(model)  # 0.5 B + 4 B / 64 per weight
  ref = model(TOKENS)
  assert _rel_err(q8(TOKENS), ref) < 0.03  # tied head via the quantized table's attend


def test_quantized_variables_keep_logical_axes():
  q = quantize(_model(scan=True), bits=4, group_size=64)
  proj = q.layers.mlp.down_proj  # kernel [layers, mlp, embed]
  assert proj.qvalue.get_metadata()["out_sharding"] == ("layers", "mlp", "embed")
  assert proj.scale.get_metadata()["out_sharding"] == ("layers", None, "embed")
  assert proj.qvalue.shape == (2, 128, 128) and proj.scale.shape == (2, 4, 128)


@pytest.mark.parametrize("scan", [False, True])
def test_orbax_round_trip_gives_identical_logits(tmp_path, scan):
  qmodel = quantize(_model(scan), bits=4, group_size=64)
  expected = qmodel(TOKENS)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "q", nnx.state(qmodel))
  ckptr.wait_until_finished()
  fresh = quantize(_model(scan, seed=7), bits=4, group_size=64)  # same structure, other weights
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh))
  nnx.update(fresh, ckptr.restore(tmp_path / "q", abstract))
  np.testing.assert_array_equal(np.asarray(fresh(TOKENS)), np.asarray(expected))


def _val_perplexity(model, batches):
  step = nnx.jit(lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b["inputs"]), b["targets"]).mean())
  return float(np.exp(np.mean([float(step(model, b)) for b in batches])))


def test_trained_model_perplexity_int8_within_1pct_int4_g128_within_5pct(tmp_path, shakespeare_path, capsys):
  """The issue's accuracy bar, on a briefly trained model (hidden 256, so group 128 is 2-6 groups)."""
  from jaxeff import data as data_lib
  from jaxeff import train as train_lib
  cfg = train_lib.load_config(None, [
      f"data.paths=[{shakespeare_path}]", "model.hidden_size=256", "model.intermediate_size=512",
      "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "batch_size=8", "seq_len=64",
      "steps=150", "log_every=50", "eval_every=150", "checkpoint_every=150", "progress=false",
      "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=10", f"output_dir={tmp_path}"])
  model = train_lib.train(cfg).model
  batches = data_lib.val_batches(cfg.data, seq_len=64, batch_size=16, max_batches=8)
  ppl = {"f32": _val_perplexity(model, batches),
         "int8": _val_perplexity(quantize(model, bits=8), batches),
         "int4 g128": _val_perplexity(quantize(model, bits=4, group_size=128), batches)}
  with capsys.disabled():
    print("\nvalidation perplexity:", {k: round(v, 4) for k, v in ppl.items()},
          {k: f"{v / ppl['f32'] - 1:+.2%}" for k, v in ppl.items()})
  assert ppl["f32"] < 12  # it learned something (bytes: uniform is 256)
  assert abs(ppl["int8"] / ppl["f32"] - 1) <= 0.01
  assert abs(ppl["int4 g128"] / ppl["f32"] - 1) <= 0.05
