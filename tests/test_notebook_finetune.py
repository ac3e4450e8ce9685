"""The fine-tuning notebook (SmolLM2, a few optimizer steps, export to GGUF, llama.cpp) runs top to
bottom on one CPU device; a file of its own, the suite's longest notebook, so the workers share
the notebooks evenly (notebook_runner.py)."""

import notebook_runner
import pytest

PATHS = notebook_runner.notebooks(notebook_runner.FINETUNE)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook_runner.run(path, tmp_path, monkeypatch)
