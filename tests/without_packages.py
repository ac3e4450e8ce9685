"""Runs a module as if some packages were not installed, as on a GPU machine's bare image:

  python tests/without_packages.py grain,gguf,torch -m jaxeff.bench gpu --dry-run

Importing any of the named top-level packages (or their submodules) raises ModuleNotFoundError,
exactly as for an absent package, so optional imports that guard themselves still work.
"""

import importlib.abc
import runpy
import sys


class _Absent(importlib.abc.MetaPathFinder):
  def __init__(self, names: set[str]):
    self.names = names

  def find_spec(self, fullname, path=None, target=None):
    if fullname.split(".")[0] in self.names:
      raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
    return None


def main() -> None:
  names, flag, module, *args = sys.argv[1:]
  if flag != "-m":
    raise SystemExit("usage: python tests/without_packages.py NAME,NAME... -m MODULE [ARGS...]")
  sys.meta_path.insert(0, _Absent(set(names.split(","))))
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
