"""HF interop: tiny random transformers models -> jaxeff logits match (f32, <= 1e-4), and back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxeff.hf
from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.models import Llama

TINY = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=64,
  rms_norm_eps=1e-6,
)
CASES = {
  "llama_gqa_llama3_rope": (
    transformers.LlamaConfig,
    dict(
      num_key_value_heads=2,
      rope_theta=500000.0,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
      },
    ),
  ),
  "llama_tied_mha": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
  "llama_linear_rope_headdim": (
    transformers.LlamaConfig,
    dict(num_key_value_heads=1, head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0}),
  ),
  "mistral_window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=5)),
  "qwen2_bias_tied": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def _hf_model(case, seed=0):
  cls, extra = CASES[case]
  torch.manual_seed(seed)
  cfg = cls(**TINY, **extra)
  cfg._attn_implementation = "eager"
  model_cls = {
    transformers.LlamaConfig: transformers.LlamaForCausalLM,
    transformers.MistralConfig: transformers.MistralForCausalLM,
    transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
  }[cls]
  model = model_cls(cfg).eval()
  with torch.no_grad():  # random (not zero) biases so the bias mapping is exercised
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_matches_transformers(case, tmp_path):
  hf = _hf_model(case)
  hf.save_pretrained(tmp_path / "hf")
  model, cfg = jaxeff.hf.load(tmp_path / "hf")
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  ref = _hf_logits(hf, TOKENS)
  assert ours.shape == ref.shape == (2, 12, 96)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  assert np.abs(ref).max() > 0.05  # logits are not trivially ~0


@pytest.mark.parametrize("case", ["llama_gqa_llama3_rope", "qwen2_bias_tied", "mistral_window"])
def test_export_roundtrip_through_transformers(case, tmp_path):
  hf = _hf_model(case, seed=1)
  hf.save_pretrained(tmp_path / "hf")
  model, cfg = jaxeff.hf.load(tmp_path / "hf", scan_layers=True)  # scanned stacks unstack on export
  jaxeff.hf.save(model, cfg, tmp_path / "out")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(reloaded) is type(hf)
  np.testing.assert_allclose(_hf_logits(reloaded, TOKENS), np.asarray(model(jnp.asarray(TOKENS))), atol=1e-4, rtol=0)


def test_save_from_fresh_model_loads_in_transformers(tmp_path):
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
  model = Llama(cfg, rngs=nnx.Rngs(3))
  jaxeff.hf.save(model, cfg, tmp_path / "out")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_allclose(
    _hf_logits(hf, TOKENS % 64), np.asarray(model(jnp.asarray(TOKENS % 64))), atol=1e-4, rtol=0
  )
  with pytest.raises(jaxeff.hf.HFError, match="not empty"):
    jaxeff.hf.save(model, cfg, tmp_path / "out")  # never silently overwritten


def test_sharded_index_and_mesh(tmp_path):
  hf = _hf_model("llama_gqa_llama3_rope")
  hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  model, _ = jaxeff.hf.load(tmp_path / "hf", mesh=mesh)
  spec = model.layers[0].mlp.gate_proj.kernel[...].sharding.spec
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  with jax.set_mesh(mesh):
    ours = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input


def test_missing_config(tmp_path):
  with pytest.raises(jaxeff.hf.HFError, match="no config.json"):
    jaxeff.hf.load(tmp_path)


def test_missing_directory(tmp_path):
  with pytest.raises(jaxeff.hf.HFError, match="not found"):
    jaxeff.hf.load(tmp_path / "nope")


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  with pytest.raises(jaxeff.hf.HFError, match="unsupported architecture.*GPT2LMHeadModel"):
    jaxeff.hf.load(tmp_path)


def _saved(tmp_path):
  hf = _hf_model("llama_gqa_llama3_rope")
  hf.save_pretrained(tmp_path)
  from safetensors.numpy import load_file

  return load_file(str(tmp_path / "model.safetensors"))


def test_missing_tensor(tmp_path):
  from safetensors.numpy import save_file

  tensors = _saved(tmp_path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(jaxeff.hf.HFError, match="model.layers.1.mlp.up_proj.weight.*missing"):
    jaxeff.hf.load(tmp_path)


def test_misshaped_tensor(tmp_path):
  from safetensors.numpy import save_file

  tensors = _saved(tmp_path)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(jaxeff.hf.HFError, match=r"k_proj.weight.*shape \(8, 32\), expected \(16, 32\)"):
    jaxeff.hf.load(tmp_path)


def test_no_weights(tmp_path):
  _hf_model("llama_tied_mha").config.save_pretrained(tmp_path)
  with pytest.raises(jaxeff.hf.HFError, match="no \\*.safetensors"):
    jaxeff.hf.load(tmp_path)


def test_overrides_of_checkpoint_fields_win_for_compute_and_are_refused_for_architecture(tmp_path):
  """Defect: `hf.load(path, sliding_window=256)` raised "ModelConfig() got multiple values for
  keyword argument 'sliding_window'" because the checkpoint's config sets it too."""
  from jaxeff.errors import ConfigError

  _hf_model("mistral_window").save_pretrained(tmp_path / "hf")  # its own window: 5
  model, cfg = jaxeff.hf.load(tmp_path / "hf", sliding_window=3, attention="blocked", dtype="float32")
  assert cfg.sliding_window == 3 and cfg.attention == "blocked" and model.cfg is cfg
  tokens = jnp.arange(12, dtype=jnp.int32)[None] % TINY["vocab_size"]
  narrow, _ = jaxeff.hf.load(tmp_path / "hf", sliding_window=1)  # each token sees only itself
  wide, _ = jaxeff.hf.load(tmp_path / "hf")
  assert not np.allclose(np.asarray(narrow(tokens)), np.asarray(wide(tokens)))  # the override took effect
  with pytest.raises(ConfigError, match=r"num_layers=3 \(checkpoint: 2\): would change the architecture"):
    jaxeff.hf.load(tmp_path / "hf", num_layers=3)
  jaxeff.hf.load(tmp_path / "hf", num_layers=2)  # repeating the checkpoint's value is fine
