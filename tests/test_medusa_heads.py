"""Medusa-1 heads: zero init is the base, greedy distillation labels, training, acceptance, checkpoints, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxeff
from jaxeff import ModelConfig
from jaxeff import train as train_lib
from jaxeff.errors import CheckpointError, ConfigError
from jaxeff.generate import Generator
from jaxeff.generate.speculative import medusa_heads as medusa
from jaxeff.generate.speculative.medusa_training import distillation_set, train_heads
from jaxeff.models import Llama

VOCAB, HIDDEN, PROMPT, NEW, K = 96, 32, 8, 16, 3
TINY = ModelConfig(
  vocab_size=VOCAB,
  hidden_size=HIDDEN,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  initializer_range=0.2,  # confident logits: the heads have something to learn
)


def _params(model) -> list[np.ndarray]:
  return [np.array(x) for x in jax.tree.leaves(nnx.state(model))]


# Compiled once: eager forwards dispatch op by op and take seconds even for the tiny model.
_hidden_states = nnx.jit(lambda model, tokens: model.hidden_states(tokens))
_head_logits = nnx.jit(medusa.head_logits)


@pytest.fixture(scope="module")
def base():
  return Llama(TINY, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompts():
  return np.random.default_rng(0).integers(0, VOCAB, (12, PROMPT)).astype(np.int32)


@pytest.fixture(scope="module")
def data(base, prompts):
  return distillation_set(base, prompts, NEW, batch=12)


@pytest.fixture(scope="module")
def trained(base, data):
  """(base parameters before, heads, per-step losses): 40 steps on 8 sequences, 4 held out."""
  before = _params(base)
  heads, losses = train_heads(
    base, data.rows(slice(0, 8)), num_heads=K, num_layers=2, steps=40, batch_size=4, learning_rate=5e-2, log_every=20
  )
  return before, heads, losses


def test_zero_initialized_heads_are_the_base(base):
  heads = medusa.MedusaHeads(HIDDEN, num_heads=K, num_layers=2, rngs=nnx.Rngs(0))
  assert heads.w.shape == (K, 2, HIDDEN, HIDDEN) and heads.b.shape == (K, 2, HIDDEN)
  hidden = _hidden_states(base, jnp.arange(10, dtype=jnp.int32).reshape(2, 5))
  out = heads(hidden)
  assert out.shape == (2, 5, K, HIDDEN) and out.dtype == hidden.dtype
  assert heads(hidden[0, 0]).shape == (K, HIDDEN)  # any leading shape
  logits = _head_logits(base, heads, hidden)
  assert logits.shape == (2, 5, K, VOCAB)
  np.testing.assert_array_equal(logits, jnp.broadcast_to(base.logits(hidden)[:, :, None], logits.shape))


def test_distillation_labels_are_the_base_greedy_tokens(base, prompts, data):
  assert data.tokens.shape == (12, PROMPT + NEW) and data.prompt_len == PROMPT and data.new_tokens == NEW
  np.testing.assert_array_equal(data.tokens[:, :PROMPT], prompts)
  greedy = Generator(base, max_batch=12, max_seq_len=PROMPT + NEW).generate(list(prompts), max_new_tokens=NEW)
  np.testing.assert_array_equal(data.tokens[:, PROMPT:], np.asarray(greedy))
  # Greedy means each continuation token is the argmax of the full forward at the position before.
  full = np.asarray(base.logits(_hidden_states(base, jnp.asarray(data.tokens)))).argmax(-1)
  np.testing.assert_array_equal(data.tokens[:, PROMPT:], full[:, PROMPT - 1 : -1])

  labels, mask = data.targets(K)
  s = PROMPT + NEW
  t, k = np.arange(s)[:, None], np.arange(K)[None, :]
  want = (t >= PROMPT - 1) & (t + k + 2 < s)  # the label and every token before it are continuation
  assert (mask == want[None]).all() and (t + k + 2 >= PROMPT)[want].all()
  n, tt, kk = np.nonzero(mask)
  np.testing.assert_array_equal(labels[n, tt, kk], data.tokens[n, tt + kk + 2])
  assert (labels[~mask] == 0).all()
  assert mask[0].sum(0).tolist() == [NEW - 1 - j for j in range(K)]

  spread = medusa.corpus_prompts(np.arange(1000), 5, 32)
  assert spread.shape == (5, 32) and spread[0, 0] == 0 and spread[-1, -1] == 999


def test_training_lowers_the_loss_and_leaves_the_base_alone(base, data, trained):
  before, heads, losses = trained
  assert len(losses) == 40 and all(np.isfinite(losses))
  for old, new in zip(before, _params(base)):
    np.testing.assert_array_equal(old, new)
  hidden, labels, mask = medusa.training_arrays(base, data.rows(slice(0, 8)), K)
  zero = medusa.MedusaHeads(HIDDEN, K, 2, rngs=nnx.Rngs(0))
  start, end = (float(medusa.heads_loss(base, h, hidden, labels, mask)) for h in (zero, heads))
  assert end < 0.7 * start, (start, end)
  # Per head and per block its own weights (the reference's [ResBlock] * L shares one block's).
  w = np.asarray(heads.w)
  assert not np.allclose(w[0, 0], w[0, 1]) and not np.allclose(w[0, 0], w[1, 0])
  # Chunking the positions (the memory bound for large vocabularies) gives the same loss.
  np.testing.assert_allclose(medusa.heads_loss(base, heads, hidden, labels, mask, chunk=7), end, rtol=1e-5)


def test_measure_acceptance_matches_numpy(base, data, trained):
  heads, held, rank = trained[1], data.rows(slice(8, None)), 5
  acc = medusa.measure_acceptance(base, heads, held, max_rank=rank)
  logits = np.asarray(_head_logits(base, heads, _hidden_states(base, jnp.asarray(held.tokens))))  # [N, S, K, V]
  top = np.argsort(-logits, axis=-1, kind="stable")[..., :rank]
  labels, mask = held.targets(K)
  want = np.zeros((K, rank))
  for k in range(K):
    for r in range(rank):
      want[k, r] = ((top[..., k, r] == labels[..., k]) & mask[..., k]).sum() / mask[..., k].sum()
  np.testing.assert_allclose(acc, want, atol=1e-12)
  assert acc.sum(1).max() <= 1 + 1e-9 and acc[:, 0].min() > 0


def test_save_load_round_trip_and_refusals(tmp_path, base, trained):
  heads = trained[1]
  info = medusa.MedusaInfo.for_heads(
    heads, base, base_path="tiny", acceptance=[[0.5, 0.25]] * K, training={"steps": 40, "final_loss": 1.5}
  )
  path = medusa.save_heads(tmp_path / "heads", heads, info=info)
  loaded, loaded_info = medusa.load_heads(path)
  assert loaded_info == info and (loaded.num_heads, loaded.num_layers) == (K, 2)
  for a, b in zip(_params(heads), _params(loaded)):
    np.testing.assert_array_equal(a, b)
  medusa.check_base(loaded_info, base)

  with pytest.raises(CheckpointError, match="already exists and is not empty"):
    medusa.save_heads(path, heads, info=info)
  medusa.save_heads(path, loaded, info=info, overwrite=True)  # replacing saved heads, when asked
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("keep me")
  with pytest.raises(CheckpointError, match="not a Medusa heads checkpoint"):
    medusa.save_heads(tmp_path / "other", heads, info=info, overwrite=True)
  assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"

  with pytest.raises(CheckpointError, match="another base model .tiny.: embedding_sha256"):
    medusa.check_base(info, Llama(TINY, rngs=nnx.Rngs(4)))  # same architecture, other weights
  wider = ModelConfig(**{**TINY.__dict__, "hidden_size": 64})
  with pytest.raises(CheckpointError, match="hidden_size 32 vs 64"):
    medusa.check_base(info, Llama(wider, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  from tiny_gguf import CHAT_TEMPLATE, hf_tiny, write_gguf

  with pytest.MonkeyPatch.context() as mp:  # this file's GGUF conversions go to a temporary cache
    mp.setenv("JAXEFF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    yield write_gguf(path, hf_tiny("llama", seed=2, tie_word_embeddings=True), "llama", chat_template=CHAT_TEMPLATE)


CLI_ARGS = [
  "medusa.num_heads=3",
  "medusa.sequences=8",
  "medusa.eval_sequences=4",
  "medusa.prompt_len=8",
  "medusa.new_tokens=12",
  "medusa.max_rank=4",
  "steps=4",
  "batch_size=4",
  "log_every=2",
  "data.max_corpus_bytes=20000",
  "data.val_fraction=0.2",
  "medusa.chat=true",
]


def test_chat_prompts_wrap_every_window_alike(tiny_gguf):
  from jaxeff.generate.speculative.medusa_training import CHAT_INSTRUCTION, chat_prompts
  from jaxeff.loader import load_tokenizer

  windows = np.arange(3 * 5).reshape(3, 5) + 40
  tok = load_tokenizer(tiny_gguf)
  prompts = chat_prompts(windows, tok)
  want = tok.encode(
    tok.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + "\x00"}]), add_special_tokens=False
  )
  start = next(i for i in range(prompts.shape[1]) if prompts[0, i] == 40)
  assert (prompts[:, start : start + 5] == windows).all()
  assert (prompts[:, :start] == prompts[0, :start]).all() and (prompts[:, start + 5 :] == prompts[0, start + 5 :]).all()
  assert CHAT_INSTRUCTION.strip() in tok.decode(prompts[0, :start].tolist())
  assert prompts.shape[1] - 5 < len(want) + 3  # the template's own tokens around the window, nothing else


def test_cli_trains_heads_for_a_gguf(tmp_path, tiny_gguf):
  proc = subprocess.run(
    [sys.executable, "-m", "jaxeff.train", f"medusa.base={tiny_gguf}", *CLI_ARGS, f"output_dir={tmp_path / 'run'}"],
    capture_output=True,
    text=True,
    timeout=300,
    env=os.environ,
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.strip().splitlines()
  heads_dir = tmp_path / "run" / "medusa"
  assert out[-1].startswith("done: 3 Medusa heads") and out[-1].endswith(f"saved in {heads_dir}"), out
  assert out[0].startswith("acceptance on held-out") and len(out) == 1 + 3 + 1
  assert "distillation set: 12 prompts x 12 greedy tokens" in proc.stderr and "step 4: loss" in proc.stderr

  heads, info = medusa.load_heads(heads_dir)
  medusa.check_base(info, jaxeff.load(tiny_gguf)[0])
  assert (info.num_heads, info.num_layers, info.hidden_size, info.vocab_size) == (3, 1, 64, 300)
  assert np.asarray(info.acceptance).shape == (3, 4) and info.training["steps"] == 4 and info.training["chat"]
  assert info.base_path == str(tiny_gguf) and heads.w.shape == (3, 1, 64, 64)
  records = [json.loads(line) for line in (tmp_path / "run" / "medusa_metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 4] and records[-1]["acceptance"] == info.acceptance


def _cli(capsys, *argv):
  code = train_lib.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.err.strip(), captured.out


@pytest.mark.parametrize(
  "extra, message",
  [
    (["medusa.base=/nonexistent/model.gguf"], "medusa.base /nonexistent/model.gguf: no such file or directory"),
    (["medusa.base={bad}"], "is not a readable GGUF file"),
    (["medusa.base={gguf}", "model.hidden_size=48"], "model.hidden_size=48 vs the base's 64"),
    (["medusa.base={gguf}", "medusa.new_tokens=3"], "medusa.new_tokens must be >= medusa.num_heads + 1"),
    (["medusa.base={gguf}", "--resume"], "medusa mode does not resume"),
  ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, tiny_gguf, extra, message):
  (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
  extra = [e.format(bad=tmp_path / "bad.gguf", gguf=tiny_gguf) for e in extra]
  code, err, out = _cli(capsys, *CLI_ARGS, f"output_dir={tmp_path / 'run'}", *extra)
  assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
  assert out == "" and not (tmp_path / "run" / "medusa").exists()


def test_cli_never_overwrites_saved_heads(tmp_path, capsys, tiny_gguf):
  (tmp_path / "run" / "medusa").mkdir(parents=True)
  (tmp_path / "run" / "medusa" / "something").write_text("")
  code, err, _ = _cli(capsys, f"medusa.base={tiny_gguf}", *CLI_ARGS, f"output_dir={tmp_path / 'run'}")
  assert code == 2 and "already exists and is not empty" in err and "\n" not in err


def test_medusa_config_defaults_leave_training_alone():
  cfg = train_lib.load_config(None, [])
  assert cfg.medusa.base is None and cfg.medusa.num_heads == 4 and cfg.medusa.new_tokens == 96
  with pytest.raises(ConfigError, match="unknown config key 'medusa.heads'"):
    train_lib.load_config(None, ["medusa.heads=2"])
