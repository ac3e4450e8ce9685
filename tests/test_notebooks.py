"""Every notebook in colab/ runs top to bottom (nbclient, fresh kernel)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


@pytest.fixture
def optimized_xla(monkeypatch):
  """The kernel (and the processes it starts) compile with XLA:CPU's usual optimizations: the
  suite's cheapest-compile flags (conftest) cost a notebook more in run time than they save (the
  inference notebook: 92 s with them, 47 s without, measured alone)."""
  cheap = ("--xla_backend_optimization_level", "--xla_llvm_disable_expensive_passes")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(cheap)]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, optimized_xla):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
