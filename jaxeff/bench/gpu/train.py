"""Section 6, train: configs/125m.yaml's model, the engine's train step per optimizer (adamw, c_adamw,
lion, muon, galore, osd): tokens/s, MFU against section 1's measured bf16 rate, step time relative
to AdamW."""

from __future__ import annotations

import itertools
import statistics
import time
import traceback

import jax
import numpy as np

from jaxeff import training
from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run, fmt, one_line


def measure(run: Run) -> list[dict]:
  """The training engine's own step (`jaxeff.training.Trainer`) on the config's model, per optimizer."""
  s = run.sizes
  path = common.REPO / "configs" / f"{s.train_config}.yaml"
  batch, seq = s.train_batch
  base = [
    f"batch_size={batch}",
    f"seq_len={seq}",
    "optimizer.learning_rate=1e-4",
    "optimizer.warmup_steps=1",
    "progress=false",
    *(f"model.{k}={v}" for k, v in s.train_model.items()),
  ]
  rows, adamw_t = run.rows(), None
  for name in s.optimizers:
    if run.over_budget():
      rows.append(dict(optimizer=name, skipped="time budget"))
      continue
    try:
      overrides = base + [f"optimizer.name={name}"]
      if name in ("galore", "osd"):
        hidden = training.load_config(str(path), overrides).model.hidden_size
        overrides.append(f"optimizer.hyperparams={{rank: {min(128, hidden // 2)}}}")
      row = _train_row(run, training.Trainer(training.load_config(str(path), overrides)), batch, seq)
      adamw_t = row["step_ms"] if name == "adamw" else adamw_t
      rows.append(dict(optimizer=name, **row, vs_adamw=(row["step_ms"] / adamw_t) if adamw_t else None))
    except Exception as e:
      rows.append(dict(optimizer=name, error=one_line(e), traceback=traceback.format_exc(limit=8)))
  return rows


def _train_row(run: Run, trainer, batch: int, seq: int) -> dict:
  """Median step time over `repeats` runs of `train_steps` steps, each run blocking once."""
  cfg = trainer.cfg
  tokens = run.rng.integers(0, cfg.model.vocab_size, (batch, seq + 1)).astype(np.int32)
  batches = itertools.repeat({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  state = trainer.init_state()
  for info in trainer.steps(state, batches, last_step=1):  # compiles
    state = info.state
  jax.block_until_ready(state)
  n, times = run.sizes.train_steps, []
  for _ in range(run.sizes.repeats):
    t0 = time.perf_counter()
    for info in trainer.steps(state, batches, last_step=int(state.step) + n):
      state, metrics = info.state, info.metrics
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / n)
  t = statistics.median(times)
  flops_per_step = cfg.model.flops_per_token(seq) * batch * seq
  return dict(
    step_ms=t * 1e3,
    tokens_s=batch * seq / t,
    loss=float(metrics["loss"]),
    mfu_pct=100 * flops_per_step / t / run.bf16_flops if run.bf16_flops else None,
    batch=batch,
    seq=seq,
    params=cfg.model.num_params,
    devices=trainer.mesh.size,
  )


def summary(rows: list[dict]) -> list[str]:
  cells = [
    (r["optimizer"], r.get("error") or r.get("skipped"), "", "", "")
    if "step_ms" not in r
    else (
      r["optimizer"],
      f"{r['step_ms']:.1f}",
      f"{r['tokens_s']:.0f}",
      fmt(r["mfu_pct"]),
      f"{fmt(r['vs_adamw'], '.2f')}x",
    )
    for r in rows
  ]
  return common.markdown_table(("optimizer", "step ms", "tokens/s", "MFU %", "vs adamw"), cells)


def goals(rows: list[dict]) -> list[tuple]:
  tr = [r for r in rows if r.get("optimizer") == "adamw" and r.get("mfu_pct")]
  return [
    ("125m train step (adamw) MFU %", tr[0]["mfu_pct"] if tr else None, ">= 40", bool(tr) and tr[0]["mfu_pct"] >= 40)
  ]
