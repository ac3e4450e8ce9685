"""Runs a colab/ notebook top to bottom (nbclient, fresh kernel). The notebooks are split over three
test files (the suite distributes whole files over its workers, and together they would make one
worker's run the longest); `test_notebooks.py` checks that each notebook is in exactly one."""

import pathlib
import re

import helpers
import nbformat
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
# Generation with SmolLM2 (the serving notebook, a server in the background, stays with the others).
GENERATION = ("inference", "long_context", "speculative_decoding")
# Fine-tuning SmolLM2, the longest notebook.
FINETUNE = ("finetune",)

# The sizes the suite runs each notebook at (papermill's convention: a cell after the one tagged
# "parameters" reassigns them; Colab ignores the tag). A notebook's own values are for a reader on a
# Colab CPU runtime; these run every cell, code path and assertion in a fraction of the time.
SUITE_PARAMETERS = {
  "inference": dict(SAMPLE_TOKENS=8, SPEED_TOKENS=4, SPEED_BATCHES=(1,)),
  "long_context": dict(CONTEXT=192, BUDGETS=(48,), STREAM_TOKENS=40),
  "speculative_decoding": dict(TRAIN_STEPS=2, SEQUENCES=4, NEW_TOKENS=8),
  "optimizers": dict(STEPS=20),
  "quickstart": dict(STEPS=30),
  "quantization": dict(STEPS=60, WIDE_LAYERS=1),
  "sparse_attention": dict(STEPS=16),
  "serving": dict(CLIENTS=(1, 3)),
  "finetune": dict(STEPS=2, BATCH=1),
}


def notebooks(names=None) -> list[pathlib.Path]:
  paths = sorted(COLAB.glob("*.ipynb"))
  return [p for p in paths if names is None or p.stem in names]


def run(path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
  """Runs the notebook in a fresh kernel on one CPU device, as on a Colab CPU runtime (over the
  suite's 8 fake devices sharing 2 cores, training SmolLM2 took over 10 minutes for what one device
  does in one), with the flags of runtime-bound processes (`helpers.RUNTIME_BOUND_FLAGS`): the
  suite's cheapest-compile flags cost a notebook more in run time than they save (the inference
  notebook: 92 s with them, 47 s without, measured alone). The processes a notebook starts inherit
  both."""
  env = helpers.cpu_env(runtime_bound=True)
  for name in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS"):
    monkeypatch.setenv(name, env[name])
  nb = with_parameters(nbformat.read(path, as_version=4), SUITE_PARAMETERS.get(path.stem, {}))
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors


def with_parameters(nb, values: dict):
  """`nb` with a cell assigning `values` inserted after its cell tagged "parameters", which must
  assign each name itself (a renamed parameter fails here, not silently at the notebook's size)."""
  if not values:
    return nb
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters'"
  source = nb.cells[tagged[0]].source
  missing = [name for name in values if not re.search(rf"^{name}\s*=", source, re.MULTILINE)]
  assert not missing, f"the parameters cell does not assign {missing}"
  cell = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in values.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, cell)
  return nb
