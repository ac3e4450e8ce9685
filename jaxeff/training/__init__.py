"""The training engine: state, steps, hooks, and the loop that ties them together.

- `config`: `TrainConfig`, `OptimizerConfig`, `MedusaConfig`, `load_config` (`init_from` through
  `jaxeff.load`).
- `state`: `TrainState` (step, params, optimizer state, RNG) and its shardings from logical axes.
- `step`: the optimizer chain and the train/eval steps of any model and loss (`next_token_loss`).
- `hooks`: metrics, evaluation, progress, the NaN guard, checkpoint-every.
- `loop`: `Trainer` (a run's pieces and a generator of steps; any model factory, loss and
  trainable subset), `train(cfg)`, `load_checkpoint`.

Other engines' models train on the same `Trainer`: Medusa heads on a frozen base, for one
(`jaxeff.generate.speculative.medusa_training`, the `medusa.base=` mode of `python -m jaxeff.train`).

Checkpoints go through `jaxeff.checkpoint.Checkpointer`. `python -m jaxeff.train` is the command
line; `jaxeff.train` re-exports this API.
"""

from jaxeff.checkpoint import Checkpointer
from jaxeff.errors import CheckpointError, TrainError
from jaxeff.training.config import (
  MedusaConfig,
  OptimizerConfig,
  TrainConfig,
  config_from_dict,
  config_to_dict,
  load_config,
)
from jaxeff.training.hooks import Hook, StepContext
from jaxeff.training.loop import (
  StepInfo,
  Trainer,
  TrainResult,
  check_writable,
  llama,
  load_checkpoint,
  measured_peak_flops,
  peak_flops_per_device,
  train,
)
from jaxeff.training.state import TrainState, abstract_state, init_state, state_shardings
from jaxeff.training.step import (
  lr_schedule,
  make_eval_step,
  make_optimizer,
  make_train_step,
  next_token_loss,
  optimizer_spec,
)

__all__ = [
  "CheckpointError",
  "Checkpointer",
  "MedusaConfig",
  "OptimizerConfig",
  "TrainConfig",
  "TrainError",
  "config_from_dict",
  "config_to_dict",
  "load_config",
  "Hook",
  "StepContext",
  "StepInfo",
  "Trainer",
  "TrainResult",
  "check_writable",
  "llama",
  "load_checkpoint",
  "measured_peak_flops",
  "peak_flops_per_device",
  "train",
  "TrainState",
  "abstract_state",
  "init_state",
  "state_shardings",
  "lr_schedule",
  "make_eval_step",
  "make_optimizer",
  "make_train_step",
  "next_token_loss",
  "optimizer_spec",
]
