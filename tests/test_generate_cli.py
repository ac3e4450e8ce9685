"""`python -m jaxeff.generate`: text out, chat, a training checkpoint, and one `error:` line + exit 2
for bad input. In-process on tiny models; one real subprocess run on SmolLM2."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from smollm2 import smollm2_path
from tiny_gguf import CHAT_TEMPLATE, hf_tiny, write_gguf

from jaxeff.generate import Generator
from jaxeff.generate import __main__ as cli
from jaxeff.generate.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):  # converted into the session's cache (conftest), as SmolLM2 is
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  return write_gguf(path, hf_tiny("llama", seed=2, tie_word_embeddings=True), "llama", chat_template=CHAT_TEMPLATE)


def run_cli(argv, stdin=""):
  out, err = io.StringIO(), io.StringIO()
  code = cli.main(argv, stdin=io.StringIO(stdin), out=out, err=err)
  return code, out.getvalue(), err.getvalue()


def test_prompt_streams_the_greedy_tokens(tiny_gguf):
  code, out, err = run_cli(["--hf", str(tiny_gguf), "--prompt", "the cat in the hat", "--max-new-tokens", "12"])
  assert code == 0, err
  import jaxeff

  model, tok = jaxeff.load(tiny_gguf)
  ids = tok.encode("the cat in the hat")
  want = Generator(model, max_batch=1, max_seq_len=64).generate([ids], max_new_tokens=12, stop_tokens=tok.stop_tokens)
  assert out == tok.decode(want[0]) + "\n" and out.strip()
  last = err.strip().splitlines()[-1]
  assert last.startswith("prefill: ") and "decode: " in last and "tok/s" in last and "KV cache: " in last


@pytest.mark.parametrize("speculate", ["lookup", "self:1", "draft:GGUF"])
def test_speculate_gives_the_same_text_and_reports_acceptance(tiny_gguf, speculate):
  prompt = ["--hf", str(tiny_gguf), "--prompt", "the cat in the hat", "--max-new-tokens", "12"]
  _, plain, _ = run_cli(prompt)
  code, out, err = run_cli(prompt + ["--speculate", speculate.replace("GGUF", str(tiny_gguf)), "--draft-tokens", "3"])
  assert code == 0, err
  assert out == plain
  last = err.strip().splitlines()[-1]
  assert "| speculative (" in last and "tokens/forward" in last and "% of decode time" in last
  if speculate.startswith("draft"):  # the draft is the target: every draft accepted
    assert "4.00 tokens/forward" in last


def test_streaming_kv_cache_runs_past_max_seq_len(tiny_gguf):
  argv = ["--hf", str(tiny_gguf), "--prompt", "the cat in the hat", "--max-new-tokens", "40"]
  code, out, err = run_cli(argv + ["--kv-cache", "streaming:2,8", "--max-seq-len", "16"])
  assert code == 0, err
  assert out.strip()
  last = err.strip().splitlines()[-1]
  assert "2 sinks + 8 recent tokens, StreamingLLM" in last and "KV cache: " in last
  code, _, err = run_cli(argv + ["--kv-cache", "h2o:4,8"])
  assert code == 0, err
  assert "4 heavy hitters + 8 recent tokens, H2O" in err.strip().splitlines()[-1]
  code, _, err = run_cli(argv + ["--kv-cache", "snapkv:40"])
  assert code == 0, err
  assert "prompt kept to 40, SnapKV" in err.strip().splitlines()[-1]
  code, _, err = run_cli(argv + ["--kv-cache", "kivi:4,32"])
  assert code == 0, err
  assert "at 4 bits, 32 newest in full precision, KIVI" in err.strip().splitlines()[-1]


def test_chat_reads_turns_from_stdin(tiny_gguf):
  code, out, err = run_cli(
    [
      "--hf",
      str(tiny_gguf),
      "--chat",
      "--max-new-tokens",
      "5",
      "--temperature",
      "0.8",
      "--top-p",
      "0.9",
      "--seed",
      "1",
    ],
    stdin="hello\nthe cat\n\n",
  )
  assert code == 0, err
  assert len(out.splitlines()) == 2  # one answer per turn
  assert err.count("prefill: ") == 2 and err.count("> ") == 3  # a prompt for each turn, and the empty line


def test_checkpoint_with_its_byte_tokenizer(tmp_path):
  import jaxeff.train

  cfg = jaxeff.train.load_config(
    None,
    [
      "steps=2",
      "batch_size=8",
      "seq_len=16",
      "eval_batches=0",
      "progress=false",
      "model.num_layers=1",
      "model.hidden_size=32",
      "model.intermediate_size=64",
      "model.num_heads=2",
      "model.num_kv_heads=1",
      "data.max_corpus_bytes=20000",
      f"output_dir={tmp_path / 'run'}",
      "tensorboard=false",
    ],
  )
  jaxeff.train.train(cfg)
  code, out, err = run_cli(
    ["--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "6", "--quant", "int8"]
  )
  assert code == 0, err
  assert 0 < len(out.encode("utf-8")) <= 6 * 4 + 1  # at most 6 bytes' worth of text (replacement chars aside)


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--hf", "/nonexistent/model.gguf", "--prompt", "x"], "no such file"),
    (["--checkpoint", "/nonexistent/run", "--prompt", "x"], "no such directory"),
    (["--hf", "x.gguf"], "--prompt"),
    (["--hf", "x.gguf", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt", "x"], "one of the arguments --checkpoint --hf is required"),
    (["--hf", "a", "--checkpoint", "b", "--prompt", "x"], "not allowed with"),
    (["--hf", "x.gguf", "--prompt", "x", "--quant", "int3"], "invalid choice"),
    (["--hf", "x.gguf", "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--hf", "x.gguf", "--prompt", "x", "--speculate", "ngram"], "--speculate takes lookup"),
    (["--hf", "x.gguf", "--prompt", "x", "--speculate", "self"], "--speculate takes lookup"),
    (["--hf", "x.gguf", "--prompt", "x", "--tree-size", "8"], "need --speculate"),
    (["--hf", "x.gguf", "--prompt", "x", "--speculate", "lookup", "--tree-size", "8"], "--tree-size goes with"),
    (["--hf", "x.gguf", "--prompt", "x", "--kv-cache", "h2o:4"], "--kv-cache takes dense, paged, paged:BLOCK"),
    (["--hf", "x.gguf", "--prompt", "x", "--kv-cache", "kivi:2"], "--kv-cache takes dense, paged, paged:BLOCK"),
    (["--hf", "x.gguf", "--prompt", "x", "--kv-cache", "kivi:3,32"], "--kv-cache kivi:3,32: KIVI needs bits"),
    (["--hf", "x.gguf", "--prompt", "x", "--kv-cache", "snapkv:16"], "window < budget"),
    (["--hf", "x.gguf", "--prompt", "x", "--kv-cache", "streaming:4,8", "--speculate", "lookup"], "dense cache"),
  ],
)
def test_bad_arguments(argv, match):
  code, out, err = run_cli(argv)
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and match in err, err


def test_bad_model_and_prompt(tiny_gguf, tmp_path):
  import gguf

  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  cases = [
    (["--hf", str(tmp_path / "gpt2.gguf"), "--prompt", "x"], "unsupported GGUF architecture 'gpt2'"),
    (["--hf", str(tiny_gguf), "--prompt", "the cat " * 10, "--max-seq-len", "16"], "at most 0 new tokens fit"),
    (["--hf", str(tiny_gguf), "--prompt", "the cat", "--top-p", "2"], "top_p"),
    (["--hf", str(tmp_path), "--prompt", "x"], "no config.json"),
    (["--hf", str(tiny_gguf), "--prompt", "x", "--speculate", "self:9"], "fewer layers"),
    (["--hf", str(tiny_gguf), "--prompt", "x", "--speculate", "draft:/nonexistent"], "no such file"),
    (["--hf", str(tiny_gguf), "--prompt", "x", "--speculate", "medusa:/nonexistent"], "Medusa heads checkpoint"),
  ]
  for argv, match in cases:
    code, out, err = run_cli(argv)
    assert code == 2 and out == "", err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("loaded ", "compiled "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


@pytest.mark.slow
def test_smollm2_cli_subprocess():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxeff.generate",
      "--hf",
      str(smollm2_path()),
      "--scan-layers",
      "--prompt",
      "The capital of France is",
      "--max-new-tokens",
      "3",
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(" Paris"), proc.stdout
  assert "decode: 3 new tokens" in proc.stderr
  bad = subprocess.run(
    [sys.executable, "-m", "jaxeff.generate", "--hf", "/nope.gguf", "--prompt", "x"],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
    "error: --hf /nope.gguf: no such file or directory"
  ]


def test_stream_decoder_holds_back_partial_characters(tiny_gguf):
  from jaxeff.generate.tokenizer import StreamDecoder

  tok = load_tokenizer(tiny_gguf)
  text = "über 日本 the cat"
  ids = tok.encode(text)
  assert len(ids) > len(text.split())  # the tiny vocabulary spells most of it byte by byte
  decoder = StreamDecoder(tok)
  pieces = [decoder.push(i) for i in ids]
  assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
  assert "" in pieces  # a multi-byte character waited for its last byte
