"""glibc malloc settings for XLA:CPU, applied by the `jaxeff.train` and `jaxeff.bench` CLIs.

Why: an XLA:CPU train step allocates and frees hundreds of MB of temporaries. With glibc's
defaults, large blocks go to fresh mmap()s (or are trimmed back to the OS) and every step
page-faults them in again: measured on the 2-core CI machine, ~200K minor faults and ~0.6 s of
kernel time per step of the small config (PyTorch's step: 15K faults). Keeping freed memory in
one heap (one arena, no mmap for big blocks, no trimming, 512 MB top pad) removes almost all of
them; the step gets ~15-20% faster. See BENCHMARKS.md.

The settings only take effect for threads that have not yet allocated, so call
`tune_for_cpu_training()` before jax starts its backend (before `jax.devices()` or the first
computation); once it has started the call does nothing. It is also skipped where the settings
could hurt or cannot apply: non-glibc systems, hosts with a TPU or GPU plugin installed (host
memory there feeds input pipelines, not XLA temporaries), and when the user set
`JAXEFF_TUNE_MALLOC=0` or any `MALLOC_*` variable themselves.
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


def _jax_backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # private API moved: assume not started
    return False


def tune_for_cpu_training() -> bool:
  """Applies `SETTINGS` with mallopt() when it is safe and useful; returns whether it did."""
  if os.environ.get("JAXEFF_TUNE_MALLOC", "1") == "0":
    return False
  if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms.split(",")[0] not in ("cpu", "") or (not platforms and _accelerator_plugin_installed()):
    return False
  if _jax_backend_started():  # too late to help (measured), so leave this process alone
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # musl and other non-glibc libcs
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
