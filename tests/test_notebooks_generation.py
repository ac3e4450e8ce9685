"""The generation notebooks (inference, long context, speculative decoding) run top to bottom (see
notebook_runner.py for why they have a file of their own)."""

import notebook_runner
import pytest

PATHS = notebook_runner.notebooks(notebook_runner.GENERATION)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook_runner.run(path, tmp_path, monkeypatch)
