"""`python -m jaxeff.bench kv_cache --quick`: every measurement runs end to end on a tiny model."""

import json

from jaxeff.bench import kv_cache


def test_quick_run_reports_budget_long_text_and_decode(tmp_path):
  out = tmp_path / "kv.json"
  assert kv_cache.main(["--quick", "--json", str(out)]) == 0
  record = json.loads(out.read_text())
  assert [r["budget"] for r in record["budget"]] == [32, 51, 64]  # 51: 20% of the 256-token context
  assert all(r["streaming"] > 0 and r["window_only"] > 0 and r["h2o"] > 0 for r in record["budget"])
  long = record["long"]["perplexity"]
  assert len(long) == 3 and all(len(v) == len(record["long"]["starts"]) for v in long.values())
  decode = record["decode"]
  assert len(decode) == 4 and all(r["tok_s"] > 0 for r in decode)
  ring = [r["cache_bytes"] for r in decode if r["cache"] != "dense"]
  dense = [r["cache_bytes"] for r in decode if r["cache"] == "dense"]
  assert ring[0] == ring[1] and dense[0] < dense[1]  # flat against growing
