"""Argument parsing shared by jaxeff's command lines: flags and `key=value` overrides in any order,
and bad usage as one `error:` line instead of argparse's usage block.

  parser = cli.ArgumentParser(prog="python -m jaxeff.train", description="...")
  parser.add_argument("--resume", action="store_true")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  try:
    args = parser.parse(argv)            # `steps=8 --resume output_dir=r1` is fine
  except cli.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

Plain `parse_args` stops collecting a `nargs="*"` positional at the first flag, so an override
after a flag is "unrecognized"; `parse_intermixed_args` (used by `parse`) collects positionals
from anywhere on the line.
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence


class UsageError(ValueError):
  """The command line itself is wrong (unknown flag, missing value); the message says how."""


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors raise `UsageError` and whose `parse` takes flags and
  positionals in any order. `--help` still prints and exits 0."""

  def error(self, message: str):
    raise UsageError(f"{message} (see {self.prog} --help)")

  def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses `argv` (default: `sys.argv[1:]`), positionals and flags intermixed."""
    return self.parse_intermixed_args(argv)


def quiet_closed_event_loop_callbacks() -> None:
  """Drops two harmless reports of a failed checkpoint read from stderr. Orbax reads a step's
  chunks as concurrent coroutines and stops at the first failure; the reads still in flight then
  (1) finish on tensorstore's threads and try to wake orbax's event loop, already closed, each
  printing "RuntimeError: Event loop is closed" (asyncio's `call_soon_threadsafe`, through
  `sys.excepthook`), and (2) are discarded with their own read error ("Exception ignored in:
  <coroutine ...>", through `sys.unraisablehook`): dozens of tracebacks around the one `error:`
  line, depending on timing; (3) asyncio also logs the gathered futures' unretrieved errors. Only
  these are dropped (the first by its exact error and frame, the
  second when raised inside orbax's checkpoint code); everything else reaches the previous hooks.
  A CLI calls this at start: it changes process-wide hooks, which `import jaxeff` never does."""
  import sys
  import traceback

  if getattr(sys.excepthook, "jaxeff_quiet", False):
    return  # already installed
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

  def excepthook(kind, value, tb):
    frames = traceback.extract_tb(tb)
    if (kind is RuntimeError and str(value) == "Event loop is closed"
        and any(f.name == "call_soon_threadsafe" and f.filename.endswith("base_events.py") for f in frames)):
      return
    previous_excepthook(kind, value, tb)

  def unraisablehook(unraisable):
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if frames and any("/orbax/checkpoint/" in f.filename.replace("\\", "/") for f in frames):
      return
    previous_unraisablehook(unraisable)

  excepthook.jaxeff_quiet = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  logging.getLogger("asyncio").addFilter(_AbandonedOrbaxReads())


class _AbandonedOrbaxReads(logging.Filter):
  """(3) asyncio's "... exception was never retrieved" log records for futures that failed inside
  orbax's checkpoint code or reading its OCDBT files (the reads nobody awaits after the first
  failure)."""

  def filter(self, record: logging.LogRecord) -> bool:
    import traceback

    if "exception was never retrieved" not in record.getMessage():
      return True
    exc = record.exc_info[1] if record.exc_info else None
    while exc is not None:
      if any("/orbax/checkpoint/" in f.filename for f in traceback.extract_tb(exc.__traceback__)):
        return False
      if "in OCDBT database" in str(exc):  # a tensorstore read future of the same restore
        return False
      exc = exc.__cause__ or exc.__context__
    return True
