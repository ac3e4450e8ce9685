"""`python -m jaxeff.bench serve --quick`: the load generator, a live jaxeff server and the static
batch baseline end to end on a tiny GGUF (llama.cpp's server is the full run's: it crashes on the
tiny test vocabulary, so the quick run leaves it out)."""

import json

import gguf
import pytest
import tiny_gguf

from jaxeff.bench import serve


@pytest.mark.slow
def test_quick_load_run_reports_every_level(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  path = tiny_gguf.write_gguf(
    tmp_path / "tiny.gguf", tiny_gguf.hf_tiny("llama"), "llama", quant=gguf.GGMLQuantizationType.Q8_0
  )
  out = tmp_path / "serve.json"
  assert serve.main(["--quick", "--gguf", str(path), "--no-llama-cpp", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  by = {(r["server"].split(" <=")[0], r["clients"]): r for r in rows}
  assert set(by) == {(s, c) for s in ("jaxeff serve", "jaxeff static batch") for c in (1, 2)}
  for (server, _), r in by.items():
    assert r["tokens_per_s"] > 0 and r["requests"] >= 2
    if server == "jaxeff serve":
      assert 0 < r["ttft_p50"] <= r["ttft_p99"] and 0 < r["itl_p50"] <= r["itl_p99"]


def test_goals_are_judged_from_the_rows():
  rows = [
    {"server": "jaxeff serve", "clients": 1, "tokens_per_s": 30.0, "itl_p50": 0.03, "itl_p99": 0.04},
    {"server": "jaxeff serve", "clients": 8, "tokens_per_s": 100.0, "itl_p50": 0.08, "itl_p99": 0.05},
    {"server": "llama.cpp server", "clients": 8, "tokens_per_s": 80.0, "itl_p50": 0.01, "itl_p99": 0.02},
  ]
  lines = serve.goals(rows)
  assert lines[0].startswith("8-client / 1-client throughput: 3.33x") and lines[0].endswith("met")
  assert "1.67x" in lines[1] and lines[1].endswith("met")
  assert "1.25x" in lines[2] and lines[2].endswith("missed")
