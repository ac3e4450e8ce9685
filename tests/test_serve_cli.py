"""`python -m jaxeff.serve` as a user runs it: a tiny GGUF served as stored, its chat template,
the API key, and SIGTERM (stop taking connections, finish or cancel, exit 0); bad usage."""

import os
import re
import signal
import subprocess
import sys
import threading

import gguf
import httpx2
import openai
import pytest
import tiny_gguf

import jaxeff
from jaxeff import cli
from jaxeff.generate import Generator
from jaxeff.serve.__main__ import main, parse_args


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("serve") / "tiny-chat.gguf"
  model = tiny_gguf.hf_tiny("llama")
  return tiny_gguf.write_gguf(
    path, model, "llama", quant=gguf.GGMLQuantizationType.Q8_0, chat_template=tiny_gguf.CHAT_TEMPLATE
  )


def test_serves_a_gguf_and_stops_cleanly_on_sigterm(gguf_file, tmp_path):
  env = {**os.environ, "JAXEFF_CACHE_DIR": str(tmp_path / "cache"), "JAXEFF_API_KEY": "k"}
  cmd = [
    sys.executable,
    "-m",
    "jaxeff.serve",
    "--hf",
    str(gguf_file),
    "--quant",
    "gguf",
    "--port",
    "0",
    "--max-batch",
    "2",
    "--max-seq-len",
    "128",
    "--prefill-chunk",
    "32",
    "--shutdown-timeout",
    "20",
    "--kv-cache-memory",  # the default cache: paged
    "2MiB",
    "--token-budget",
    "64",
  ]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    line = proc.stdout.readline()
    match = re.match(r"serving tiny-chat.gguf on (http://127\.0\.0\.1:\d+/v1) .*API key required", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = match.group(1)
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()

    # The answer is the stored-blocks model's greedy continuation of the chat template's text.
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny-chat.gguf", messages=messages, max_tokens=8, temperature=0)
    model, tok = jaxeff.load(gguf_file, quant="gguf")
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    expected = Generator(model, max_batch=1, max_seq_len=64).generate(
      [ids], max_new_tokens=8, stop_tokens=tok.stop_tokens
    )[0]
    assert r.choices[0].message.content == tok.decode(expected)
    # The same conversation again: its prompt's blocks come from the prefix cache (on by default).
    again = client.chat.completions.create(model="tiny-chat.gguf", messages=messages, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content
    metrics = httpx2.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": "Bearer k"}).text
    hit = float(re.search(r"^jaxeff_prefix_cache_hit_tokens_total (\S+)", metrics, re.M).group(1))
    assert hit >= 16 * (len(ids) // 16 - 1) and hit > 0, metrics
    assert re.search(r'jaxeff_kv_cache_bytes\{policy="paged"\} 2\.0\d*e\+06', metrics), metrics

    # SIGTERM while a stream runs: the stream still ends properly ([DONE]) and the process exits 0.
    chunks, done = [], threading.Event()

    def stream():
      s = client.completions.create(
        model="tiny-chat.gguf", prompt="a", max_tokens=100, stream=True, extra_body={"ignore_eos": True}
      )
      for c in s:
        chunks.append(c)
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert done.wait(60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.stderr.read()
    thread.join(60)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 100
    with pytest.raises(openai.APIConnectionError):
      client.models.list()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_bad_usage_is_one_error_line(tmp_path, capsys):
  assert main(["--port", "1"]) == 2
  assert main(["--hf", str(tmp_path / "missing.gguf"), "--no-warmup"]) == 2
  assert main(["--hf", "x.gguf", "--max-batch", "0"]) == 2
  assert main(["--hf", "x.gguf", "--kv-cache", "dense", "--kv-cache-memory", "1GiB"]) == 2
  assert main(["--hf", "x.gguf", "--kv-cache", "paged", "--kv-cache-memory", "lots"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
  assert "one of the arguments --checkpoint --hf is required" in err[0]
  assert "no such file or directory" in err[1] and "--max-batch must be >= 1" in err[2]
  assert "--kv-cache-memory sizes the paged cache, not --kv-cache dense" in err[3]
  assert "bytes with a unit (e.g. 2GiB, 512MiB) or a fraction like 0.5, got 'lots'" in err[4]


def test_the_default_cache_is_paged_unless_the_mesh_splits_the_batch():
  assert parse_args(["--hf", "x.gguf"]).kv_policy.name == "paged"
  assert parse_args(["--hf", "x.gguf", "--mesh", "tensor=2"]).kv_policy.name == "paged"
  assert parse_args(["--hf", "x.gguf", "--mesh", "data=2"]).kv_policy.name == "dense"
  assert parse_args(["--hf", "x.gguf", "--kv-cache", "dense"]).kv_policy.name == "dense"


@pytest.mark.parametrize(
  "text, value",
  [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("100000", 100000), ("0.5", 0.5)],
)
def test_memory_sizes(text, value):
  assert cli.parse_memory(text) == value and type(cli.parse_memory(text)) is type(value)


@pytest.mark.parametrize("text", ["0.0", "1.5", "2XB", "-1GiB", ""])
def test_bad_memory_sizes(text):
  with pytest.raises(cli.UsageError):
    cli.parse_memory(text)


def test_a_failed_engine_fails_its_requests_and_exits_1(gguf_file, tmp_path):
  """The scheduler's own code raises (not one request's program): the request in flight gets 503,
  the engine logs one line naming the cause, and the server exits 1 on its own."""
  script = (
    "import sys\n"
    "from jaxeff.serve import __main__, engine\n"
    "def broken_step(self):\n"
    "  raise RuntimeError('injected scheduler failure')\n"
    "engine.Engine._paged_iteration = broken_step\n"
    "sys.exit(__main__.main(sys.argv[1:]))\n"
  )
  args = ["--hf", str(gguf_file), "--quant", "gguf", "--port", "0", "--max-seq-len", "64", "--no-warmup"]
  env = {**os.environ, "JAXEFF_CACHE_DIR": str(tmp_path / "cache")}
  cmd = [sys.executable, "-c", script, *args]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    line = proc.stdout.readline()
    match = re.match(r"serving tiny-chat.gguf on (http://127\.0\.0\.1:\d+/v1) ", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    client = openai.OpenAI(base_url=match.group(1), api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError, match="injected scheduler failure") as failed:
      client.completions.create(model="tiny-chat.gguf", prompt="a", max_tokens=8)
    assert failed.value.status_code == 503
    assert proc.wait(60) == 1
    causes = [line for line in proc.stderr.read().splitlines() if "injected scheduler failure" in line]
    # orbax's absl logging calls logging.basicConfig() at import, so the root logger echoes every
    # jaxeff line in its own format ("ERROR:jaxeff....").
    causes = [line for line in causes if not line.startswith("ERROR:jaxeff.")]
    assert len(causes) == 1 and causes[0].startswith("the engine failed: RuntimeError"), causes
  finally:
    if proc.poll() is None:
      proc.kill()


def test_serves_with_speculation_on_a_mesh_and_with_a_cache_policy(gguf_file, tmp_path):
  """--speculate lookup on a 2-device tensor mesh, then --kv-cache: the server's answers are the
  plain model's greedy tokens (exact), and /metrics reports speculation and the cache's bytes."""
  from helpers import cpu_env

  model, tok = jaxeff.load(gguf_file, quant="gguf")
  prompt = "abcabcabcabc"
  ids = tok.encode(prompt)
  expected = tok.decode(Generator(model, max_batch=1, max_seq_len=64).generate([ids], max_new_tokens=12)[0])
  runs = {
    "speculate": ["--speculate", "lookup", "--draft-tokens", "3", "--mesh", "tensor=2"],
    "kv_cache": ["--kv-cache", "h2o:32,32", "--no-warmup"],
  }
  for name, flags in runs.items():
    env = cpu_env(2, JAXEFF_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "jaxeff.serve", "--hf", str(gguf_file), "--quant", "gguf", "--port", "0"]
    cmd += ["--max-batch", "2", "--max-seq-len", "64", "--prefill-chunk", "16", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
      line = proc.stdout.readline()
      match = re.match(r"serving tiny-chat.gguf on (http://127\.0\.0\.1:\d+/v1) ", line)
      assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
      assert ("mesh tensor=2" in line and "PromptLookup" in line) if name == "speculate" else "H2O" in line, line
      client = openai.OpenAI(base_url=match.group(1), api_key="none", max_retries=0)
      answers = [None] * 3

      def ask(i):
        answers[i] = client.completions.create(
          model="tiny-chat.gguf", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )

      threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
      for t in threads:
        t.start()
      for t in threads:
        t.join(120)
      assert [a.choices[0].text for a in answers] == [expected] * 3
      metrics = httpx2.get(match.group(1).removesuffix("/v1") + "/metrics").text
      assert re.search(r'jaxeff_kv_cache_bytes\{policy="(paged|H2O)"\} [1-9]', metrics), metrics
      if name == "speculate":
        accepted = float(re.search(r"^jaxeff_accepted_tokens_total (\S+)", metrics, re.M).group(1))
        assert accepted > 0 and "jaxeff_request_tokens_per_forward_count 3.0" in metrics
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(60) == 0, proc.stderr.read()
    finally:
      if proc.poll() is None:
        proc.kill()
