"""`Checkpointer`: the one orbax idiom for everything jaxeff writes to disk.

A checkpoint directory holds numbered steps; each step holds named items, array trees
(`ocp.args.StandardSave`, one OCDBT tree per item) and JSON documents (`ocp.args.JsonSave`).
Arrays restore straight into the shardings of an abstract target (`jax.ShapeDtypeStruct`s with
`.sharding`), so a restored model is born sharded, on any mesh. Used by training
(`TrainState` + data iterator + metadata per step), `load_checkpoint` (the params item alone),
and `save_quantized` / `load_quantized` (one step).

>>> import tempfile, jax, jax.numpy as jnp
>>> from jaxeff.checkpoint import Checkpointer
>>> params = {"w": jnp.arange(3.0)}
>>> with Checkpointer(tempfile.mkdtemp(), keep=2) as ckpt:
...   ckpt.save(100, arrays={"params": params}, documents={"meta": {"note": "first"}})
...   meta = ckpt.document(100, "meta")                 # JSON only: cheap, no arrays read
...   target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
...   restored = ckpt.restore(100, {"params": target})["params"]   # straight into `target`'s shardings
...   newest, _, skipped = ckpt.restore_newest(lambda s: ckpt.restore(s, {"params": target}))  # survives bad ones
>>> meta, restored["w"].tolist(), newest, skipped
({'note': 'first'}, [0.0, 1.0, 2.0], 100, [])

What survives what:
- A killed save: orbax writes each step into a temporary folder and renames it when complete, so
  a step listed by `steps()` was fully written; `remove_partial_saves=True` (the training writer)
  deletes the leftover temporary folders.
- Bit rot, a torn copy, an overwritten file: once a step is committed, process 0 writes
  `SHA256SUMS` into it (`sha256sum -c SHA256SUMS` checks it by hand too). Orbax checksums only
  its indexes, not the array bytes (most of which zstd stores raw: an overwritten chunk would
  read back as wrong numbers), so every read first compares the files it needs with that record.
  A step without the record (killed between commit and record, or written by an older jaxeff)
  is checked only by reading it back.
- Every failure to read becomes one `CheckpointError` naming the step and what failed.
- Retention (`keep`) is done here, not by orbax's `max_to_keep` (which deletes old steps even
  when the new save failed): old steps are deleted only after a newer step is committed and its
  record written, so `keep` intact steps exist at every moment once `keep` were saved.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import pathlib
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxeff.errors import CheckpointError

# The record of a committed step's files, in `sha256sum`'s format ("<hex digest>  <path>").
CHECKSUMS = "SHA256SUMS"
T = TypeVar("T")


def describe_error(e: BaseException, limit: int = 300) -> str:
  """The innermost cause of `e`, on one short line (tensorstore appends its whole spec)."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- reports of abandoned reads
#
# Orbax reads a step's chunks as concurrent coroutines on a private event loop and stops at the
# first failure. The reads still in flight then outlive the loop: (1) tensorstore's threads finish
# them and try to wake the closed loop ("RuntimeError: Event loop is closed" from
# `call_soon_threadsafe`, reported through `sys.unraisablehook`, or `sys.excepthook`); (2)
# coroutines are discarded with their own read error (`sys.unraisablehook`, "Exception ignored
# in: <coroutine ...>"); (3) asyncio logs the gathered futures' unretrieved errors ("Task exception
# was never retrieved"). Depending on thread timing that is zero to dozens of tracebacks around
# the one error a failed read already became. Only these are recognised, by where they were
# raised; everything else reaches the previous hooks.


def _closed_loop_wakeup(exc: BaseException | None, tb) -> bool:
  return (
    isinstance(exc, RuntimeError)
    and str(exc) == "Event loop is closed"
    and tb is not None
    and any(
      f.name == "call_soon_threadsafe" and f.filename.endswith("base_events.py") for f in traceback.extract_tb(tb)
    )
  )


def _from_abandoned_read(exc: BaseException | None) -> bool:
  """`exc` (or its causes) was raised in orbax's checkpoint code or by a read of an OCDBT file."""
  seen = 0
  while exc is not None and seen < 16:
    if any("/orbax/checkpoint/" in f.filename.replace("\\", "/") for f in traceback.extract_tb(exc.__traceback__)):
      return True
    if "in OCDBT database" in str(exc):  # a tensorstore read future of the same restore
      return True
    exc, seen = exc.__cause__ or exc.__context__, seen + 1
  return False


def is_abandoned_read_report(exc: BaseException | None, tb=None) -> bool:
  """Whether an exception reported by a hook is one of the reports (1)-(3) above."""
  return _closed_loop_wakeup(
    exc, tb if tb is not None else getattr(exc, "__traceback__", None)
  ) or _from_abandoned_read(exc)


class _AbandonedReadLogs(logging.Filter):
  """(3): asyncio's log records of unretrieved errors of abandoned reads. `everything=True` (only
  around `_collect_failed_reads`' own `gc.collect`) drops every unretrieved-task record."""

  def __init__(self, everything: bool = False):
    super().__init__()
    self.everything = everything

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith(
      (
        "Task exception was never retrieved",
        "Future exception was never retrieved",
        "Task was destroyed but it is pending",
      )
    ):
      return True
    if self.everything:
      return False
    return not (record.exc_info and is_abandoned_read_report(record.exc_info[1], record.exc_info[2]))


def quiet_abandoned_reads() -> None:
  """Drops the reports (1)-(3) of a failed read's abandoned siblings from stderr, process-wide
  (`sys.excepthook`, `sys.unraisablehook`, asyncio's logger). For command lines, which call it
  at start; `import jaxeff` never changes process-wide hooks. Idempotent."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadLogs) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReadLogs())
  if getattr(sys.unraisablehook, "jaxeff_quiet", False):
    return
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, tb):
    if not is_abandoned_read_report(value, tb):
      previous_excepthook(kind, value, tb)

  def unraisablehook(unraisable):
    if not is_abandoned_read_report(unraisable.exc_value, unraisable.exc_traceback):
      previous_unraisablehook(unraisable)

  unraisablehook.jaxeff_quiet = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _collect_failed_reads() -> None:
  """Collects a failed restore's orphaned read tasks now, without their duplicate reports."""
  asyncio_log, quiet = logging.getLogger("asyncio"), _AbandonedReadLogs(everything=True)
  asyncio_log.addFilter(quiet)
  try:
    gc.collect()
  finally:
    asyncio_log.removeFilter(quiet)


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: pathlib.Path) -> None:
  """Records the SHA-256 of every file in `step_dir` in `step_dir/SHA256SUMS` (atomically)."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(CHECKSUMS))
  text = "".join(f"{_sha256(p)}  {p.relative_to(step_dir).as_posix()}\n" for p in files)
  tmp = step_dir / f"{CHECKSUMS}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / CHECKSUMS)


def damaged_files(step_dir: pathlib.Path, items: tuple[str, ...] | None = None) -> list[str] | None:
  """What in `step_dir` differs from its `SHA256SUMS` ("params/_sharding changed", ...); only
  the files of `items` and the step's own files when given. None: no record to check against.

  Raises:
    CheckpointError: the record itself is unreadable.
  """
  record = step_dir / CHECKSUMS
  if not record.exists():
    return None
  try:
    entries = [line.split("  ", 1) for line in record.read_text().splitlines()]
    if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
      raise ValueError("not in sha256sum format")
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
    raise CheckpointError(f"its {CHECKSUMS} is unreadable ({describe_error(e)})") from e
  bad = []
  for digest, name in entries:
    if items is not None and "/" in name and name.split("/", 1)[0] not in items:
      continue
    path = step_dir / name
    if not path.is_file():
      bad.append(f"{name} is missing")
    elif _sha256(path) != digest:
      bad.append(f"{name} changed since it was saved")
  return bad


class Checkpointer:
  """Numbered checkpoints of named array trees and JSON documents in `directory`.

  Args:
    directory: where the steps live (created on the first save).
    keep: how many of the newest steps to keep (None: all). A step is deleted only after a newer
      one is committed and recorded.
    async_save: return from `save` once the arrays are copied off the devices and write in the
      background (`wait` or `close` to finish).
    read_only: never write or delete anything (readers of a directory another run may be writing).
    remove_partial_saves: delete temporary folders that killed saves left behind (only the run
      that owns the directory should).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    keep: int | None = None,
    async_save: bool = False,
    read_only: bool = False,
    remove_partial_saves: bool = False,
  ):
    if keep is not None and keep < 1:
      raise ValueError(f"keep must be >= 1 or None, got {keep}")
    self.directory = pathlib.Path(directory).absolute()
    self.keep, self.read_only = keep, read_only
    # Not orbax's read_only, which logs a warning on every open. Step metadata is read when the
    # step is, after its checksums are checked.
    self._options = dict(enable_async_checkpointing=async_save, create=False, lightweight_initialize=True)
    self._uncommitted: list[int] = []  # saved, not yet known to be committed and recorded
    self._verified: set[tuple[int, str | None]] = set()
    self._manager = self._open(cleanup=remove_partial_saves and not read_only)

  def _open(self, cleanup: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(**self._options, cleanup_tmp_directories=cleanup)
    return ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, arrays: dict[str, Any], documents: dict[str, Any] | None = None) -> None:
    """Writes step `step`: each entry of `arrays` (pytrees of jax Arrays) and of `documents`
    (JSON-serialisable) as an item of that name. Steps beyond `keep` are deleted once this one
    is committed (for an asynchronous save: at the next `save`, `wait` or `close`)."""
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    self.directory.mkdir(parents=True, exist_ok=True)
    self.wait()
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    items.update({name: ocp.args.JsonSave(doc) for name, doc in (documents or {}).items()})
    self._manager.save(step, args=ocp.args.Composite(**items))
    self._uncommitted.append(step)
    if not self._options["enable_async_checkpointing"]:
      self.wait()

  def wait(self) -> None:
    """Blocks until saves are committed; records their checksums and applies `keep`.

    Raises:
      CheckpointError: a save did not commit (orbax logs why); older steps are left alone.
    """
    self._manager.wait_until_finished()
    pending, self._uncommitted = self._uncommitted, []
    for step in pending:
      step_dir = self.directory / str(step)
      if not step_dir.is_dir():  # orbax logs a failed background commit instead of raising
        raise CheckpointError(
          f"saving checkpoint step {step} in {self.directory} failed (see the log above); the older steps are kept"
        )
      if jax.process_index() == 0:
        write_checksums(step_dir)
      self._remove_older_than(step)

  def _remove_older_than(self, newest: int) -> None:
    if self.keep is None:
      return
    for old in self.steps()[: -self.keep]:
      if old < newest:
        self._manager.delete(old)  # process 0 deletes; all processes forget it

  def verify(self, step: int, items: tuple[str, ...] | None = None) -> None:
    """Checks step `step`'s files (those of `items` and the step's own, or all) against the
    checksums recorded when it was committed; each file is read once per Checkpointer.

    Raises:
      CheckpointError: the step is not there, or a file is missing or changed.
    """
    self._check_step(step)
    names = (None,) if items is None else items
    if all((step, n) in self._verified or (step, None) in self._verified for n in names):
      return
    try:
      bad = damaged_files(self.directory / str(step), items)
    except CheckpointError as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {e}") from None
    if bad:
      more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {bad[0]}{more}")
    self._verified.update((step, n) for n in names)

  def _check_step(self, step: int):
    if step not in self._manager.all_steps():
      raise CheckpointError(f"no checkpoint step {step} in {self.directory} (steps: {self.steps() or 'none'})")

  def _read(self, step: int, items: dict[str, Any]) -> Any:
    self.verify(step, tuple(items))
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore, orbax and json raise many types for unreadable bytes
      message = f"checkpoint step {step} in {self.directory} cannot be read ({describe_error(e)})"
    _collect_failed_reads()  # `e` is gone: its traceback no longer holds orbax's read tasks
    raise CheckpointError(message)

  def document(self, step: int, name: str) -> Any:
    """The JSON item `name` of step `step`."""
    return self._read(step, {name: ocp.args.JsonRestore()})[name]

  def restore(self, step: int, targets: dict[str, Any], documents: tuple[str, ...] = ()) -> dict[str, Any]:
    """Items of step `step`: each array item into its target's shapes, dtypes and shardings
    (a tree of `jax.ShapeDtypeStruct` with `.sharding`), plus the named JSON items.

    Raises:
      CheckpointError: the step is missing, damaged, or cannot be read.
    """
    items = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    items.update({name: ocp.args.JsonRestore() for name in documents})
    restored = self._read(step, items)
    return {name: restored[name] for name in items}

  def restore_newest(self, read: Callable[[int], T]) -> tuple[int, T, list[tuple[int, str]]]:
    """`read(step)` from the newest step down, until one does not raise `CheckpointError`.

    Args:
      read: reads one step (through `document` / `restore`); other exceptions propagate, so a
        checkpoint that reads fine but does not fit stops the search.

    Returns:
      (step, what `read` returned, [(newer step, why it was skipped), ...] newest first).

    Raises:
      CheckpointError: no step at all, or none reads (the message lists every step and why).
    """
    skipped: list[tuple[int, str]] = []
    for step in reversed(self.steps()):
      try:
        return step, read(step), skipped
      except CheckpointError as e:
        skipped.append((step, str(e).replace(f"checkpoint step {step} in {self.directory} ", "")))
    if not skipped:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    reasons = "; ".join(f"step {s} {why}" for s, why in skipped)
    raise CheckpointError(f"no checkpoint in {self.directory} reads back completely: {reasons}")

  def set_aside(self, step: int, destination: str | os.PathLike) -> pathlib.Path:
    """Moves step `step` out of the directory (into `destination/<step>`; never deletes it), so
    that a resumed run can write that step again. Returns where it went."""
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    destination = pathlib.Path(destination)
    target = destination / str(step)
    for n in range(1, 1000):
      if not target.exists():
        break
      target = destination / f"{step}.{n}"
    if jax.process_index() == 0:
      destination.mkdir(parents=True, exist_ok=True)
      os.replace(self.directory / str(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxeff checkpoint step {step} set aside")
    self._manager.close()  # forget the step (a reload would re-read every step's metadata)
    self._manager = self._open()
    self._verified = {v for v in self._verified if v[0] != step}
    return target

  def close(self) -> None:
    """Finishes saves (see `wait`) and stops orbax's background threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
