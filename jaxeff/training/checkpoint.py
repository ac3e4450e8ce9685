"""`Checkpointer`: the one orbax idiom for everything jaxeff writes to disk.

A checkpoint directory holds numbered steps; each step holds named items, array trees
(`ocp.args.StandardSave`, one OCDBT tree per item) and JSON documents (`ocp.args.JsonSave`).
Arrays restore straight into the shardings of an abstract target (`jax.ShapeDtypeStruct`s with
`.sharding`), so a restored model is born sharded, on any mesh. Used by training
(`TrainState` + data iterator + metadata per step), `load_checkpoint` (the params item alone),
and `save_quantized` / `load_quantized` (one step).

  ckpt = Checkpointer(dir, keep=2, async_save=True)
  ckpt.save(100, arrays={"params": params}, documents={"meta": {...}})
  ckpt.document(100, "meta")                          # JSON only: cheap, no arrays read
  ckpt.restore(100, {"params": abstract_with_shardings})["params"]

Orbax writes each step to a temporary folder and renames it when complete, so a step listed by
`steps()` was fully written; with `keep=N` older steps are removed only after a newer one commits.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not fit what is asked of it."""


class Checkpointer:
  """Numbered checkpoints of named array trees and JSON documents in `directory`.

  Args:
    directory: where the steps live (created on the first save).
    keep: how many of the newest steps to keep (None: all).
    async_save: return from `save` once the arrays are copied off the devices and write in the
      background (`wait` or `close` to finish).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int | None = None, async_save: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, arrays: dict[str, Any], documents: dict[str, Any] | None = None) -> None:
    """Writes step `step`: each entry of `arrays` (pytrees of jax Arrays) and of `documents`
    (JSON-serialisable) as an item of that name."""
    self.directory.mkdir(parents=True, exist_ok=True)
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    items.update({name: ocp.args.JsonSave(doc) for name, doc in (documents or {}).items()})
    self._manager.save(step, args=ocp.args.Composite(**items))

  def _check_step(self, step: int):
    if step not in self._manager.all_steps():
      raise CheckpointError(f"no checkpoint step {step} in {self.directory} (steps: {self.steps() or 'none'})")

  def document(self, step: int, name: str) -> Any:
    """The JSON item `name` of step `step`."""
    self._check_step(step)
    return self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

  def restore(self, step: int, targets: dict[str, Any], documents: tuple[str, ...] = ()) -> dict[str, Any]:
    """Items of step `step`: each array item into its target's shapes, dtypes and shardings
    (a tree of `jax.ShapeDtypeStruct` with `.sharding`), plus the named JSON items."""
    self._check_step(step)
    items = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    items.update({name: ocp.args.JsonRestore() for name in documents})
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return {name: restored[name] for name in items}

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
