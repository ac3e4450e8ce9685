"""`python -m jaxeff.bench serve --quick`: the load generator, live jaxeff servers and the static
batch baseline end to end on a tiny GGUF, for the load workload and the chat, capacity and prefill
ones. llama.cpp's servers are the full run's and are left out of these: llama-cpp-python's server
crashes on the tiny test vocabulary, and llama-server is a build of minutes that tests never start
(`llama_server.ensure_built` is tested with a fake source and a fake cmake); where a benchmark run
has built it, one test serves the tiny GGUF with it (skipped, and saying so, where it is not built)."""

import io
import json
import os
import pathlib
import stat
import tarfile

import gguf
import pytest
import tiny_gguf

from jaxeff.bench import llama_server, serve

CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_LLAMA = ["--no-llama-cpp", "--no-llama-server"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny Q8_0 GGUF with a chat template, and one compile cache for every server of this file."""
  root = tmp_path_factory.mktemp("bench-serve")
  path = tiny_gguf.write_gguf(
    root / "tiny.gguf", tiny_gguf.hf_tiny("llama"), "llama", quant=gguf.GGMLQuantizationType.Q8_0, chat_template=CHATML
  )
  return path, root / "cache"


def _run(tiny, tmp_path, monkeypatch, *argv) -> dict:
  path, cache = tiny
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(cache))
  out = tmp_path / "serve.json"
  assert serve.main(["--quick", "--gguf", str(path), "--json", str(out), *argv]) == 0
  return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_load_run_reports_every_level(tiny, tmp_path, monkeypatch):
  rows = _run(tiny, tmp_path, monkeypatch, *NO_LLAMA)["rows"]
  by = {(r["server"].split(" <=")[0], r["clients"]): r for r in rows}
  assert set(by) == {(s, c) for s in ("jaxeff serve", "jaxeff static batch") for c in (1, 2)}
  for (server, _), r in by.items():
    assert r["tokens_per_s"] > 0 and r["requests"] >= 2
    if server == "jaxeff serve":
      assert 0 < r["ttft_p50"] <= r["ttft_p99"] and 0 < r["itl_p50"] <= r["itl_p99"]


@pytest.mark.slow
def test_quick_chat_compares_answers_between_jaxeff_servers(tiny, tmp_path, monkeypatch):
  # Two servers of today's flags (the dense cache): the machinery of the with/without prefix caching
  # rows, whose answers must be equal (greedy); the hit rate reads n/a without prefix-cache counters.
  variants = "jaxeff a=--kv-cache dense;jaxeff b=--kv-cache dense"
  rows = _run(tiny, tmp_path, monkeypatch, "--workload", "chat", "--variants", variants, *NO_LLAMA)["rows"]
  assert [r["server"] for r in rows] == ["jaxeff a", "jaxeff b"]
  for r in rows:
    assert r["workload"] == "chat" and r["requests"] == r["clients"] * r["turns"] == 4
    assert 0 < r["ttft_p50"] <= r["ttft_p99"] and r["tokens_per_s"] > 0 and r["prompt_tokens"] > 0
    assert r["same_answers"] == "4/4" and r["prefix_hit_rate"] in (None, 0.0)


@pytest.mark.slow
def test_quick_capacity_samples_running_requests(tiny, tmp_path, monkeypatch):
  # 4 clients on 2 slots: both slots busy nearly all the run, so the sampled gauge reads 2.
  variants = "jaxeff 2 slots=--max-batch 2 --max-seq-len 128"
  rows = _run(tiny, tmp_path, monkeypatch, "--workload", "capacity", "--variants", variants, *NO_LLAMA)["rows"]
  (r,) = rows
  assert r["server"] == "jaxeff 2 slots" and r["workload"] == "capacity" and r["clients"] == 4
  assert r["requests"] == 8 and r["short_requests"] == 0 and r["tokens_per_s"] > 0
  assert r["peak_running"] == 2


@pytest.mark.slow
def test_quick_prefill_reports_speed_and_mfu(tiny, tmp_path, monkeypatch):
  out = _run(tiny, tmp_path, monkeypatch, "--workload", "prefill", *NO_LLAMA)
  assert out["meta"]["matmul_peak_flops"] > 0 and out["meta"]["matmul_params"] > 0
  rows = out["rows"]
  assert [(r["server"], r["prompt_tokens"]) for r in rows] == [("jaxeff serve", 16), ("jaxeff serve", 48)]
  for r in rows:
    assert r["ttft"] > 0 and r["prompt_tokens_per_s"] == pytest.approx(r["prompt_tokens"] / r["ttft"])
    assert 0 < r["mfu"] < 1 and r["server_prompt_ms"] is None


def test_goals_are_judged_from_the_rows():
  rows = [
    {"server": "jaxeff serve", "clients": 1, "tokens_per_s": 30.0, "itl_p50": 0.03, "itl_p99": 0.04},
    {"server": "jaxeff serve", "clients": 8, "tokens_per_s": 100.0, "itl_p50": 0.08, "itl_p99": 0.05},
    {"server": "llama.cpp server", "clients": 8, "tokens_per_s": 80.0, "itl_p50": 0.01, "itl_p99": 0.02},
    {"server": serve.LLAMA_SERVER, "clients": 8, "tokens_per_s": 200.0, "itl_p50": 0.01, "itl_p99": 0.02},
  ]
  lines = serve.goals(rows)
  assert lines[0].startswith("8-client / 1-client throughput: 3.33x") and lines[0].endswith("met")
  assert "1.67x" in lines[1] and lines[1].endswith("met")
  assert "1.25x" in lines[2] and lines[2].endswith("missed")
  assert lines[3] == "8 clients, jaxeff / llama-server throughput: 0.50x"


def test_chat_and_capacity_goals_compare_the_second_jaxeff_row_with_the_first():
  chat = {"workload": "chat", "kind": "jaxeff"}
  capacity = {"workload": "capacity", "kind": "jaxeff", "tokens_per_s": 50.0}
  rows = [
    chat | {"server": "jaxeff no prefix caching", "ttft_p50": 1.0, "same_answers": "32/32"},
    {"server": "jaxeff prefix caching", "kind": "jaxeff", "skipped": "no such flag"},
    chat | {"server": "jaxeff prefix caching", "ttft_p50": 0.1, "same_answers": "31/32"},
    chat | {"server": serve.LLAMA_SERVER, "kind": "llama-server", "ttft_p50": 0.01},
    capacity | {"server": "jaxeff dense", "peak_running": 8},
    capacity | {"server": "jaxeff paged", "peak_running": 40, "tokens_per_s": 55.0},
  ]
  chat_line, capacity_line = serve.goals(rows)
  assert "jaxeff no prefix caching / jaxeff prefix caching: 10.00x" in chat_line and "31/32" in chat_line
  assert chat_line.endswith("missed")  # 10x, but one answer differs
  assert "peak running 5.00x" in capacity_line and "tok/s 1.10x" in capacity_line and capacity_line.endswith("met")
  rows[2]["same_answers"] = "32/32"
  assert serve.goals(rows)[0].endswith("met")


def test_json_rows_check_answers_against_their_schemas_and_judge_the_goal():
  # (No --quick json run here: a jaxeff server start costs ~20 s, over this file's budget.)
  import jsonschema

  for _, _, schema in serve.JSON_SCHEMAS:
    jsonschema.Draft202012Validator.check_schema(schema)
  script = serve.json_script(2, 2, seed=0, passage_chars=(40, 60))
  assert [q["name"] for mine in script for q in mine] == ["speaker", "summary", "characters", "sentiment"]
  assert serve.json_script(2, 2, seed=0, passage_chars=(40, 60)) == script  # seeded
  assert serve.response_format(script[0][0])["json_schema"]["schema"]["required"] == ["speaker", "addressee", "mood"]
  texts = [
    '{"speaker": "KING", "addressee": "Lear", "mood": "sad"}',  # valid
    '{"summary": "x", "keywords": []}',  # parses; minItems 1 broken
    '```json\n{"characters": [{"name": "A", "role": "king"}]}\n```',  # fenced: does not parse
    '{"sentiment": "neutral", "confidence": 0.5, "intensity": 3}',  # valid
  ]
  results = [{"ttft": 0.1 * (i + 1), "itl": [0.01, 0.03], "tokens": 10, "text": t} for i, t in enumerate(texts)]
  row = serve.json_row("j constrained", script, {"results": results, "seconds": 2.0}, True, (40.0, 0.002))
  assert (row["parsed"], row["valid"], row["tokens_per_s"]) == (0.75, 0.5, 20.0)
  assert row["mask_us_per_token"] == pytest.approx(50.0) and row["ttft_p50"] == pytest.approx(0.25)
  before = {serve.GRAMMAR_MASKS: 10.0, serve.GRAMMAR_MASK_SECONDS: 0.5}
  assert serve.mask_delta(before, {serve.GRAMMAR_MASKS: 50.0, serve.GRAMMAR_MASK_SECONDS: 0.75}) == (40.0, 0.25)
  assert serve.mask_delta({}, {}) is None  # a server without grammar counters
  base = {"workload": "json", "kind": "jaxeff"}
  rows = [
    base | {"server": "j constrained", "constrained": True, "tokens_per_s": 45.0, "valid": 1.0},
    base | {"server": "j unconstrained", "constrained": False, "tokens_per_s": 50.0, "valid": 0.25},
    base | {"server": "ls constrained", "kind": "llama-server", "constrained": True, "tokens_per_s": 90.0},
  ]
  rows[0] |= {"itl_p50": 0.11, "tokens_per_request": 40.0}
  rows[1] |= {"itl_p50": 0.1, "tokens_per_request": 128.0}
  goal, context, anchor = serve.goals(rows)
  assert "j constrained / j unconstrained output tok/s: 0.90x, 100% valid" in goal and goal.endswith("met")
  assert context == (
    "json, constrained / unconstrained at their own lengths: output tok/s 0.90x, ITL p50 1.10x, "
    "tokens per answer 40.0 / 128.0"
  )
  assert anchor == "json, j constrained / ls constrained output tok/s: 0.50x"
  # With the same-lengths row, the goal compares with it (the anchor still with the plain row).
  rows.insert(2, base | {"server": "j same", "constrained": False, "same_lengths": True, "tokens_per_s": 60.0})
  goal, context, anchor = serve.goals(rows)
  assert "j constrained / j same output tok/s: 0.75x" in goal and goal.endswith("missed")
  assert "output tok/s 0.90x" in context and anchor.endswith("0.50x")
  rows[0]["valid"], rows[2]["tokens_per_s"] = 31 / 32, 45.0
  assert serve.goals(rows)[0].endswith("missed")


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--clients", "0"], "error: --clients must be >= 1, got 0"),
    (["--prompt-lengths", "64,x"], "error: --concurrency and --prompt-lengths take comma-separated whole numbers"),
    (["--gguf", "/nonexistent.gguf"], "error: no GGUF at /nonexistent.gguf (pip install -e '.[test]' installs"),
  ],
)
def test_bad_command_lines_get_one_error_line(argv, message, capsys):
  assert serve.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(message) and "\n" not in err, err


def test_metrics_text_and_prefix_hit_rate():
  text = (
    "# HELP jaxeff_requests_running Requests in a decode slot\n"
    "jaxeff_requests_running 3.0\n"
    'jaxeff_kv_cache_bytes{policy="dense"} 1048576.0\n'
    "jaxeff_prefix_cache_queried_tokens_total 400.0\n"
    "jaxeff_prefix_cache_hit_tokens_total 300.0\n"
    "llamacpp:requests_processing 5\n"
  )
  m = serve.parse_metrics(text)
  assert m["jaxeff_requests_running"] == 3 and m["jaxeff_kv_cache_bytes"] == 1 << 20
  assert m["llamacpp:requests_processing"] == 5
  before = {serve.PREFIX_QUERIED: 100.0, serve.PREFIX_HIT: 50.0}
  assert serve.prefix_hit_rate(before, m, []) == pytest.approx(250 / 300)
  # llama-server reports its slot cache per response; a server that reports neither: None ("n/a").
  responses = [{"prompt_tokens": 100, "cached_tokens": 0}, {"prompt_tokens": 300, "cached_tokens": 200}]
  assert serve.prefix_hit_rate({}, {}, responses) == 0.5
  assert serve.prefix_hit_rate({}, {}, [{"prompt_tokens": 100, "cached_tokens": None}]) is None
  assert [serve.size_flag(n) for n in (3 << 30, 720 << 20, 5 << 10, 1000)] == ["3GiB", "720MiB", "5KiB", "1000"]


def test_capacity_variant_gets_the_first_servers_cache_bytes(monkeypatch, tmp_path):
  # `{dense_bytes}` in a variant's flags becomes the KV-cache bytes the first jaxeff server reported.
  started = []

  class FakeServer:
    def __init__(self, cmd, env=None, log_path=None):
      started.append(cmd)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      pass

    def wait_ready(self, url, timeout=600, probe=None):
      pass

  monkeypatch.setattr(serve, "_Server", FakeServer)
  monkeypatch.setattr(serve, "read_metrics", lambda base: {serve.CACHE_BYTES: float(720 << 20)})
  args = serve._parser().parse_args([])
  variants = serve.parse_variants(serve.VARIANTS["capacity"])
  specs = serve.server_specs(variants, None, False)
  rows = serve.run_servers(specs, "m.gguf", args, {}, tmp_path, 2048, lambda label, *_: [{"server": label}])
  assert rows == [{"server": "jaxeff dense", "kind": "jaxeff"}, {"server": "jaxeff paged", "kind": "jaxeff"}]
  dense, paged = (" ".join(cmd) for cmd in started)
  assert "--kv-cache dense --max-batch 8 --max-seq-len 2048" in dense
  assert dense.count("--max-batch") == 1 and "--kv-cache-memory" not in dense
  assert "--kv-cache paged --kv-cache-memory 720MiB --max-batch 64 --max-seq-len 2048" in paged
  # No jaxeff server before it: the variant is skipped with its reason, nothing started.
  started.clear()
  rows = serve.run_servers(specs[1:], "m.gguf", args, {}, tmp_path, 2048, lambda *_: [])
  assert started == [] and rows[0]["skipped"].startswith("no earlier jaxeff server reported")


def test_a_server_that_does_not_start_is_a_skipped_row_with_its_error_line(tmp_path):
  # What a checkout without a variant's flags gives (e.g. main without --no-prefix-caching).
  args = serve._parser().parse_args([])
  specs = serve.server_specs({"jaxeff new": "--no-such-flag"}, None, False)

  def work(*_):
    raise AssertionError("a server that did not start got requests")

  rows = serve.run_servers(specs, tmp_path / "m.gguf", args, None, tmp_path, 64, work)
  assert rows == [
    {
      "server": "jaxeff new",
      "kind": "jaxeff",
      "skipped": "the server exited with 2: error: unrecognized arguments: --no-such-flag "
      "(see python -m jaxeff.serve --help)",
    }
  ]


def test_llama_server_row_when_a_benchmark_run_built_it(tiny, tmp_path):
  binary = llama_server.binary_path(llama_server.cache_dir())
  if not os.access(binary, os.X_OK):
    pytest.skip(f"no llama-server at {binary} (python -m jaxeff.bench serve builds it; tests never do)")
  path, _ = tiny
  args = serve._parser().parse_args([])
  prompts = [list(range(1, 17)), list(range(1, 49))]

  def work(label, kind, url, base):
    return serve.prefill_rows(label, serve.time_prefill(url, prompts, {}), 2.0)

  specs = serve.server_specs({}, binary, False)
  rows = serve.run_servers(specs, path, args, None, tmp_path, 128, work)
  assert [(r["server"], r["kind"], r["prompt_tokens"]) for r in rows] == [
    (serve.LLAMA_SERVER, "llama-server", 16),
    (serve.LLAMA_SERVER, "llama-server", 48),
  ]
  for r in rows:  # its own prompt time comes back in the response's timings
    assert 0 < r["server_prompt_ms"] <= r["ttft"] * 1e3 and r["prompt_tokens_per_s"] > 0


# ------------------------------------------------------------------ llama-server's build


def _fake_sdist(path: pathlib.Path) -> pathlib.Path:
  with tarfile.open(path, "w:gz") as tar:
    for name, text in (("vendor/llama.cpp/CMakeLists.txt", "project(x)\n"), ("README.md", "not llama.cpp\n")):
      data = text.encode()
      info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _fake_cmake(bin_dir: pathlib.Path, calls: pathlib.Path) -> None:
  """A `cmake` that logs its arguments and, when building, writes a runnable build/bin/llama-server."""
  bin_dir.mkdir()
  script = bin_dir / "cmake"
  script.write_text(
    "#!/bin/sh\n"
    f'echo "$@" >> {calls}\n'
    'if [ "$1" = "--build" ]; then mkdir -p "$2/bin" && printf "#!/bin/sh\\n" > "$2/bin/llama-server" '
    '&& chmod +x "$2/bin/llama-server"; fi\n'
  )
  script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_llama_server_is_built_once_from_the_vendored_source(tmp_path, monkeypatch):
  calls = tmp_path / "calls.txt"
  _fake_cmake(tmp_path / "bin", calls)
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
  lines = []
  where = tmp_path / "cache"
  binary = llama_server.ensure_built(where, ver="9.9.9", sdist=_fake_sdist(tmp_path / "s.tar.gz"), log=lines.append)
  assert binary == where / "build" / "bin" / "llama-server"
  assert (where / "llama.cpp" / "CMakeLists.txt").read_text() == "project(x)\n"  # vendor/llama.cpp only
  assert not (where / "llama.cpp" / "README.md").exists()
  configure, build = calls.read_text().splitlines()
  assert "-DLLAMA_CURL=OFF" in configure and "-DCMAKE_BUILD_TYPE=Release" in configure
  assert build.endswith("--target llama-server -j 2")
  assert lines[0].startswith("llama-server: building llama.cpp 9.9.9's server once") and "built in" in lines[1]
  # The second call reuses the binary: no cmake, no message.
  lines.clear()
  assert llama_server.ensure_built(where, ver="9.9.9", log=lines.append) == binary
  assert lines == [] and len(calls.read_text().splitlines()) == 2
  # The cache directory from the environment.
  monkeypatch.setenv(llama_server.ENV_DIR, str(where))
  assert llama_server.cache_dir() == where


def test_llama_server_left_out_with_one_line_when_it_cannot_be_built(tmp_path, monkeypatch):
  lines = []
  monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
  assert llama_server.ensure_built(tmp_path / "a", ver="9.9.9", log=lines.append) is None
  assert lines == ["llama-server: not built (cmake and a C++ compiler not found); its rows are left out"]
  _fake_cmake(tmp_path / "bin", tmp_path / "calls.txt")
  monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin")
  lines.clear()
  bad = tmp_path / "bad.tar.gz"
  with tarfile.open(bad, "w:gz"):
    pass
  assert llama_server.ensure_built(tmp_path / "b", ver="9.9.9", sdist=bad, log=lines.append) is None
  assert lines == ["llama-server: not built (bad.tar.gz has no vendor/llama.cpp); its rows are left out"]
  assert not (tmp_path / "b" / "llama.cpp").exists()
