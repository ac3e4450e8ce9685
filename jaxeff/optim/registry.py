"""The optimizers the training CLI knows: `build(name, **hyperparams)` and their `OptimizerSpec`s.

A training loop or benchmark asks `spec(name)` what an optimizer needs from it (which gradients,
whether clipping applies, which extra arguments it takes) instead of testing optimizer names.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import optax

from jaxeff.optim.cautious import c_adamw, c_lion
from jaxeff.optim.distributed_lion import distributed_lion
from jaxeff.optim.galore import galore
from jaxeff.optim.muon import c_muon, muon
from jaxeff.optim.osd import online_subspace_descent

GRADIENTS = ("mean", "per_device")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """What a training loop must do for an optimizer.

  Attributes:
    factory: makes the `optax.GradientTransformation` from keyword hyperparameters.
    gradients: "mean": `update` takes the batch-mean gradient (all-reduced over data-parallel
      devices, as usual); "per_device": it takes each device's own gradient, stacked [N, ...]
      over the mesh's "data" axis (`jaxeff.optim.local_grads`), and communicates itself.
    clip: whether global-norm gradient clipping belongs in front of it (False for a per-device
      sign vote: it ignores the gradient's scale, and a global norm would need an all-reduce).
  """

  factory: Callable[..., optax.GradientTransformation]
  gradients: str = "mean"
  clip: bool = True

  def __post_init__(self):
    if self.gradients not in GRADIENTS:
      raise ValueError(f"gradients must be one of {GRADIENTS}, got {self.gradients!r}")

  @property
  def parameters(self) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(self.factory).parameters)

  @property
  def takes_logical_axes(self) -> bool:
    """Routes parameters by their logical axes (`logical_axes=`)."""
    return "logical_axes" in self.parameters

  @property
  def takes_mesh(self) -> bool:
    """Needs the device mesh (`mesh=`)."""
    return "mesh" in self.parameters


OPTIMIZERS: dict[str, OptimizerSpec] = {
  "adamw": OptimizerSpec(optax.adamw),
  "c_adamw": OptimizerSpec(c_adamw),
  "lion": OptimizerSpec(optax.lion),
  "c_lion": OptimizerSpec(c_lion),
  "distributed_lion": OptimizerSpec(distributed_lion, gradients="per_device", clip=False),
  "muon": OptimizerSpec(muon),
  "c_muon": OptimizerSpec(c_muon),
  "galore": OptimizerSpec(galore),
  "osd": OptimizerSpec(online_subspace_descent),
}


def spec(name: str) -> OptimizerSpec:
  """The `OptimizerSpec` of optimizer `name`; ValueError naming the valid ones otherwise."""
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
  return OPTIMIZERS[name]


def build(name: str, **hyperparams) -> optax.GradientTransformation:
  """Optimizer `name` with optax-style keyword hyperparameters (learning_rate, b1, weight_decay...).

  `logical_axes=` and `mesh=` are passed to the optimizers that take them and dropped for the
  others, so a caller may always pass them. Unknown names or hyperparameters raise ValueError.
  """
  s = spec(name)
  params = s.parameters
  for optional in ("logical_axes", "mesh"):
    if optional not in params:
      hyperparams.pop(optional, None)
  unknown = [k for k in hyperparams if k not in params]
  if unknown:
    raise ValueError(
      f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for {name!r}; valid: {', '.join(params)}"
    )
  return s.factory(**hyperparams)
