"""`python -m jaxeff.bench optimizers`: the --quick smoke run, the sweep/seed/target logic, resuming,
bad input, and the low-rank state table at several ranks."""

import json
import math

import pytest

from jaxeff.bench import optimizers as bench


def test_quick_run_reports_every_field(tmp_path, capsys):
  out = tmp_path / "res"
  assert bench.main(["--quick", "--steps", "6", "--optimizers", "osd,galore", "--out", str(out)]) == 0
  text = capsys.readouterr().out
  assert "| optimizer | lrs tried | best lr |" in text and "Goals:" in text and "rank 8" in text
  result = json.loads((out / "optimizers_cpu.json").read_text())
  assert {r["name"] for r in result["runs"]} == {"adamw", "osd", "galore"}
  for r in result["runs"]:
    assert set(r["val"]) == {"0", "6"} and math.isfinite(r["final_val"])
  opt = result["summary"]["optimizers"]
  for s in opt.values():
    assert math.isfinite(s["final_mean"]) and s["step_time_ratio"] > 0 and s["state_ratio"] > 0
  assert opt["adamw"]["state_ratio"] == 1.0 and opt["adamw"]["step_time_ratio"] == 1.0
  assert result["projector"]["svd_refresh_ms"] > 0 and result["projector"]["osd_projector_ms"] > 0
  assert {g["goal"].split()[0] for g in result["goals"]} == {"osd"}  # the goals whose optimizers ran
  assert set(result["state_ratios"]) == {"osd", "galore"}
  assert (out / "optimizers_cpu.png").stat().st_size > 1000

  # An existing results file is never overwritten without --resume.
  before = (out / "optimizers_cpu.json").read_text()
  assert bench.main(["--quick", "--steps", "6", "--optimizers", "osd", "--out", str(out)]) == 2
  assert "--resume" in capsys.readouterr().err
  assert (out / "optimizers_cpu.json").read_text() == before
  # --resume with other settings refuses too (the saved runs would not be comparable).
  assert bench.main(["--quick", "--steps", "8", "--optimizers", "osd", "--out", str(out), "--resume"]) == 2
  assert "different setup" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--optimizers", "sgdd"], "unknown optimizer"),
    (["--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--batch-size", "30", "--workers", "4"], "divisible"),
    (["--seeds", "0"], "--seeds"),
])
def test_bad_input_is_one_error_line(argv, msg, tmp_path, capsys):
  assert bench.main(argv + ["--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and msg in err and err.count("\n") == 1
  assert not list(tmp_path.iterdir())


def test_steps_to_target_interpolates():
  curve = {0: 5.0, 10: 3.0, 20: 2.5, 30: 2.4}
  assert bench.steps_to(curve, 2.5) == 20
  assert bench.steps_to(curve, 2.75) == pytest.approx(15.0)
  assert bench.steps_to(curve, 2.45) == pytest.approx(25.0)
  assert bench.steps_to(curve, 6.0) == 0.0
  assert bench.steps_to(curve, 2.0) is None


def _run(name, lr, seed, final, diverged=False):
  return {"name": name, "lr": lr, "seed": seed, "final_val": final, "diverged": diverged,
          "val": {0: 5.0, 10: final}}


def test_sweep_widens_until_the_best_is_inside():
  runs = [_run("a", lr, 0, f) for lr, f in [(1.0, 3.0), (2.0, 2.9), (4.0, 2.8)]]
  assert bench.best_lr(runs, "a") == 4.0 and bench.next_lr(runs, "a", max_lrs=9) == 8.0
  runs.append(_run("a", 8.0, 0, float("inf"), diverged=True))  # diverged: worse than any
  assert bench.next_lr(runs, "a", max_lrs=9) is None  # best 4.0 is now inside
  runs = [_run("b", lr, 0, f) for lr, f in [(1.0, 2.0), (2.0, 2.9)]]
  assert bench.next_lr(runs, "b", max_lrs=9) == 0.5 and bench.next_lr(runs, "b", max_lrs=2) is None
  # Seeds > 0 never decide the best learning rate.
  runs.append(_run("b", 2.0, 1, 1.0))
  assert bench.best_lr(runs, "b") == 1.0


def test_summary_target_is_baseline_mean_over_seeds():
  setup = bench.Setup(model={}, steps=10, batch_size=8, seq_len=8, workers=1, warmup=1, eval_every=10,
                      eval_batches=1, data="x")
  runs = [_run("adamw", 1.0, s, f) for s, f in enumerate([2.0, 2.2, 2.4])]
  runs += [_run("adamw", 2.0, 0, 2.5)]
  runs += [_run("x", 3.0, s, f) for s, f in enumerate([1.5, 2.1, 2.3])]
  summary = bench.summarize(runs, ["adamw", "x"], setup, {})
  assert summary["target"] == pytest.approx(2.2)
  x = summary["optimizers"]["x"]
  assert x["best_lr"] == 3.0 and x["seeds"] == 3 and x["reached"] == 2  # 2.3 > 2.2: not reached
  assert x["final_mean"] == pytest.approx(5.9 / 3)
  # Curves 5.0 -> final at step 10, interpolated: (5 - 2.2) / (5 - final) * 10.
  assert x["steps_to_target"][0] == pytest.approx(2.8 / 3.5 * 10)


def test_state_ratio_table_at_several_ranks():
  """GaLore keeps Adam moments r x big and P r x small per projected matrix, OSD also P's two
  AdamW moments: 2 r big + r small vs 2 r big + 3 r small, against AdamW's 2 m n."""
  from flax import nnx

  from jaxeff.config import ModelConfig
  from jaxeff.models import Llama

  cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
  abstract = nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  table = bench.state_ratio_table(abstract, ["adamw", "osd", "galore", "lion"], [16, 32, 64])
  assert set(table) == {"osd", "galore"}  # the optimizers that take a rank
  # Per layer [in, out]: q and o 128x128, k and v 128x64, gate and up 128x256, down 256x128.
  mats = [(128, 128)] * 2 + [(128, 64)] * 2 + [(128, 256)] * 3
  adamw = 2 * sum(m * n for m, n in mats)
  for r in (16, 32, 64):
    galore = sum(2 * min(r, min(s)) * max(s) + min(r, min(s)) * min(s) for s in mats)
    osd = sum(2 * min(r, min(s)) * max(s) + 3 * min(r, min(s)) * min(s) for s in mats)
    assert table["galore"][str(r)]["projected_matrices"] == pytest.approx(galore / adamw)
    assert table["osd"][str(r)]["projected_matrices"] == pytest.approx(osd / adamw)
  # Embeddings, LM head and norms keep full AdamW state: the whole model's ratio is higher.
  assert table["osd"]["32"]["model"] > table["osd"]["32"]["projected_matrices"]
