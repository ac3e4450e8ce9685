"""jaxeff.host_malloc: applied where it can help, skipped where the user or platform says no."""

import os
import subprocess
import sys

import pytest

from jaxeff import host_malloc


def _tune_in_fresh_process(**env):
  # mallopt changes the whole process, so each case runs in its own interpreter.
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "JAXEFF_TUNE", "JAX_PLATFORMS"))}
  full_env.update(env)
  out = subprocess.run(
    [sys.executable, "-c", "from jaxeff import host_malloc; print(host_malloc.tune_for_cpu_training())"],
    env=full_env,
    capture_output=True,
    text=True,
    check=True,
  )
  return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_applies_on_a_cpu_linux_host_and_respects_opt_outs():
  applies = "False" if host_malloc._accelerator_plugin_installed() else "True"
  assert _tune_in_fresh_process() == applies
  assert _tune_in_fresh_process(JAX_PLATFORMS="cpu") == "True"
  assert _tune_in_fresh_process(JAX_PLATFORMS="cpu", JAXEFF_TUNE_MALLOC="0") == "False"
  assert _tune_in_fresh_process(JAX_PLATFORMS="cpu", MALLOC_ARENA_MAX="4") == "False"
  assert _tune_in_fresh_process(JAX_PLATFORMS="tpu") == "False"


def test_does_nothing_once_the_backend_started():
  import jax

  jax.devices()
  assert host_malloc.tune_for_cpu_training() is False


def test_settings_are_valid_mallopt_values():
  assert all(isinstance(v, int) and 0 < v < 2**31 for v in host_malloc.SETTINGS.values())


def test_xla_threads_are_what_decides_too_late():
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "from jaxeff import host_malloc as h; import jax; a = h._xla_threads_running(); "
      "jax.devices(); print(a, h._xla_threads_running())",
    ],
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.split() == ["False", "True"]  # import jax starts no XLA threads; the backend does


def test_cli_sets_the_cpu_scheduler_flag_but_keeps_the_users(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  host_malloc.set_cpu_xla_flags()
  assert os.environ["XLA_FLAGS"] == (
    "--xla_force_host_platform_device_count=2 --xla_cpu_enable_concurrency_optimized_scheduler=false"
  )
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
  host_malloc.set_cpu_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"
