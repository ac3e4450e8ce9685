"""pallas_kernels.cubin: every Pallas GPU kernel's block-size table entry compiles to real cubin for
sm_80 and sm_90 (the registry's triton + its bundled ptxas, no GPU) within the hardware's limits.

A kernel joins the table below by adding a `cubin_cases.py` beside its kernel and one line in
`pallas_kernels.cubin.kernel_cases()`.
"""

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

triton = pytest.importorskip("triton", reason="the cubin compile needs the test extras' pinned triton")

from pallas_kernels import cubin  # noqa: E402

TARGETS = ("sm_80", "sm_90")
CASES = cubin.kernel_cases()


def _add_one(x):
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1

  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    grid=(4,),
    in_specs=[pl.BlockSpec((256,), lambda i: (i,))],
    out_specs=pl.BlockSpec((256,), lambda i: (i,)),
    compiler_params=plgpu.CompilerParams(num_warps=2, num_stages=1),
    name="add_one",
  )(x)


def test_pinned_triton_reads_jaxlib_triton_ir():
  """The pair must match: a jax upgrade fails here, naming both versions, until the pin moves."""
  import jaxlib

  want = cubin.TRITON_FOR_JAXLIB.get(jaxlib.__version__)
  assert want == triton.__version__, (
    f"jaxlib {jaxlib.__version__} emits Triton IR for triton=={want} (pallas_kernels.cubin.TRITON_FOR_JAXLIB), "
    f"but triton {triton.__version__} is installed; find the triton release that parses jaxlib's IR and pin it"
  )
  pyproject = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
  pin = re.search(r'"triton==([^"]+)"', pyproject)
  assert pin and pin.group(1) == want, f"pyproject.toml pins triton {pin and pin.group(1)}, jaxlib needs {want}"
  rows = cubin.kernel_resources(_add_one, jax.ShapeDtypeStruct((1024,), jnp.float32))
  assert [(r.name, r.target, r.grid, r.num_warps) for r in rows] == [("add_one", t, (4, 1, 1), 2) for t in TARGETS]
  assert all(r.cubin_bytes > 1000 and 0 < r.registers <= 255 and r.spill_bytes == 0 for r in rows)


def test_unreadable_ir_raises_a_message_naming_both_versions():
  import jaxlib

  (kernel,) = cubin.triton_kernels(_add_one, jax.ShapeDtypeStruct((1024,), jnp.float32))
  broken = dataclasses.replace(kernel, ttir=kernel.ttir.replace("tt.func", "tt.not_an_op"))
  with pytest.raises(cubin.TritonMismatchError) as err:
    cubin.compile_kernel(broken, "sm_80")
  assert f"triton {triton.__version__}" in str(err.value) and f"jaxlib {jaxlib.__version__}" in str(err.value)


def test_no_triton_kernel_is_an_error():
  with pytest.raises(ValueError, match="no Pallas Triton kernel"):
    cubin.kernel_resources(lambda x: x + 1, jax.ShapeDtypeStruct((8,), jnp.float32))


@pytest.mark.parametrize(
  "registers,shared,warps,target,want_warps,limiter",
  [
    # 64 regs: 2048 per warp, 32 warps by registers; 48 KiB + 1 KiB reserve: 3 blocks of 4 warps.
    (64, 48 * 1024, 4, "sm_80", 12, "shared memory"),
    (64, 48 * 1024, 4, "sm_90", 16, "shared memory"),  # 228 KiB / 49 KiB = 4 blocks
    # 168 regs round up to 5376 per warp: 12 warps; shared memory would allow 64.
    (168, 8 * 1024, 4, "sm_80", 12, "registers"),
    (32, 0, 4, "sm_90", 64, "neither"),  # the 64-warp cap
    (255, 200 * 1024, 4, "sm_80", 0, "shared memory"),  # over sm_80's 163 KiB per block
  ],
)
def test_occupancy_follows_the_cuda_calculator(registers, shared, warps, target, want_warps, limiter):
  occ = cubin.occupancy(registers, shared, warps, target)
  assert (occ.warps_per_sm, occ.limiter) == (want_warps, limiter)


def test_every_block_size_table_entry_has_a_case():
  from pallas_kernels.quant_matmul import gpu

  assert {c.entry for c in CASES if c.label.startswith("quant_matmul")} == set(gpu.BLOCK_SIZES)


def test_sparse_attention_backward_case_compiles_all_three_kernels():
  (case,) = [c for c in CASES if c.label.startswith("sparse_attention forward+backward")]
  names = [r.name for r in cubin.kernel_resources(case.fn, *case.make_args(), targets=("sm_80",))]
  assert names == ["sparse_attention_fwd", "sparse_attention_dq", "sparse_attention_dkv"]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_table_entry_compiles_for_a100_and_h100_without_spills(case):
  rows = cubin.kernel_resources(case.fn, *case.make_args(), targets=TARGETS)
  assert rows and {r.target for r in rows} == set(TARGETS)
  for r in rows:
    limits = cubin.TARGETS[r.target]
    assert r.spill_bytes == 0, f"{case.label} spills {r.spill_bytes} B on {r.target}"
    assert r.shared_bytes <= limits.shared_per_block and r.registers <= limits.max_registers_per_thread
    assert r.occupancy.warps_per_sm >= r.num_warps  # at least one block fits on an SM
    if case.num_warps is not None:
      assert (r.num_warps, r.num_stages) == (case.num_warps, case.num_stages)


def test_bench_kernels_smoke(capsys):
  from jaxeff.bench import kernels

  assert kernels.main(["--only", "decode int8 per-channel", "--targets", "sm_90"]) == 0
  out = capsys.readouterr().out
  assert "| quant_matmul decode int8 per-channel | quant_matmul | sm_90 |" in out and "waves" in out
  assert kernels.main(["--targets", "sm_75"]) == 2 and "error: unknown targets" in capsys.readouterr().err
