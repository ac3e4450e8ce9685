"""Hooks: what the training loop does besides stepping (levanter's pattern).

A hook sees the run through four calls, each optional:

  on_metrics(records)  every step's {"step", "loss", "grad_norm"} once fetched from the devices
                       (fetched in groups, only when some hook is due: no sync per step)
  on_step(ctx)         when `due(step)`: every `every` steps and at the last step
  on_log(step, record) every record any hook logs (`ctx.log`)
  close()              at the end of the run, also after an error

Order matters: the loop calls hooks in list order, so `NaNGuard` comes first and no later hook
(checkpointing above all) ever sees a diverged state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxeff.errors import TrainError


class StepClock:
  """Seconds spent in training steps, with compilation and hook time left out."""

  def __init__(self):
    self._start = None
    self._seconds = 0.0
    self._steps = 0
    self._first = None  # (steps, seconds) of the compiling first interval

  def start(self):
    self._start = time.perf_counter()

  def stop(self, steps: int, compiling: bool = False):
    seconds = time.perf_counter() - self._start
    if compiling:
      self._first = (steps, seconds)
    else:
      self._seconds += seconds
      self._steps += steps

  def take(self) -> tuple[int, float]:
    """(steps, seconds) since the last call; the compiling interval only when nothing else ran."""
    out = (self._steps, self._seconds) if self._steps else (self._first or (0, 0.0))
    self._steps, self._seconds = 0, 0.0
    return out


@dataclasses.dataclass
class StepContext:
  """What a due hook gets: the step, the state after it, and the run's shared services."""

  step: int
  state: Any  # TrainState
  log: Callable[[int, dict], None]
  clock: StepClock
  last_step: int


class Hook:
  """Base class: override what you need. `every=0` means only at the last step."""

  every: int = 0

  def due(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.every > 0 and step % self.every == 0)

  def on_metrics(self, records: list[dict]) -> None:
    pass

  def on_step(self, ctx: StepContext) -> None:
    pass

  def on_log(self, step: int, record: dict) -> None:
    pass

  def close(self) -> None:
    pass


class NaNGuard(Hook):
  """Stops the run at the first non-finite loss or gradient norm, naming the last good checkpoint."""

  def __init__(self, last_checkpoint: Callable[[], int | None], checkpoint_dir: pathlib.Path):
    self.last_checkpoint, self.checkpoint_dir = last_checkpoint, checkpoint_dir

  def on_metrics(self, records):
    for r in records:
      if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])):
        last = self.last_checkpoint()
        raise TrainError(
          f"loss became {r['loss']} (grad norm {r['grad_norm']}) at step {r['step']}; stopping. "
          f"The last good checkpoint ({'step ' + str(last) if last is not None else 'none'}) "
          f"in {self.checkpoint_dir} is intact; lower optimizer.learning_rate or check the data"
        )


class MetricsLogger(Hook):
  """Every `every` steps: loss, grad norm, lr, tokens/s and MFU to `metrics.jsonl` and TensorBoard.

  Also writes every record other hooks log (validation loss). Process 0 only.
  """

  def __init__(
    self,
    out_dir: pathlib.Path,
    every: int,
    *,
    tensorboard: bool,
    tokens_per_step: int,
    flops_per_step: float,
    peak_flops: float,
    schedule: Callable[[int], Any],
  ):
    self.every = every
    self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
    self.schedule = schedule
    self.enabled = jax.process_index() == 0
    self.last: dict | None = None
    self.jsonl = open(out_dir / "metrics.jsonl", "a") if self.enabled else None
    self.tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(str(out_dir / "tb"))

  def on_metrics(self, records):
    self.last = records[-1]

  def on_step(self, ctx):
    steps, seconds = ctx.clock.take()
    tokens_per_s = steps * self.tokens_per_step / seconds if seconds > 0 else float("nan")
    ctx.log(
      ctx.step,
      {
        "loss": self.last["loss"],
        "grad_norm": self.last["grad_norm"],
        "lr": float(self.schedule(ctx.step - 1)),
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s / self.tokens_per_step * self.flops_per_step / self.peak_flops,
      },
    )

  def on_log(self, step, record):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in record.items():
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


class Evaluator(Hook):
  """Every `every` steps: mean loss over the fixed validation batches, logged as `val_loss`."""

  def __init__(self, every: int, eval_step: Callable, batches: list, to_global: Callable[[dict], dict]):
    self.every, self.eval_step, self.batches, self.to_global = every, eval_step, batches, to_global
    self.val_losses: dict[int, float] = {}

  def on_step(self, ctx):
    if not self.batches:
      return
    total = sum(float(self.eval_step(ctx.state.params, self.to_global(b))) for b in self.batches)
    self.val_losses[ctx.step] = total / len(self.batches)
    ctx.log(ctx.step, {"val_loss": self.val_losses[ctx.step]})


class CheckpointSaver(Hook):
  """Every `every` steps (and at the last): the state, the data iterator's position, metadata."""

  def __init__(self, every: int, save: Callable[[Any], None]):
    self.every, self.save = every, save

  def on_step(self, ctx):
    self.save(ctx.state)


class ProgressBar(Hook):
  """A tqdm bar with loss, tokens/s and MFU; validation losses printed above it. Process 0 only."""

  def __init__(self, total: int, initial: int):
    from tqdm.auto import tqdm

    self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

  def on_log(self, step, record):
    if "loss" in record:
      self.bar.set_postfix(
        loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", mfu=f"{record['mfu']:.1%}"
      )
      self.bar.n = step
      self.bar.refresh()
    if "val_loss" in record:
      self.bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")

  def close(self):
    self.bar.close()


def host_records(pending: list[tuple[int, dict]]) -> list[dict]:
  """Fetches grouped per-step device metrics in one transfer."""
  return [{"step": s, **{k: float(np.asarray(v)) for k, v in m.items()}} for s, m in jax.device_get(pending)]
