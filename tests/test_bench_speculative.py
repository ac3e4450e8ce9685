"""`python -m jaxeff.bench speculative --quick`: every contender runs, Medusa rows included (heads
saved for the quick model), and each speculator's tokens equal plain decoding's."""

import json

import numpy as np
from flax import nnx

from jaxeff.bench import speculative as bench
from jaxeff.generate.speculative import medusa_heads


def test_quick_run_measures_every_speculator_exactly(tmp_path):
  model = bench.quick_model()
  heads = medusa_heads.MedusaHeads(model.cfg.hidden_size, num_heads=2, rngs=nnx.Rngs(0))
  acceptance = np.asarray([[0.6, 0.2, 0.1], [0.4, 0.2, 0.1]])
  info = medusa_heads.MedusaInfo.for_heads(heads, model, base_path="quick", acceptance=acceptance.tolist())
  path = medusa_heads.save_heads(tmp_path / "heads", heads, info=info)
  out = tmp_path / "spec.json"
  assert bench.main(["--quick", "--rounds", "1", "--medusa", str(path), "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  names = {r["name"] for r in rows}
  assert {"jaxeff plain", "jaxeff lookup k=8", "jaxeff medusa chain (3 nodes)"} <= names
  assert any(n.startswith("jaxeff medusa tree") and "hardware-aware" in n for n in names)
  assert len(rows) == 3 * len(names)  # every contender on the three prompt kinds
  for r in rows:
    assert r["tok_s"] > 0 and r["new_tokens"] == 16
    assert r["exact"] is (None if r["name"] == "jaxeff plain" else True)
