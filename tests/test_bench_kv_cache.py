"""`python -m jaxeff.bench kv_cache --quick`: every measurement runs end to end on a tiny model."""

import json

import pytest

from jaxeff.bench import kv_cache


@pytest.mark.slow
def test_quick_run_reports_budget_long_text_decode_and_passkey(tmp_path):
  out = tmp_path / "kv.json"
  assert kv_cache.main(["--quick", "--json", str(out)]) == 0
  record = json.loads(out.read_text())
  assert [r["budget"] for r in record["budget"]] == [32, 51, 64]  # 51: 20% of the 256-token context
  assert all(r["streaming"] > 0 and r["window_only"] > 0 and r["h2o"] > 0 and r["snapkv"] > 0 for r in record["budget"])
  kivi = {r["bits"]: r for r in record["kivi"]}
  assert kivi[2]["cache_bytes"] < kivi[4]["cache_bytes"] < kivi[4]["dense_f32_bytes"]
  assert all(r["perplexity"] > 0 for r in kivi.values())
  long = record["long"]["perplexity"]
  assert len(long) == 3 and all(len(v) == len(record["long"]["starts"]) for v in long.values())
  decode = record["decode"]
  assert len(decode) == 8 and all(r["tok_s"] > 0 for r in decode)
  by_cache = {}
  for r in decode:
    by_cache.setdefault(r["cache"], []).append(r["cache_bytes"])
  for label, (short, long) in by_cache.items():  # bounded caches flat, dense and KIVI growing
    assert (short == long) == label.startswith(("StreamingLLM", "H2O")), label
  passkey = record["passkey"]["found"]
  assert set(passkey) == {"dense", "StreamingLLM 4+44", "H2O 24+24", "SnapKV 48", "KIVI-4", "KIVI-2"}
