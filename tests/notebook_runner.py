"""Runs a colab/ notebook top to bottom (nbclient, fresh kernel). The notebooks are split over three
test files (the suite distributes whole files over its workers, and together they would make one
worker's run the longest); `test_notebooks.py` checks that each notebook is in exactly one."""

import pathlib

import helpers
import nbformat
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
# Generation with SmolLM2 (the serving notebook, a server in the background, stays with the others).
GENERATION = ("inference", "long_context", "speculative_decoding")
# Fine-tuning SmolLM2, the longest notebook.
FINETUNE = ("finetune",)


def notebooks(names=None) -> list[pathlib.Path]:
  paths = sorted(COLAB.glob("*.ipynb"))
  return [p for p in paths if names is None or p.stem in names]


def run(path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
  """Runs the notebook in a fresh kernel on one CPU device, as on a Colab CPU runtime (over the
  suite's 8 fake devices sharing 2 cores, training SmolLM2 took over 10 minutes for what one device
  does in one), compiled with XLA:CPU's usual optimizations: the suite's cheapest-compile flags
  cost a notebook more in run time than they save (the inference notebook: 92 s with them, 47 s
  without, measured alone). The processes a notebook starts inherit both."""
  cheap = ("--xla_backend_optimization_level", "--xla_llvm_disable_expensive_passes")
  flags = [f for f in helpers.cpu_env()["XLA_FLAGS"].split() if not f.startswith(cheap)]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
