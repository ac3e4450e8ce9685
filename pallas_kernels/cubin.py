"""Compile a jitted op's Pallas GPU (Triton) kernels to real cubin on a CPU-only machine.

    from pallas_kernels import cubin
    rows = cubin.kernel_resources(op, x, w)            # args: arrays or jax.ShapeDtypeStruct pytrees
    print(cubin.resource_table(rows))                   # per kernel and target: registers, spills, smem, ...

Lowering for CUDA (`lowering_platforms=("cuda",)`) only checks Pallas' block-shape rules. This goes
on to what the GPU toolchain would do, without a GPU:

1. `jax.jit(op).trace(*args).lower(lowering_platforms=("cuda",))`: every Pallas GPU kernel becomes a
   `__gpu$xla.gpu.triton` custom call whose backend config carries the kernel's Triton IR (MLIR
   bytecode), `num_warps`, `num_stages` and the grid.
2. The bytecode is read with jaxlib's MLIR bindings and its registered Triton dialect and printed
   as text (`.ttir`).
3. `triton.compile` from the registry's `triton` package turns it into PTX and cubin for each
   target with its bundled `ptxas`. Triton skips its TTIR passes for a `.ttir` file, but XLA's
   Triton pipeline runs them (inliner, canonicalize, combine, CSE, loop unroll, ...), and they
   change register counts, so a stage hook runs Triton's own `make_ttir` first.
4. `ptxas -v`'s log of that very compile gives registers per thread and spill bytes; Triton's
   metadata gives the dynamic shared memory. From those, the theoretical occupancy (CUDA's
   occupancy-calculator rules: register-file, shared-memory, warp and block limits per SM).

What this proves: the kernel compiles for sm_80 / sm_90 with these resources. What it cannot:
speed, and correctness on the device (interpret mode and the reference tests cover the math).

The Triton IR format changes between Triton releases; `TRITON_FOR_JAXLIB` pins the release that
reads what each jaxlib emits (a mismatch raises `TritonMismatchError` naming both versions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pallas_kernels.compat import lowering_for

# jaxlib version -> the `triton` release (from the package registry) that parses its Triton IR.
# Found by trying releases (2026-11-23): for jaxlib 0.10.2, triton 3.5.1, 3.6.0, 3.7.1 and 3.9.0
# rejected the IR's bytecode; 3.8.0 reads it (and the text this module prints from it).
TRITON_FOR_JAXLIB = {"0.10.2": "3.8.0"}

TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"


class TritonMismatchError(RuntimeError):
  """The installed `triton` cannot read the Triton IR this jaxlib emits."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Per-SM limits of a CUDA compute capability (CUDA C Programming Guide, compute capabilities)."""

  name: str
  capability: int
  shared_per_sm: int  # bytes of shared memory per SM (the carve-out maximum)
  shared_per_block: int  # most dynamic + static shared memory one block may use
  registers_per_sm: int = 64 * 1024
  max_registers_per_thread: int = 255
  max_warps_per_sm: int = 64
  max_blocks_per_sm: int = 32
  register_alloc_unit: int = 256  # registers are allocated per warp in units of 256
  shared_alloc_unit: int = 128
  reserved_shared_per_block: int = 1024  # the driver's per-block reserve since sm_80


TARGETS = {
  "sm_80": Target("sm_80", 80, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),  # A100
  "sm_90": Target("sm_90", 90, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),  # H100
}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One Triton custom call of a lowered op."""

  name: str
  grid: tuple[int, int, int]
  num_warps: int
  num_stages: int
  ttir: str  # the kernel's Triton IR as MLIR text


@dataclasses.dataclass(frozen=True)
class Occupancy:
  """Theoretical warps per SM and what limits them below the per-SM maximum.

  `limiter` is "registers", "shared memory", both joined by "and", or "neither" (the per-SM warp or
  block cap binds first).
  """

  warps_by_registers: int
  warps_by_shared: int
  warps_by_blocks: int  # by the per-SM limits on warps and on blocks
  warps_per_sm: int
  limiter: str

  @property
  def fraction(self) -> float:
    return self.warps_per_sm / 64


@dataclasses.dataclass(frozen=True)
class KernelResources:
  """One kernel compiled for one target."""

  name: str
  target: str
  grid: tuple[int, int, int]
  num_warps: int
  num_stages: int
  registers: int  # per thread
  spill_stores: int  # bytes, from ptxas -v
  spill_loads: int
  stack_bytes: int  # stack frame per thread
  shared_bytes: int  # per block: Triton's dynamic shared memory + any static
  cubin_bytes: int
  occupancy: Occupancy

  @property
  def spill_bytes(self) -> int:
    return self.spill_stores + self.spill_loads

  @property
  def fits(self) -> bool:
    """Within the target's per-thread register and per-block shared-memory limits."""
    t = TARGETS[self.target]
    return self.registers <= t.max_registers_per_thread and self.shared_bytes <= t.shared_per_block


def occupancy(registers: int, shared_bytes: int, num_warps: int, target: Target | str) -> Occupancy:
  """Theoretical occupancy of a block of `num_warps` warps, as CUDA's occupancy calculator counts it."""
  t = TARGETS[target] if isinstance(target, str) else target
  most = min(t.max_warps_per_sm // num_warps, t.max_blocks_per_sm)  # blocks, by the warp and block caps
  if registers:
    regs_per_warp = -(-registers * 32 // t.register_alloc_unit) * t.register_alloc_unit
    by_registers = (t.registers_per_sm // regs_per_warp) // num_warps
  else:
    by_registers = most
  smem = -(-(shared_bytes + t.reserved_shared_per_block) // t.shared_alloc_unit) * t.shared_alloc_unit
  by_shared = t.shared_per_sm // smem if shared_bytes <= t.shared_per_block else 0
  blocks = min(most, by_registers, by_shared)
  binding = [name for name, n in (("registers", by_registers), ("shared memory", by_shared)) if n == blocks < most]
  cap = lambda b: min(b * num_warps, t.max_warps_per_sm)
  return Occupancy(
    warps_by_registers=cap(by_registers),
    warps_by_shared=cap(by_shared),
    warps_by_blocks=most * num_warps,
    warps_per_sm=blocks * num_warps,
    limiter=" and ".join(binding) or "neither",
  )


@dataclasses.dataclass(frozen=True)
class KernelCase:
  """One entry of a Pallas GPU kernel's block-size table, as something to compile.

  `fn(*make_args())` lowers to the kernel(s) for that entry; `entry` is the table key; the
  launch parameters the entry sets are checked against the compiled kernels.
  """

  label: str
  fn: Callable
  make_args: Callable[[], tuple]
  entry: Any = None
  num_warps: int | None = None
  num_stages: int | None = None


def kernel_cases() -> list[KernelCase]:
  """Every Pallas GPU kernel's block-size table entries (tests and `python -m jaxeff.bench kernels`).

  A new GPU kernel adds a `cubin_cases.py` beside its kernel and one line here.
  """
  from pallas_kernels.kivi_attention import cubin_cases as kivi_attention_cases
  from pallas_kernels.quant_matmul import cubin_cases as quant_matmul_cases
  from pallas_kernels.ragged_paged_attention import cubin_cases as ragged_paged_attention_cases
  from pallas_kernels.sparse_attention import cubin_cases as sparse_attention_cases

  modules = (quant_matmul_cases, sparse_attention_cases, kivi_attention_cases, ragged_paged_attention_cases)
  return [KernelCase(**case) for module in modules for case in module.cubin_cases()]


# ---------------------------------------------------------------------------- extracting kernels


def triton_kernels(fn: Callable, *args, **kwargs) -> list[TritonKernel]:
  """The Triton kernels of `fn(*args, **kwargs)` lowered for CUDA (duplicates removed, in order).

  `args` may hold `jax.ShapeDtypeStruct`s; `fn` may already be jitted.
  """
  from jaxlib.mlir import ir
  from jaxlib.triton import dialect as triton_dialect

  with lowering_for("cuda"):
    lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
  module = lowered.compiler_ir("stablehlo")
  calls = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if (
            child.name == "stablehlo.custom_call"
            and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL_TARGET
          ):
            calls.append(child)
          walk(child)

  walk(module.operation)
  kernels: list[TritonKernel] = []
  ctx = ir.Context()
  triton_dialect.register_dialect(ctx)
  for call in calls:
    config = ir.DictAttr(call.attributes["mhlo.backend_config"])
    value = lambda key: ir.IntegerAttr(config[key]).value
    with ctx:
      ttir = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
    kernel = TritonKernel(
      name=ir.StringAttr(config["name"]).value,
      grid=(value("grid_x"), value("grid_y"), value("grid_z")),
      num_warps=value("num_warps"),
      num_stages=value("num_stages"),
      ttir=ttir,
    )
    if kernel not in kernels:
      kernels.append(kernel)
  return kernels


# ---------------------------------------------------------------------------- compiling


def _triton():
  try:
    import triton
  except ImportError as e:
    import jaxlib

    want = TRITON_FOR_JAXLIB.get(jaxlib.__version__, "<unknown: find the release that parses its IR>")
    raise ImportError(
      f"compiling Pallas GPU kernels to cubin needs the `triton` package "
      f"(pip install triton=={want}, or jaxeff's test extras)"
    ) from e
  return triton


def _mismatch(err: Exception) -> TritonMismatchError:
  import jaxlib
  import triton

  want = TRITON_FOR_JAXLIB.get(jaxlib.__version__)
  if want == triton.__version__:
    hint = (
      f"that is the release pinned for jaxlib {jaxlib.__version__}, so the IR itself is at fault "
      f"(MLIR's diagnostic is on stderr)"
    )
  elif want:
    hint = f"jaxlib {jaxlib.__version__} needs triton=={want} (pyproject.toml's test extras pin it)"
  else:
    hint = (
      f"jaxlib {jaxlib.__version__} is not in pallas_kernels.cubin.TRITON_FOR_JAXLIB: find the triton "
      f"release whose IR format matches and pin it there and in pyproject.toml's test extras"
    )
  return TritonMismatchError(
    f"triton {triton.__version__} cannot read the Triton IR that jaxlib "
    f"{jaxlib.__version__}'s Pallas emits ({type(err).__name__}: {str(err)[:300]}); {hint}"
  )


def _run_ttir_passes_hook(*args):
  """A Triton stage-inspection hook: run `make_ttir` before `make_ttgir`, as XLA's pipeline does."""
  if not args:  # Triton asks for a cache key
    return "pallas_kernels.cubin:make_ttir", "1"
  backend, stages, options, _language, capability = args
  make_ttgir = stages["ttgir"]
  stages["ttgir"] = lambda mod, metadata: make_ttgir(backend.make_ttir(mod, metadata, options, capability), metadata)


def _ptxas_number(pattern: str, log: str) -> int:
  m = re.search(pattern, log)
  return int(m.group(1)) if m else 0


def compile_kernel(kernel: TritonKernel, target: str = "sm_90") -> KernelResources:
  """Compiles one kernel to cubin for `target` ("sm_80" or "sm_90") and reads its resources."""
  triton = _triton()
  from triton.backends.compiler import GPUTarget

  spec = TARGETS[target]
  with tempfile.TemporaryDirectory(prefix="pallas-cubin-") as tmp:
    path = os.path.join(tmp, f"{kernel.name}.ttir")
    with open(path, "w") as f:
      f.write(kernel.ttir)
    knobs = triton.knobs
    log = io.StringIO()
    with knobs.runtime.scope(), knobs.nvidia.scope(), knobs.compilation.scope(), knobs.cache.scope():
      knobs.runtime.add_stages_inspection_hook = _run_ttir_passes_hook
      knobs.nvidia.dump_ptxas_log = True  # printed by Triton; captured below
      knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
      knobs.cache.dir = os.path.join(tmp, "cache")
      try:
        with contextlib.redirect_stdout(log):
          compiled = triton.compile(
            path,
            target=GPUTarget("cuda", spec.capability, 32),
            options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages},
          )
      except Exception as e:  # noqa: BLE001 - parse errors surface as several exception types
        if "parse" in str(e).lower() or "dialect" in str(e).lower() or "attribute" in str(e).lower():
          raise _mismatch(e) from e
        raise
  ptxas_log = log.getvalue()
  if "Used" not in ptxas_log:
    raise RuntimeError(f"no ptxas -v log captured for {kernel.name} ({target}):\n{ptxas_log[-2000:]}")
  registers = _ptxas_number(r"Used (\d+) registers", ptxas_log)
  shared = compiled.metadata.shared + _ptxas_number(r"(\d+) bytes smem", ptxas_log)
  return KernelResources(
    name=kernel.name,
    target=target,
    grid=kernel.grid,
    num_warps=kernel.num_warps,
    num_stages=kernel.num_stages,
    registers=registers,
    spill_stores=_ptxas_number(r"(\d+) bytes spill stores", ptxas_log),
    spill_loads=_ptxas_number(r"(\d+) bytes spill loads", ptxas_log),
    stack_bytes=_ptxas_number(r"(\d+) bytes stack frame", ptxas_log),
    shared_bytes=shared,
    cubin_bytes=len(compiled.asm["cubin"]),
    occupancy=occupancy(registers, shared, kernel.num_warps, spec),
  )


def kernel_resources(
  fn: Callable, *args, targets: Sequence[str] = ("sm_80", "sm_90"), **kwargs
) -> list[KernelResources]:
  """Lowers `fn(*args, **kwargs)` for CUDA and compiles each of its Triton kernels for each target.

  Args:
    fn: any function (jitted or not) whose lowering contains Pallas GPU kernels.
    *args, **kwargs: its arguments; arrays or `jax.ShapeDtypeStruct`s (nothing is run).
    targets: keys of `TARGETS`.

  Returns:
    One `KernelResources` per (kernel, target), kernels in lowering order. Raises ValueError if
    the lowering has no Triton kernel, `TritonMismatchError` if the installed triton cannot read it.
  """
  kernels = triton_kernels(fn, *args, **kwargs)
  if not kernels:
    raise ValueError(f"{getattr(fn, '__name__', fn)!r} lowered for CUDA contains no Pallas Triton kernel")
  unknown = [t for t in targets if t not in TARGETS]
  if unknown:
    raise ValueError(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
  return [compile_kernel(k, t) for k in kernels for t in targets]


def resource_table(rows: Sequence[KernelResources], labels: Sequence[str] | None = None) -> str:
  """A markdown table of `rows` (optionally one label per row, e.g. the block-size table entry)."""
  head = ["case"] if labels is not None else []
  lines = [
    "| "
    + " | ".join(
      head
      + [
        "kernel",
        "target",
        "grid",
        "warps",
        "stages",
        "registers",
        "spills (B)",
        "shared (B)",
        "cubin (B)",
        "warps/SM (regs, smem, limits)",
        "occupancy",
        "limited by",
      ]
    )
    + " |"
  ]
  lines.append("|" + "---|" * (len(head) + 12))
  for i, r in enumerate(rows):
    o = r.occupancy
    cells = ([labels[i]] if labels is not None else []) + [
      r.name,
      r.target,
      "x".join(map(str, r.grid)),
      str(r.num_warps),
      str(r.num_stages),
      str(r.registers),
      str(r.spill_bytes),
      f"{r.shared_bytes:,}",
      f"{r.cubin_bytes:,}",
      f"{o.warps_per_sm} ({o.warps_by_registers}, {o.warps_by_shared}, {o.warps_by_blocks})",
      f"{o.fraction:.0%}",
      o.limiter,
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
