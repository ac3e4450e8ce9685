"""Every notebook in colab/ runs top to bottom (nbclient, fresh kernel): the generation notebooks in
test_notebooks_generation.py, fine-tuning in test_notebook_finetune.py, the rest here."""

import notebook_runner
import pytest

ELSEWHERE = notebook_runner.GENERATION + notebook_runner.FINETUNE
OTHERS = [p for p in notebook_runner.notebooks() if p.stem not in ELSEWHERE]


def test_every_notebook_is_run_by_one_file():
  names = {p.stem for p in notebook_runner.notebooks()}
  assert set(ELSEWHERE) <= names and len(OTHERS) + len(ELSEWHERE) == len(names)


@pytest.mark.slow
@pytest.mark.parametrize("path", OTHERS, ids=[p.stem for p in OTHERS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook_runner.run(path, tmp_path, monkeypatch)
