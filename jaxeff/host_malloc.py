"""Host settings for XLA:CPU, applied by the `jaxeff.train` and `jaxeff.bench` CLIs (never on import).

`prepare_cpu_host()` = `set_cpu_xla_flags()` + `tune_for_cpu_training()`.

XLA flag: XLA:CPU's concurrency-optimized scheduler can run a multi-device program's collectives
in a different order on different devices and deadlock (seen with GaLore's SVD gathers on an
8-device CPU mesh); turning it off costs nothing measurable. It only affects the CPU backend and
only takes effect before jax creates its CPU client.

malloc:

Why: an XLA:CPU train step allocates and frees hundreds of MB of temporaries. With glibc's
defaults, large blocks go to fresh mmap()s (or are trimmed back to the OS) and every step
page-faults them in again: measured on the 2-core CI machine, ~200K minor faults and ~0.6 s of
kernel time per step of the small config (PyTorch's step: 15K faults). Keeping freed memory in
one heap (one arena, no mmap for big blocks, no trimming, 512 MB top pad) removes almost all of
them; the step gets ~15-20% faster. See BENCHMARKS.md.

The settings only take effect for threads that have not yet allocated, so call
`tune_for_cpu_training()` before jax starts its backend (before `jax.devices()` or the first
computation); once XLA's CPU worker threads run (seen in /proc/self/task) the call does nothing.
It is also skipped where the settings could hurt or cannot apply: non-glibc systems, hosts with a
TPU or GPU plugin installed (host memory there feeds input pipelines, not XLA temporaries), and
when the user set `JAXEFF_TUNE_MALLOC=0` or any `MALLOC_*` variable themselves.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
_INT_MAX = 2**31 - 1
SETTINGS = {
  _M_ARENA_MAX: 1,  # one heap: XLA's worker threads reuse what the others freed
  _M_MMAP_THRESHOLD: 1 << 30,  # big temporaries come from the heap, not fresh mmap()s
  _M_TRIM_THRESHOLD: _INT_MAX,  # never hand freed heap back to the OS mid-run
  _M_TOP_PAD: 512 << 20,  # grow the heap in large steps
}


def _accelerator_plugin_installed() -> bool:
  if importlib.util.find_spec("libtpu") is not None:
    return True
  return any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))


# XLA's CPU client names its worker threads after its Eigen pool ("tf_XLAEigen").
_XLA_THREAD_PREFIX = "tf_XLA"
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _xla_threads_running() -> bool:
  """Whether XLA's CPU worker threads exist yet (their names, from /proc, are public facts)."""
  try:
    tasks = os.listdir("/proc/self/task")
  except OSError:
    return False
  for tid in tasks:
    try:
      with open(f"/proc/self/task/{tid}/comm") as f:
        if f.read().startswith(_XLA_THREAD_PREFIX):
          return True
    except OSError:  # the thread ended meanwhile
      continue
  return False


def set_cpu_xla_flags() -> None:
  """Adds the scheduler flag to XLA_FLAGS unless the user set it (see the module docstring)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + _SCHEDULER_FLAG).strip()


def prepare_cpu_host() -> bool:
  """What a jaxeff CLI does first: the XLA:CPU flag, then the malloc settings (returned)."""
  set_cpu_xla_flags()
  return tune_for_cpu_training()


def tune_for_cpu_training() -> bool:
  """Applies `SETTINGS` with mallopt() when it is safe and useful; returns whether it did."""
  if os.environ.get("JAXEFF_TUNE_MALLOC", "1") == "0":
    return False
  if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms.split(",")[0] not in ("cpu", "") or (not platforms and _accelerator_plugin_installed()):
    return False
  if _xla_threads_running():  # too late to help (measured), so leave this process alone
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # musl and other non-glibc libcs
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
