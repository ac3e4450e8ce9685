"""Every notebook in colab/ runs top to bottom (nbclient, fresh kernel): the generation notebooks in
test_notebooks_generation.py, the rest here."""

import notebook_runner
import pytest

OTHERS = [p for p in notebook_runner.notebooks() if p.stem not in notebook_runner.GENERATION]


def test_every_notebook_is_run_by_one_file():
  names = {p.stem for p in notebook_runner.notebooks()}
  assert set(notebook_runner.GENERATION) <= names and len(OTHERS) + len(notebook_runner.GENERATION) == len(names)


@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook_runner.optimized_xla(monkeypatch)
  if path.stem in notebook_runner.SINGLE_DEVICE:
    notebook_runner.single_device(monkeypatch)
  notebook_runner.run(path, tmp_path)
