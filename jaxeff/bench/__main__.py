"""`python -m jaxeff.bench NAME [args...]` runs jaxeff/bench/NAME.py's main(argv)."""

import importlib
import pkgutil
import sys

import jaxeff.bench as _bench
from jaxeff import host_malloc


def _available():
  return sorted(m.name for m in pkgutil.iter_modules(_bench.__path__) if not m.name.startswith("_"))


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  names = _available()
  if not argv or argv[0] in ("-h", "--help"):
    print(f"usage: python -m jaxeff.bench {{{','.join(names)}}} [args...]")
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  host_malloc.prepare_cpu_host()  # same host settings as `python -m jaxeff.train`
  if name not in names:
    print(f"error: unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
    return 2
  return importlib.import_module(f"jaxeff.bench.{name}").main(rest) or 0


if __name__ == "__main__":
  sys.exit(main())
