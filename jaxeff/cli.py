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
