"""What jaxeff's command lines share: argument parsing (flags and `key=value` overrides in any
order, bad usage as one `error:` line instead of argparse's usage block) and the library's log
messages on stderr.

>>> from jaxeff import cli
>>> parser = cli.ArgumentParser(prog="python -m jaxeff.train")
>>> _ = parser.add_argument("--resume", action="store_true")
>>> _ = parser.add_argument("overrides", nargs="*", metavar="key=value")
>>> args = parser.parse(["steps=8", "--resume", "output_dir=r1"])     # flags and overrides intermixed
>>> args.resume, args.overrides
(True, ['steps=8', 'output_dir=r1'])
>>> try:
...   parser.parse(["--bogus"])
... except cli.UsageError as e:                                      # a command line prints it as one line
...   print(f"error: {e}")
error: unrecognized arguments: --bogus (see python -m jaxeff.train --help)

Plain `parse_args` stops collecting a `nargs="*"` positional at the first flag, so an override
after a flag is "unrecognized"; `parse_intermixed_args` (used by `parse`) collects positionals
from anywhere on the line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jaxeff.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors raise `UsageError` and whose `parse` takes flags and
  positionals in any order. `--help` still prints and exits 0."""

  def error(self, message: str):
    raise UsageError(f"{message} (see {self.prog} --help)")

  def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses `argv` (default: `sys.argv[1:]`), positionals and flags intermixed."""
    return self.parse_intermixed_args(argv)


class _Stderr(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is at the moment (a test may have replaced it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def log_to_stderr(level: int = logging.INFO) -> None:
  """Shows the library's log messages (logger "jaxeff") on stderr, one plain line each. For command
  lines, which call it at start; `import jaxeff` configures no logging. Idempotent."""
  logger = logging.getLogger("jaxeff")
  logger.setLevel(level)
  if not any(isinstance(h, _Stderr) for h in logger.handlers):
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
