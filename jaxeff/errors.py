"""Every error jaxeff raises on purpose, under one base class.

A command line catches `JaxeffError` and prints its message as one `error:` line (exit 2); a
library user can catch one type, or the specific one. Each class also derives from the builtin
that fits it (ValueError for bad input, RuntimeError for a run that cannot go on), so code written
against the builtins keeps working. Anything else that escapes is a bug.
"""

from __future__ import annotations


class JaxeffError(Exception):
  """Base class: the message names the problem and, where there is one, the fix."""


class ConfigError(JaxeffError, ValueError):
  """A config file or override names an unknown key, has a wrong value type or an impossible value."""


class ShardingError(JaxeffError, ValueError):
  """An unknown logical axis name, or a layout the rules cannot express."""


class MeshError(ShardingError):
  """A mesh shape that does not fit the available devices."""


class DataError(JaxeffError, ValueError):
  """Training data that cannot be read, tokenized or batched as asked."""


class CheckpointError(JaxeffError, ValueError):
  """A checkpoint is missing, unreadable, damaged, or does not fit what is asked of it."""


class HFError(JaxeffError, ValueError):
  """A Hugging Face checkpoint directory (or its tokenizer) that cannot be loaded or written."""


class GGUFError(HFError):
  """A GGUF file that cannot be read, converted or served (a kind of model file error, as HF's)."""


class QuantizationError(JaxeffError, ValueError):
  """Quantization settings or a quantized checkpoint that cannot be used."""


class GenerationError(JaxeffError, ValueError):
  """Prompts or settings the generator cannot serve."""


class TrainError(JaxeffError, RuntimeError):
  """Training cannot start or continue (checkpoints in the way, a diverged loss, ...)."""


class UsageError(JaxeffError, ValueError):
  """A command line that is wrong itself (unknown flag, missing value); the message says how."""
