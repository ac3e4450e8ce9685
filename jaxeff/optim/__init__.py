"""Optimizers as optax GradientTransformations (one per module, like optax).

- `cautious(direction)`, `c_adamw`, `c_lion`: cautious masking (Liang et al. 2024), decay outside
  the mask, one mean per layer of a scanned stack.
- `muon`, `c_muon`: Muon with the Moonlight recipe, routed by logical axes; c_muon is C-Optim's.
- `distributed_lion`, `local_grads`: Distributed Lion with packed three-valued votes.
- `galore`: reference-faithful GaLore (smaller side projected, the references' side for square
  matrices, scale 0.25).
- `online_subspace_descent` / `osd`: Online Subspace Descent (online-PCA projector).
- `build(name, **hyperparams)`: the CLI entry point; `spec(name)`: what a training loop must do for it.

Every `update` accepts and ignores extra keywords (optax's `with_extra_args_support` convention).
- `logical_axes_from_state(state)`: logical names of an `nnx.State` for `logical_axes=`.
"""

from jaxeff.optim.cautious import c_adamw, c_lion, cautious
from jaxeff.optim.distributed_lion import distributed_lion, local_grads
from jaxeff.optim.galore import galore, scale_by_galore
from jaxeff.optim.matrices import BATCH_AXES, PROJECTED_AXES, VOCAB_AXES, MatrixDims, logical_axes_from_state
from jaxeff.optim.muon import c_muon, muon
from jaxeff.optim.osd import online_subspace_descent, osd, scale_by_osd
from jaxeff.optim.registry import OPTIMIZERS, OptimizerSpec, build, spec

__all__ = [
  "BATCH_AXES",
  "PROJECTED_AXES",
  "VOCAB_AXES",
  "MatrixDims",
  "logical_axes_from_state",
  "cautious",
  "c_adamw",
  "c_lion",
  "muon",
  "c_muon",
  "distributed_lion",
  "local_grads",
  "galore",
  "scale_by_galore",
  "online_subspace_descent",
  "osd",
  "scale_by_osd",
  "build",
  "spec",
  "OptimizerSpec",
  "OPTIMIZERS",
]
