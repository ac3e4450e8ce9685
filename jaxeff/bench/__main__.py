"""`python -m jaxeff.bench NAME [args...]` runs jaxeff/bench/NAME.py's main(argv).

NAME may come anywhere on the line (`python -m jaxeff.bench --quick attention`): the first
argument that names a benchmark is NAME, and every other argument, in order, goes to it.
"""

import importlib
import pkgutil
import sys

import jaxeff.bench as _bench
from jaxeff import host_malloc

SHARED = {"common", "llama_server", "quant_accuracy"}  # helpers (quant_accuracy: `quant --accuracy-only`)


def available() -> list[str]:
  """The benchmark names: jaxeff/bench's modules, without the shared helpers."""
  return sorted(
    m.name for m in pkgutil.iter_modules(_bench.__path__) if not m.name.startswith("_") and m.name not in SHARED
  )


def split_name(argv: list[str], names: list[str]) -> tuple[str | None, list[str]]:
  """(the first argument in `names`, the other arguments in order); (None, argv) when none is."""
  for i, arg in enumerate(argv):
    if arg in names:
      return arg, argv[:i] + argv[i + 1 :]
  return None, argv


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  names = available()
  name, rest = split_name(argv, names)
  if name is None:
    usage = f"usage: python -m jaxeff.bench {{{','.join(names)}}} [args...]"
    if not argv or any(a in ("-h", "--help") for a in argv):
      print(usage)
      return 0 if argv else 2
    words = [a for a in argv if not a.startswith("-")]
    what = f"unknown benchmark {words[0]!r}" if words else "no benchmark named"
    print(f"error: {what}; choose one of: {', '.join(names)}", file=sys.stderr)
    return 2
  host_malloc.prepare_cpu_host()  # same host settings as `python -m jaxeff.train`
  return importlib.import_module(f"jaxeff.bench.{name}").main(rest) or 0


if __name__ == "__main__":
  sys.exit(main())
