"""Helpers several test modules share."""

import os

import jax
import optax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def run_optimizer(tx: optax.GradientTransformation, params, grads):
  """(params, state) after `tx.init(params)` and one update per gradient of `grads`, in one jit."""
  return optimizer_runner(tx)(params, grads)


def optimizer_runner(tx: optax.GradientTransformation):
  """A jitted `go(params, grads) -> (params, state)`: init, then one update per gradient."""

  @jax.jit
  def go(params, grads):
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  return go


def racy_kernel(x):
  """A Pallas TPU kernel whose 2 simulated cores (a "parallel" axis) write one shared scratch
  buffer: a race the simulator's detector must report. The race tests run it first, so their
  "no RACE DETECTED" assertion is known to see the detector's output (jax exposes no public flag)."""

  def kernel(x_ref, o_ref, scratch):
    scratch[...] = x_ref[...]
    o_ref[...] = x_ref[...] + scratch[...]

  return pl.pallas_call(
    kernel,
    grid=(2,),
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    in_specs=[pl.BlockSpec(memory_space=pltpu.VMEM)],
    scratch_shapes=[pltpu.VMEM(x.shape, x.dtype)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    interpret=pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2),
  )(x)


# XLA:CPU's optimizations: conftest's cheapest compile (JAX_DISABLE_MOST_OPTIMIZATIONS: most tests
# compile small programs and run them once), and for processes that mostly run programs (training
# loops, SmolLM2) -O1, as fast to run as the default -O2 and faster to compile (SmolLM2 decode: 25
# tokens/s at either, 8 at -O0; the quantize fixture's 150 training steps: 13 s, 20 s at -O0).
_OPT_FLAGS = ("--xla_backend_optimization_level", "--xla_llvm_disable_expensive_passes")
RUNTIME_BOUND_FLAGS = ("--xla_backend_optimization_level=1", "--xla_llvm_disable_expensive_passes=true")


def cpu_env(devices: int = 1, *, runtime_bound: bool = False, **extra) -> dict[str, str]:
  """This process's environment for a child process on `devices` CPU devices (conftest's fake
  device count replaced; its other XLA flags, the compilation cache and the thread limit kept;
  `runtime_bound`: `RUNTIME_BOUND_FLAGS` instead of conftest's cheapest-compile flags)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **extra}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if runtime_bound:
    flags = [f for f in flags if not f.startswith(_OPT_FLAGS)] + list(RUNTIME_BOUND_FLAGS)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env
