"""Test setup: 8 fake CPU devices so sharding and multi-device tests run anywhere."""

import os

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# See jaxeff/host_malloc.py: XLA:CPU's concurrent scheduler can deadlock multi-device collectives.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
  _flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
# XLA:CPU's MLIR fusion emitters (the default) compile each fusion several times slower than the
# classic elemental emitters, for programs that run as fast: the kv_cache bench's quick run spends
# 27 s of its 34 in XLA compiles with them, 12 of 18 without.
if "xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
# The tests check what is computed, not how fast, and most of their time is XLA:CPU compiling
# small programs: skip LLVM's expensive optimizations (about a fifth of the suite's time). JAX's
# flag rather than XLA_FLAGS, so that the few tests that mostly run programs (the `runtime_bound`
# fixture: SmolLM2, 3x faster decode) can turn it off for their own compilations.
if "xla_backend_optimization_level" not in _flags:
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two workers share two cores: torch's OpenMP threads (the transformers references) spin-wait for a
# core the other worker holds (test_gguf's greedy reference: 12 s alone, 39 s beside a busy core,
# 16 s with one thread). Child processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit
import shutil
import tempfile


def _session_dir(variable: str, prefix: str) -> None:
  """A fresh directory for this session in $variable, unless it is set already: the pytest process
  that starts the xdist workers (pyproject's addopts) creates it, the workers and the child
  processes inherit it, and it is removed at exit."""
  if variable not in os.environ:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ[variable] = path


# Compile time dominates many tests (each CLI run, notebook kernel and process compiles the same
# small programs again): a persistent XLA cache shared by all of them cut the every-optimizer CLI
# test from 101 s to 64 s.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
_session_dir("JAX_COMPILATION_CACHE_DIR", "jaxeff-tests-xla-cache-")
# GGUF conversions (jaxeff.gguf.converted_checkpoint) too: the tests never write to ~/.cache, and
# SmolLM2 is converted once, not once per test file.
_session_dir("JAXEFF_CACHE_DIR", "jaxeff-tests-cache-")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def pytest_collection_modifyitems(config, items):
  """Files holding a `slow` test run first (pyproject turns off xdist's reordering by test count,
  which queued the one-test notebook and GPU dry-run files last): the many short files then fill
  both workers to the end instead of one worker finishing a two-minute file alone."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order otherwise


@pytest.fixture
def runtime_bound():
  """XLA's usual optimizations for this test's compilations: for tests whose time goes to running
  programs (SmolLM2 forwards and decoding), not to compiling them."""
  import jax

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def shakespeare_path():
  """The shared tiny-shakespeare text when present (never copied into the repo)."""
  if not SHAKESPEARE.exists():
    pytest.skip("../shared/data/tinyshakespeare.txt not present")
  return SHAKESPEARE
