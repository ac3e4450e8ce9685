"""The training engine: state, steps, checkpoints, hooks, and the loop that ties them together.

- `config`: `TrainConfig`, `OptimizerConfig`, `load_config`.
- `state`: `TrainState` (step, params, optimizer state, RNG) and its shardings from logical axes.
- `step`: the optimizer chain and the train/eval steps, from the optimizer's `OptimizerSpec`.
- `checkpoint`: `Checkpointer`, the one orbax idiom.
- `hooks`: metrics, evaluation, progress, the NaN guard, checkpoint-every.
- `loop`: `train(cfg)` and `load_checkpoint(output_dir)`.

`python -m jaxeff.train` is the command line; `jaxeff.train` re-exports this API.
"""

from jaxeff.training.checkpoint import CheckpointError, Checkpointer
from jaxeff.training.config import (OptimizerConfig, TrainConfig, TrainError, config_from_dict, config_to_dict,
                                    load_config)
from jaxeff.training.hooks import Hook, StepContext
from jaxeff.training.loop import TrainResult, load_checkpoint, peak_flops_per_device, train
from jaxeff.training.state import TrainState, abstract_state, init_state, state_shardings
from jaxeff.training.step import loss_fn, lr_schedule, make_eval_step, make_optimizer, make_train_step, optimizer_spec

__all__ = [
    "CheckpointError", "Checkpointer", "OptimizerConfig", "TrainConfig", "TrainError", "config_from_dict",
    "config_to_dict", "load_config", "Hook", "StepContext", "TrainResult", "load_checkpoint",
    "peak_flops_per_device", "train", "TrainState", "abstract_state", "init_state", "state_shardings",
    "loss_fn", "lr_schedule", "make_eval_step", "make_optimizer", "make_train_step", "optimizer_spec",
]
