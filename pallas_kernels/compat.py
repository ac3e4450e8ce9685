"""The one bridge between the jax versions jaxeff supports (0.10.2 through 0.11.x).

`lowering_for(platform)`: lower a jitted function holding Pallas GPU kernels for CUDA on a host
without a GPU (the lowering tests, `pallas_kernels.cubin`):

  with jax.set_mesh(mesh), lowering_for("cuda"):       # the mesh is optional
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

jax 0.10.2's Triton lowering needed nothing. jax 0.11 asks the device for its compute capability
and, on a CPU-only host, raises "No supported GPU devices found, please specify an abstract GPU
device" unless the abstract mesh carries a `jax.sharding.AbstractDevice` of a known GPU; 0.10.2
accepts the same context, so there is no version test. On a machine with a GPU, and for every
other platform, the context does nothing.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# The GPU a CPU-only lowering targets (sm_90); only its compute capability matters.
LOWERING_GPU = "NVIDIA H100"


@contextlib.contextmanager
def lowering_for(platform: str):
  """A context in which `.lower(lowering_platforms=(platform,))` works on this host."""
  if platform not in ("cuda", "gpu") or jax.default_backend() == "gpu":
    yield
    return
  device = AbstractDevice(device_kind=LOWERING_GPU, num_cores=None, platform="gpu")
  current = jax.sharding.get_abstract_mesh()
  if current.empty:  # no mesh: a one-device abstract mesh only carries the device
    mesh = AbstractMesh((1,), ("_lowering",), axis_types=(AxisType.Explicit,), abstract_device=device)
  else:  # the context's mesh, same axes, on the abstract GPU
    mesh = AbstractMesh(current.axis_sizes, current.axis_names, axis_types=current.axis_types, abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    yield
