"""Every notebook in colab/ runs top to bottom (nbclient, fresh kernel): the generation notebooks in
test_notebooks_generation.py, fine-tuning in test_notebook_finetune.py, the rest here."""

import notebook_runner
import pytest

ELSEWHERE = notebook_runner.GENERATION + notebook_runner.FINETUNE
OTHERS = [p for p in notebook_runner.notebooks() if p.stem not in ELSEWHERE]


def test_every_notebook_is_run_by_one_file():
  names = {p.stem for p in notebook_runner.notebooks()}
  assert set(ELSEWHERE) <= names and len(OTHERS) + len(ELSEWHERE) == len(names)


def test_suite_sizes_reassign_each_notebooks_own_parameters():
  import nbformat

  assert set(notebook_runner.SUITE_PARAMETERS) <= {p.stem for p in notebook_runner.notebooks()}
  for path in notebook_runner.notebooks(notebook_runner.SUITE_PARAMETERS):
    values = notebook_runner.SUITE_PARAMETERS[path.stem]
    nb = notebook_runner.with_parameters(nbformat.read(path, as_version=4), values)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nb.cells[at + 1]
    assert injected.metadata["tags"] == ["injected-parameters"], path.stem
    scope = {}
    exec(injected.source, scope)
    assert {k: scope[k] for k in values} == values, path.stem
  nb = nbformat.read(notebook_runner.notebooks(["quickstart"])[0], as_version=4)
  with pytest.raises(AssertionError, match="does not assign"):
    notebook_runner.with_parameters(nb, {"NO_SUCH_PARAMETER": 1})


@pytest.mark.slow
@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook_runner.run(path, tmp_path, monkeypatch)
