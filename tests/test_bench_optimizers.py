"""`python -m jaxeff.bench optimizers`: the --quick smoke run, the sweep/seed/target logic, resuming,
bad input, and the low-rank state table at several ranks."""

import json
import math
import subprocess
import sys

import helpers
import pytest

from jaxeff.bench import optimizers as bench


@pytest.mark.slow
def test_quick_run_reports_every_field(tmp_path, capsys):
  # Through the CLI as users run it (its own 4 fake devices, not the suite's 8): before the
  # projectors' SVDs ran one matrix at a time on CPU, this run hung in GaLore's first refresh.
  out = tmp_path / "res"
  env = helpers.cpu_env()
  cmd = [
    sys.executable,
    "-m",
    "jaxeff.bench",
    "optimizers",
    "--quick",
    "--steps",
    "6",
    "--optimizers",
    "osd,galore",
    "--out",
    str(out),
  ]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  except subprocess.TimeoutExpired:
    pytest.fail("the --quick run did not finish in 300 s (a hung multi-device SVD?)")
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout
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
  # Every goal has a line; those whose optimizers did not run say so, and one lr and one seed
  # (--quick) decide none of the loss goals (state and projector timing need no sweep).
  assert len(result["goals"]) == len(bench.GOALS)
  by_training = [g for g in result["goals"] if not g["goal"].startswith(("osd state", "osd projector"))]
  assert len(by_training) == 6 and all(g["met"] is None for g in by_training)
  measured = [g["goal"] for g in result["goals"] if "not measured" not in g["goal"]]
  assert {g.split()[0] for g in measured} == {"osd"}
  assert "c_adamw steps to AdamW's final loss <= 0.8x: not measured (no finished run of c_adamw)" in text
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

  # --report trains nothing: same runs, every optimizer's state, fresh timings of the ones that ran.
  assert bench.main(["--quick", "--steps", "6", "--out", str(out), "--report"]) == 0
  reported = json.loads((out / "optimizers_cpu.json").read_text())
  assert reported["runs"] == result["runs"]
  opt = reported["summary"]["optimizers"]
  assert set(opt) == set(bench.SWEEP) and opt["muon"] == {**opt["muon"], "best_lr": None, "runs": 0}
  assert opt["muon"]["state_ratio"] > 0 and "step_time_ratio" not in opt["muon"]
  assert opt["galore"]["step_time_ratio"] > 0 and reported["projector"]["ratio"] > 0
  # The state goal needs no training: decided for OSD whether or not it ran.
  assert [g["met"] is None for g in reported["goals"] if g["goal"].startswith("osd state")] == [False]
  assert "| muon | - | - | not run |" in capsys.readouterr().out
  assert bench.main(["--quick", "--out", str(tmp_path / "none"), "--report"]) == 2
  assert "needs a results file" in capsys.readouterr().err


@pytest.mark.parametrize(
  "argv,msg",
  [
    (["--optimizers", "sgdd"], "unknown optimizer"),
    (["--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--batch-size", "30", "--workers", "4"], "divisible"),
    (["--seeds", "0"], "--seeds"),
  ],
)
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
  return {"name": name, "lr": lr, "seed": seed, "final_val": final, "diverged": diverged, "val": {0: 5.0, 10: final}}


def test_grid_runs_middle_out():
  assert bench.middle_out([1.0, 2.0, 4.0, 8.0, 16.0]) == [4.0, 2.0, 8.0, 1.0, 16.0]
  for grid in bench.SWEEP.values():
    assert sorted(bench.middle_out(grid)) == sorted(grid)


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
  setup = bench.Setup(
    model={}, steps=10, batch_size=8, seq_len=8, workers=1, warmup=1, eval_every=10, eval_batches=1, data="x"
  )
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


def test_goals_on_partial_results():
  """A goal is decided only when the protocol finished for every optimizer it compares."""
  setup = bench.Setup(
    model={}, steps=10, batch_size=8, seq_len=8, workers=1, warmup=1, eval_every=10, eval_batches=1, data="x"
  )
  lrs = [1.0, 2.0, 4.0, 8.0, 16.0]
  runs = [_run("adamw", lr, 0, 2.0 + abs(lr - 4.0) / 10) for lr in lrs]
  runs += [_run("adamw", 4.0, s, 2.0) for s in (1, 2)]
  runs += [_run("c_adamw", lr, 0, 1.5 + abs(lr - 4.0) / 10) for lr in lrs]
  runs += [_run("c_adamw", 4.0, s, 1.5) for s in (1, 2)]
  runs += [_run("muon", lr, 0, 1.0 + lr / 10) for lr in lrs[:3]]  # best at the edge, one seed
  summary = bench.summarize(runs, ["adamw", "c_adamw", "muon", "osd"], setup, {}, seeds_wanted=3)
  opt = summary["optimizers"]
  assert opt["c_adamw"]["complete"] and not opt["muon"]["complete"]
  assert opt["osd"] == {"best_lr": None, "runs": 0, "complete": False}
  lines = dict(bench.goals(summary, None))
  c_steps = [t for t in lines if t.startswith("c_adamw steps")][0]
  # Complete: decided. Curves 5.0 -> 1.5 reach the target 2.0 at (5 - 2) / (5 - 1.5) = 0.86 of the run.
  assert lines[c_steps] is False and "0.86x" in c_steps
  muon = [t for t in lines if t.startswith("muon steps")][0]
  assert lines[muon] is None and "partial sweep" in muon and "3 lrs, best at the edge, 1 seed" in muon
  osd = [t for t in lines if t.startswith("osd final loss within 2% of adamw's")]
  assert osd and lines[osd[0]] is None and "not measured" in osd[0]
  assert bench.verdict(None) == "not decided" and bench.verdict(False) == "missed"


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
