"""`build(name, **hyperparams)`: the one entry the training CLI uses to make an optimizer."""

from __future__ import annotations

import inspect

import optax

from jaxeff.optim.cautious import c_adamw, c_lion
from jaxeff.optim.distributed_lion import distributed_lion
from jaxeff.optim.galore import galore
from jaxeff.optim.muon import c_muon, muon
from jaxeff.optim.osd import online_subspace_descent

OPTIMIZERS = {
    "adamw": optax.adamw,
    "c_adamw": c_adamw,
    "lion": optax.lion,
    "c_lion": c_lion,
    "distributed_lion": distributed_lion,
    "muon": muon,
    "c_muon": c_muon,
    "galore": galore,
    "osd": online_subspace_descent,
}


def build(name: str, **hyperparams) -> optax.GradientTransformation:
  """Optimizer `name` with optax-style keyword hyperparameters (learning_rate, b1, weight_decay...).

  `logical_axes=` is passed to muon, c_muon, galore and osd and dropped for the others, so a
  caller may always pass it. Unknown names or hyperparameters raise ValueError.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
  factory = OPTIMIZERS[name]
  params = inspect.signature(factory).parameters
  if "logical_axes" not in params:
    hyperparams.pop("logical_axes", None)
  unknown = [k for k in hyperparams if k not in params]
  if unknown:
    raise ValueError(f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for {name!r}; "
                     f"valid: {', '.join(params)}")
  return factory(**hyperparams)
