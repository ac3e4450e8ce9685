"""`python -m jaxeff.bench optimizers --quick` runs end to end and reports every field."""

import json
import math

from jaxeff.bench import optimizers as bench


def test_quick_run_reports_finite_numbers(tmp_path, capsys):
  assert bench.main(["--quick", "--steps", "10", "--optimizers", "osd", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "| optimizer | best lr | final val loss |" in out and "Goals:" in out
  result = json.loads((tmp_path / "optimizers.json").read_text())
  assert set(result["summary"]) == {"adamw", "osd"}
  for s in result["summary"].values():
    assert math.isfinite(s["final_val"]) and s["step_time_ratio"] > 0 and s["state_ratio"] > 0
  assert result["summary"]["adamw"]["state_ratio"] == 1.0 and result["summary"]["osd"]["state_ratio"] < 1.0
  assert (tmp_path / "optimizers.png").stat().st_size > 1000


def test_steps_to_target():
  assert bench.steps_to({10: 3.0, 20: 2.5, 30: 2.4}, 2.5) == 20
  assert bench.steps_to({10: 3.0}, 2.5) is None
