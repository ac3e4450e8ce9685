"""Every docstring example (`>>>`) in jaxeff and pallas_kernels runs and shows what it says."""

import doctest
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _modules_with_examples() -> list[str]:
  names = []
  for package in ("jaxeff", "pallas_kernels"):
    for path in sorted((REPO / package).rglob("*.py")):
      if ">>>" in path.read_text():
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return names


MODULES = _modules_with_examples()


def test_the_main_apis_have_examples():
  for name in (
    "jaxeff.inference.sampling",
    "jaxeff.inference.runner",
    "jaxeff.inference.cache.dense",
    "jaxeff.inference.cache.paged",
    "jaxeff.inference.blocks",
    "jaxeff.inference.perplexity",
    "jaxeff.generate.generator",
    "jaxeff.serve.engine",
    "jaxeff.models.llama",
    "jaxeff.sharding",
    "jaxeff.quantization",
    "jaxeff.training.loop",
    "jaxeff.checkpoint",
    "jaxeff.hf",
    "jaxeff.optim.muon",
    "pallas_kernels.quant_matmul",
    "pallas_kernels.sparse_attention",
    "pallas_kernels.ragged_paged_attention",
  ):
    assert name in MODULES, name


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.attempted > 0, f"{name} has '>>>' but no example was collected"
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name} (output above)"
