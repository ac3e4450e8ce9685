"""What the GPU bench's sections share: the run (settings, clock, budget, ceilings, record), inputs
that defeat the L2, NaN-poisoned memory, error measures and the decode sections' model."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.bench import common
from jaxeff.bench.gpu.plan import L2_BYTES, Sizes
from jaxeff.config import ModelConfig
from jaxeff.models import Llama


class Run:
  """Settings, the clock, the measured ceilings and the JSON record of one invocation."""

  def __init__(self, args, sizes: Sizes, out: pathlib.Path):
    self.args, self.sizes, self.out = args, sizes, out
    self.dry = args.dry_run
    self.impl = "gpu"  # the Pallas GPU kernels, interpreted on CPU in a dry run
    self.interpret = self.dry
    self.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    self.rng = np.random.default_rng(self.seed)
    self.start = time.perf_counter()
    self.budget = args.budget
    self.copy_bw: float | None = None  # bytes/s, read + write
    self.bf16_flops: float | None = None
    self.record: dict[str, Any] = {"meta": _meta(args, sizes, self.seed), "sections": {}}

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def log(self, message: str) -> None:
    """A progress line on stderr (the table comes last on stdout)."""
    print(f"[{self.elapsed():6.0f} s] {message}", file=sys.stderr, flush=True)

  def rows(self) -> list:
    """A list that logs each row appended to it, so a long or stuck run shows where it is."""
    return _LoggedRows(self)

  def over_budget(self) -> bool:
    return self.budget is not None and self.elapsed() > self.budget

  def key(self):
    return jax.random.key(int(self.rng.integers(2**31)))

  def normal(self, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(self.key(), shape, jnp.float32)).astype(dtype)

  def save(self):
    self.out.mkdir(parents=True, exist_ok=True)
    common.write_json(self.out / "gpu_bench.json", self.record, indent=1, default=_jsonable)


class _LoggedRows(list):
  def __init__(self, run: Run):
    super().__init__()
    self.run = run

  def append(self, row: dict) -> None:
    super().append(row)
    brief = ", ".join(
      f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in row.items()
      if k != "traceback" and not isinstance(v, (dict, list))
    )
    self.run.log("  " + brief)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def _meta(args, sizes: Sizes, seed: int) -> dict:
  dev = jax.devices()[0]
  return dict(
    command="python -m jaxeff.bench gpu " + " ".join(args.argv),
    date=common.today(),
    device=dev.device_kind,
    platform=dev.platform,
    device_count=jax.device_count(),
    jax=jax.__version__,
    jaxlib=_version("jaxlib"),
    python=platform.python_version(),
    host=platform.node(),
    dry_run=args.dry_run,
    quick=args.quick,
    seed=seed,
    sizes=dataclasses.asdict(sizes),
  )


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


# ---------------------------------------------------------------------------- inputs and checks


def rotating(op: Callable, arg_sets: list[tuple]) -> Callable[[], Any]:
  """One program calling `op` once per argument set (distinct inputs: no L2 reuse between calls)."""
  many = jax.jit(lambda sets: [op(*a) for a in sets])
  return lambda: many(arg_sets)


def copies_for(nbytes: int, cap: int = 16) -> int:
  """How many distinct copies of an input of `nbytes` rotate so that together they exceed 4x L2."""
  return int(min(cap, max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def poison(nbytes: int) -> None:
  """Fills `nbytes` of freshly freed device memory with NaN, so the next allocation likely reuses it."""
  x = jnp.full((max(nbytes, 4) // 4,), jnp.nan, jnp.float32)
  x.block_until_ready()
  x.delete()


def relative_error(got, want) -> float:
  """max |got - want| / max |want| in f64 on the host; inf when `got` has a NaN or inf."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_row(kernel: str, case: str, errors: dict[str, float], tol: float, **extra) -> dict:
  """A correctness row: ok when every error is at most `tol` (and finite)."""
  worst = max(errors.values())
  return dict(kernel=kernel, case=case, errors=errors, max_error=worst, tol=tol, ok=bool(worst <= tol), **extra)


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def one_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one line of at most `limit` characters, for a row or the table."""
  text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt(x, spec=".1f", none="-") -> str:
  """`x` formatted for the table; `none` where it was not measured."""
  return none if x is None else format(x, spec)


# ---------------------------------------------------------------------------- the decode sections' model


def decode_model(run: Run) -> Llama:
  """The decode, serve and speculative sections' model (`Sizes.decode_model`, random weights made
  on the device): bf16, f32 in a dry run (XLA:CPU bf16 matvecs are slow; the dry run only proves
  the path)."""
  dtype = "float32" if run.dry else "bfloat16"
  return common.build_model(ModelConfig(**run.sizes.decode_model, dtype=dtype, param_dtype=dtype))
