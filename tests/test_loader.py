"""`jaxeff.load`: a Hugging Face directory, a GGUF file and a training run, each -> (model, tokenizer);
compute overrides, meshes and quantization; bad paths and keys as one clear error. Also what the one
loader replaced: `init_from` of a run, and `jaxeff.training` without `jaxeff.generate`."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from tiny_gguf import CHAT_TEMPLATE, hf_tiny, write_gguf

import jaxeff
from jaxeff import hf, loader, quantization, sharding, training
from jaxeff.config import ModelConfig
from jaxeff.data.tokenizer import ByteTokenizer, HFTokenizer
from jaxeff.errors import CheckpointError, ConfigError, HFError, QuantizationError
from jaxeff.models import Llama

TOKENS = jnp.asarray([[1, 5, 9, 33, 20, 7, 7, 15]])
_forward = nnx.jit(lambda model, tokens: model(tokens))


def _leaves(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A Hugging Face directory: weights, a word-level tokenizer.json, a chat template and eos ids."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
  path = hf.save(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path_factory.mktemp("hf") / "model")
  vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|im_end|>": 2, "hi": 3, "there": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path / "tokenizer.json"))
  config = {"chat_template": CHAT_TEMPLATE, "eos_token": {"content": "<|im_end|>"}}
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
  return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):  # converted into the session's cache (conftest)
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return write_gguf(path, hf_tiny("llama", seed=2, tie_word_embeddings=True), "llama", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step byte-level training run with a checkpoint at each step."""
  out = tmp_path_factory.mktemp("run")
  cfg = training.load_config(
    None,
    [
      "steps=2",
      "checkpoint_every=1",
      "batch_size=8",
      "seq_len=16",
      "eval_batches=0",
      "progress=false",
      "tensorboard=false",
      "model.num_layers=2",
      "model.hidden_size=32",
      "model.intermediate_size=64",
      "model.num_heads=2",
      "model.num_kv_heads=1",
      "optimizer.warmup_steps=1",
      "data.max_corpus_bytes=20000",
      f"output_dir={out}",
    ],
  )
  training.train(cfg)
  return out


# ---------------------------------------------------------------------------- each kind of path


def test_hf_directory_gives_the_model_and_its_tokenizer(hf_dir):
  model, tok = jaxeff.load(hf_dir)
  want, _ = hf.load(hf_dir)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(model), _leaves(want)))
  assert isinstance(tok, HFTokenizer) and tok.encode("hi there") == [3, 4] and tok.vocab_size == 5
  assert tok.stop_tokens == (2, 1)  # tokenizer_config's eos_token, then generation_config's ids
  assert (
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
    == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  )
  assert loader.load_tokenizer(hf_dir).path == tok.path == loader.tokenizer_file(hf_dir)

  scanned, _ = jaxeff.load(hf_dir, scan_layers=True, dtype="bfloat16", attention="blocked")
  assert (scanned.cfg.scan_layers, scanned.cfg.dtype, scanned.cfg.attention) == (True, "bfloat16", "blocked")
  assert loader.model_config(hf_dir, scan_layers=True, dtype="bfloat16", attention="blocked") == scanned.cfg


def test_gguf_file_gives_its_conversion_and_its_tokenizer(tiny_gguf):
  from jaxeff import gguf

  model, tok = jaxeff.load(tiny_gguf)
  directory = gguf.converted_checkpoint(tiny_gguf)
  want, _ = hf.load(directory)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(model), _leaves(want)))
  assert tok.path == directory / "tokenizer.json" and tok.chat_template == CHAT_TEMPLATE
  ids = tok.encode("the cat in the hat")
  assert tok.decode(ids) == "the cat in the hat"
  with pytest.raises(QuantizationError, match="scan_layers=True does not go with it"):
    jaxeff.load(tiny_gguf, quant="gguf", scan_layers=True)


def test_training_run_gives_its_checkpoint_and_its_byte_tokenizer(run):
  model, tok = jaxeff.load(run)
  want, cfg = training.load_checkpoint(run)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(model), _leaves(want)))
  assert isinstance(tok, ByteTokenizer) and tok.stop_tokens == (0,) and tok.encode("hi") == [104, 105]
  assert loader.tokenizer_file(run) is None and loader.model_config(run) == cfg.model
  first, _ = jaxeff.load(run, step=1)
  assert not all(np.array_equal(a, b) for a, b in zip(_leaves(first), _leaves(model)))
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(first), _leaves(training.load_checkpoint(run, 1)[0])))


def test_training_run_relayout_and_cast(run):
  """scan_layers and param_dtype change a run's parameter trees: restacked and cast after reading."""
  model, _ = jaxeff.load(run)
  want = np.asarray(_forward(model, TOKENS))
  scanned, _ = jaxeff.load(run, scan_layers=True)
  assert scanned.cfg.scan_layers and scanned.layers.mlp.up_proj.kernel.shape[0] == 2
  np.testing.assert_allclose(np.asarray(_forward(scanned, TOKENS)), want, rtol=1e-5, atol=1e-5)
  half, _ = jaxeff.load(run, dtype="bfloat16", param_dtype="bfloat16")
  assert half.layers[0].mlp.up_proj.kernel.dtype == jnp.bfloat16 and half.cfg.dtype == "bfloat16"
  np.testing.assert_allclose(np.asarray(_forward(half, TOKENS)), want, atol=0.05 * np.abs(want).max())
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  placed, _ = jaxeff.load(run, mesh=mesh, scan_layers=True)
  kernel = placed.layers.mlp.up_proj.kernel[...]
  assert kernel.sharding.mesh == mesh and not kernel.sharding.is_fully_replicated


def test_init_from_a_training_run(run, tmp_path):
  """A run fine-tunes from another run: its architecture, its (byte) tokenizer and its weights."""
  cfg = training.load_config(None, [f"init_from={run}", "steps=1", f"output_dir={tmp_path}"])
  saved, _ = training.load_checkpoint(run)
  assert cfg.model == saved.cfg and cfg.data.tokenizer is None
  start = training.Trainer(cfg).init_state()
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.params), _leaves(saved)))
  with pytest.raises(ConfigError, match=r"init_from .*hidden_size=48 \(checkpoint: 32\)"):
    training.load_config(None, [f"init_from={run}", "model.hidden_size=48"])


# ---------------------------------------------------------------------------- quantization and meshes


def test_int8_is_jaxeff_quantize_and_a_mesh_places_it(hf_dir):
  model, _ = jaxeff.load(hf_dir, quant="int8")
  want = quantization.quantize(hf.load(hf_dir)[0], bits=8)
  assert isinstance(model.layers[0].mlp.up_proj, quantization.QuantizedLinear)
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(model), _leaves(want)))
  four, _ = jaxeff.load(hf_dir, quant="int4", zero_point=True)
  layer = four.layers[0].mlp.up_proj
  assert (layer.bits, layer.group_size, layer.zero_point) == (4, 32, True)
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  placed, _ = jaxeff.load(hf_dir, quant="int8", mesh=mesh)
  qvalue = placed.layers[0].mlp.up_proj.qvalue[...]
  assert qvalue.sharding.mesh == mesh and not qvalue.sharding.is_fully_replicated


# ---------------------------------------------------------------------------- bad input: one clear line


def test_bad_paths_keys_and_settings(hf_dir, tiny_gguf, run, tmp_path):
  (tmp_path / "empty").mkdir()
  model, _ = jaxeff.load(hf_dir)
  bare = hf.save(model, model.cfg, tmp_path / "bare")  # weights without a tokenizer.json
  cases = [
    (CheckpointError, tmp_path / "missing", {}, "missing: no such file or directory"),
    (CheckpointError, tmp_path / "empty", {}, "is not a .gguf file, a Hugging Face directory (no config.json)"),
    (HFError, bare, {}, "has no tokenizer.json"),
    (ConfigError, hf_dir, {"num_layers": 3}, "num_layers=3 (checkpoint: 2): would change the architecture"),
    (ConfigError, run, {"hidden_size": 48}, "hidden_size=48 (checkpoint: 32): would change the architecture"),
    (ConfigError, hf_dir, {"bogus": 1}, "unknown model config field(s) bogus"),
    (ConfigError, hf_dir, {"step": 1}, "step=1 picks a checkpoint of a training run"),
    (QuantizationError, hf_dir, {"quant": "int3"}, "quant must be one of int8, int4, gguf"),
    (QuantizationError, hf_dir, {"zero_point": True}, "zero_point and group_size go with quant='int8' or 'int4'"),
    (QuantizationError, hf_dir, {"quant": "gguf"}, "is not a .gguf file"),
  ]
  for error, path, kwargs, message in cases:
    with pytest.raises(error) as caught:
      jaxeff.load(path, **kwargs)
    assert message in str(caught.value) and "\n" not in str(caught.value), (path, kwargs, str(caught.value))
  with pytest.raises(HFError, match="is a GGUF file; jaxeff.load reads it"):
    hf.load(tiny_gguf)  # hf.load reads Hugging Face directories only


# ---------------------------------------------------------------------------- import hygiene


def test_imports_stay_light_and_training_needs_no_generation():
  code = (
    "import sys, jaxeff\n"
    "light = not {'jax', 'flax', 'jaxeff.loader'} & set(sys.modules)\n"
    "import jaxeff.training\n"
    "print(light, callable(jaxeff.load), sorted(m for m in sys.modules if m.startswith('jaxeff.generate')))\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
  assert proc.stdout.split() == ["True", "True", "[]"], proc.stdout
