"""Fine-tuning end to end on a tiny GGUF: chat records -> masked rows, `init_from` (the checkpoint's
architecture, tokenizer and weights), training on the masked loss, resume, and export back to GGUF
(llama.cpp loads it and decodes what jaxeff decodes) and to Hugging Face (transformers' logits)."""

import io
import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_gguf import CHAT_TEMPLATE, hf_tiny, write_gguf

import jaxeff
from jaxeff import export, training
from jaxeff.data import load_chat, vocab_size
from jaxeff.data.chat import encode_chat
from jaxeff.data.pipeline import TextData
from jaxeff.data.sources import DataConfig
from jaxeff.data.tokenizer import HFTokenizer
from jaxeff.errors import ConfigError, DataError
from jaxeff.gguf import converted_checkpoint
from jaxeff.training.step import next_token_loss

CHATS = [
  {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "in the hat"}]},
  {
    "messages": [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": "12 cats?"},
      {"role": "assistant", "content": "the cat 12"},
      {"role": "user", "content": "and then"},
      {"role": "assistant", "content": "the hat"},
    ]
  },
  {"prompt": "a cat", "completion": "the cat sat"},
]
BAD = [
  {"text": "no messages here"},
  {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
  {"messages": [{"role": "user", "content": "only a question"}]},
  {"messages": [{"role": "user", "content": "long " * 60}, {"role": "assistant", "content": "x"}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(tiny.gguf, its converted HF directory, chats.jsonl with good and bad records)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXEFF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("ft")
    path = write_gguf(
      root / "tiny.gguf", hf_tiny("llama", seed=3, tie_word_embeddings=True), "llama", chat_template=CHAT_TEMPLATE
    )
    chats = root / "chats.jsonl"
    lines = [json.dumps(r) for r in CHATS * 16] + [json.dumps(r) for r in BAD] + ["{not json"]
    chats.write_text("\n".join(lines) + "\n")
    yield path, converted_checkpoint(path), chats


def test_chat_rows_mask_exactly_the_assistant_replies(tiny):
  _, directory, _ = tiny
  tok = HFTokenizer(directory / "tokenizer.json")  # its chat template comes from the directory
  messages = CHATS[1]["messages"]
  ids, mask = encode_chat(messages, tok)
  assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(messages, add_generation_prompt=False)
  # The trained tokens are the two replies, each with the end-of-turn text that closes it.
  trained = tok.decode(ids[mask], skip_special_tokens=False)
  assert trained == "the cat 12<|im_end|>\nthe hat<|im_end|>\n"
  assert "be brief" in tok.decode(ids[~mask]) and "and then" in tok.decode(ids[~mask])


def test_bad_records_are_counted_in_one_line(tiny, caplog):
  _, directory, chats = tiny
  cfg = DataConfig(format="chat", paths=[str(chats)], tokenizer=str(directory / "tokenizer.json"), val_fraction=0.1)
  with caplog.at_level(logging.WARNING, logger="jaxeff.data.chat"):
    data = load_chat(cfg, seq_len=128)
  assert data.skipped == {
    "no messages": 1,
    "unknown role": 1,
    "no assistant turn": 1,
    "longer than seq_len + 1 = 129 tokens": 1,
    "not JSON": 1,
  }
  (line,) = [r.getMessage() for r in caplog.records]
  assert line.startswith("data: 5 of 53 chat records skipped")
  assert vocab_size(data) == 300 and data.train.tokens.shape[1] == 129
  # Packed (the default): every conversation once, several to a row.
  assert sum(int(rows.segments.max(axis=1).sum()) for rows in (data.train, data.val)) == 48
  assert len(data.train) + len(data.val) < 48 and data.train.batch(np.arange(2))["loss_mask"].any(axis=1).all()
  padded = load_chat(DataConfig(**{**cfg.__dict__, "pack": False}), seq_len=128)
  assert len(padded.train) + len(padded.val) == 48 and padded.train.loss_mask[:, 1:].any(axis=1).all()
  truncated = load_chat(DataConfig(**{**cfg.__dict__, "truncate": True}), seq_len=128)
  assert "longer than seq_len + 1 = 129 tokens" not in truncated.skipped


def test_prepare_chat_gives_what_training_reads_from_jsonl(tiny, tmp_path, capsys):
  from jaxeff.data.__main__ import main as data_main

  _, directory, chats = tiny
  tokenizer = str(directory / "tokenizer.json")
  argv = ["prepare", "--format", "chat", "--input", str(chats), "--tokenizer", tokenizer]
  assert data_main([*argv, "--output", str(tmp_path / "chat"), "--quiet"]) == 0
  # The 48 good records and the long one (lengths are checked against seq_len when training reads it).
  assert "in 49 conversations" in capsys.readouterr().out
  from_jsonl = DataConfig(format="chat", paths=[str(chats)], tokenizer=tokenizer, val_fraction=0.1)
  from_dir = DataConfig(format="chat", dataset=str(tmp_path / "chat"), tokenizer=tokenizer, val_fraction=0.1)
  want, got = load_chat(from_jsonl, seq_len=128), load_chat(from_dir, seq_len=128)
  assert got.skipped == want.skipped and got.vocab_size == want.vocab_size
  for a, b in ((got.train, want.train), (got.val, want.val)):
    for field in ("tokens", "loss_mask", "segments", "positions"):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  # Each kind of directory is refused by the other format, in one line.
  with pytest.raises(DataError, match="holds chat conversations; set data.format=chat"):
    TextData.load(DataConfig(dataset=str(tmp_path / "chat")))
  text_dir = tmp_path / "text"
  (chats.parent / "doc.txt").write_text("plain text")
  assert data_main(["prepare", "--input", str(chats.parent / "doc.txt"), "--output", str(text_dir), "--quiet"]) == 0
  with pytest.raises(DataError, match="holds text documents, not chat conversations"):
    load_chat(DataConfig(format="chat", dataset=str(text_dir)), seq_len=128)


def test_packing_needs_an_attention_that_masks_by_segment(tiny, tmp_path):
  cfg = training.load_config(None, _overrides(tiny, tmp_path, "model.attention=sparse"))
  with pytest.raises(ConfigError, match="choose one or set data.pack=false"):
    training.Trainer(cfg)
  training.Trainer(training.load_config(None, _overrides(tiny, tmp_path, "model.attention=sparse", "data.pack=false")))


def _overrides(tiny, out, *extra):
  path, _, chats = tiny
  return [
    f"init_from={path}",
    "data.format=chat",
    f"data.paths=[{chats}]",
    "data.val_fraction=0.34",
    "seq_len=128",
    "batch_size=8",
    "eval_every=10",
    "eval_batches=1",
    "log_every=5",
    "checkpoint_every=10",
    "optimizer.learning_rate=3e-3",
    "optimizer.warmup_steps=2",
    "progress=false",
    "tensorboard=false",
    f"output_dir={out}",
    *extra,
  ]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
  """A 20-step fine-tuning run of the tiny GGUF on the chat records."""
  out = tmp_path_factory.mktemp("run")
  cfg = training.load_config(None, _overrides(tiny, out, "steps=20"))
  return cfg, training.train(cfg)


def test_init_from_takes_the_checkpoint_and_starts_from_its_weights(tiny, run):
  path, directory, _ = tiny
  cfg, result = run
  model, _ = jaxeff.load(path)
  assert (cfg.model.num_layers, cfg.model.vocab_size, cfg.model.tie_embeddings) == (2, 300, True)
  assert cfg.model.attention == "blocked"  # the built-in config's CPU attention, a compute setting
  assert cfg.data.tokenizer == str(directory / "tokenizer.json")
  trainer = training.Trainer(cfg)
  start = trainer.init_state()
  want = jax.tree.leaves(nnx.state(model))
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(start.params), want))
  # It learned the replies: the masked loss fell.
  assert result.losses[-1] < 0.6 * result.losses[0], result.losses
  assert np.isfinite(list(result.val_losses.values())).all()


def test_architecture_overrides_are_refused_compute_ones_taken(tiny, tmp_path):
  with pytest.raises(ConfigError, match=r"num_layers=3 \(checkpoint: 2\): would change the architecture"):
    training.load_config(None, _overrides(tiny, tmp_path, "model.num_layers=3"))
  cfg = training.load_config(None, _overrides(tiny, tmp_path, "model.remat=full", "model.attention=dense"))
  assert (cfg.model.remat, cfg.model.attention, cfg.model.num_layers) == ("full", "dense", 2)
  with pytest.raises(ConfigError, match="drop data.tokenizer"):
    training.load_config(None, _overrides(tiny, tmp_path, f"data.tokenizer={tmp_path / 'other.json'}"))


def test_resume_continues_the_fine_tuning_run(tiny, run):
  cfg, result = run
  more = training.load_config(None, _overrides(tiny, cfg.output_dir, "steps=22"))
  resumed = training.train(more, resume=True)
  assert len(resumed.losses) == 2 and resumed.step == 22


def test_gguf_export_loads_in_llama_cpp_and_decodes_as_jaxeff(tiny, run, tmp_path):
  llama_cpp = pytest.importorskip("llama_cpp")
  from jaxeff.bench.common import llama_cpp_without_extra_buffers
  from jaxeff.generate import Generator

  cfg, _ = run
  out = io.StringIO()
  assert export.main(["--checkpoint", str(cfg.output_dir), "--gguf", str(tmp_path / "ft.gguf")], out=out) == 0
  assert "GGUF (f16)" in out.getvalue()
  trained, _ = training.load_checkpoint(cfg.output_dir)
  exported, _ = jaxeff.load(tmp_path / "ft.gguf")  # jaxeff reads its own export back
  tokens = np.arange(3, 40, dtype=np.int32)[None]
  np.testing.assert_allclose(exported(tokens), trained(tokens), atol=2e-2)  # f16 weights
  llama_cpp_without_extra_buffers()
  llm = llama_cpp.Llama(model_path=str(tmp_path / "ft.gguf"), n_ctx=64, verbose=False)
  prompts = [[5, 80, 81, 7], [1, 40, 100, 101, 102, 90], [60, 61]]
  want = Generator(exported, max_batch=1, max_seq_len=128).generate(prompts, max_new_tokens=8)
  for prompt, expected in zip(prompts, want):
    got = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
      got.append(int(t))
      if len(got) == 8:
        break
    assert got == expected, (prompt, got, expected)
  assert llm.metadata.get("tokenizer.chat_template") == CHAT_TEMPLATE
  # Quantized exports: perplexity on the held-out conversations within each format's expected change
  # (llama.cpp's tables for Llama-class models: q8_0 ~0.1%, q4_0 / q4_1 a few percent; measured
  # here: +0.03%, +0.12%, -0.23%). A wrong block layout or row order is off by orders of magnitude.
  val = load_chat(cfg.data, cfg.seq_len).val
  held_out = val.batch(np.arange(len(val)))
  base = float(next_token_loss(trained, held_out))
  for kind, tol in (("q8_0", 0.005), ("q4_0", 0.05), ("q4_1", 0.05)):
    path = tmp_path / f"ft-{kind}.gguf"
    assert (
      export.main(["--checkpoint", str(cfg.output_dir), "--gguf", str(path), "--type", kind], out=io.StringIO()) == 0
    )
    quantized, _ = jaxeff.load(path)
    change = np.exp(float(next_token_loss(quantized, held_out)) - base) - 1
    assert abs(change) < tol, (kind, change)
  # Never overwrites.
  err = io.StringIO()
  assert export.main(["--checkpoint", str(cfg.output_dir), "--gguf", str(tmp_path / "ft.gguf")], err=err) == 2
  assert "already exists" in err.getvalue()


def test_hf_export_loads_in_transformers(run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg, _ = run
  assert export.main(["--checkpoint", str(cfg.output_dir), "--hf", str(tmp_path / "hf")], out=io.StringIO()) == 0
  assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()
  trained, _ = training.load_checkpoint(cfg.output_dir)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  tokens = np.arange(3, 40, dtype=np.int64)[None]
  with torch.no_grad():
    want = hf_model(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(trained(tokens.astype(np.int32))), want, atol=1e-4, rtol=1e-4)
