"""Fine-tuning's starting point: `init_from=PATH` (a Hugging Face directory or a GGUF file).

The run's model config is the checkpoint's, with only compute settings (`jaxeff.config.
COMPUTE_FIELDS`: dtype, param_dtype, remat, attention, scan_layers, max_seq_len, ...) taken from
`model.*` keys the user gave; any architecture key is refused with one line naming it. The
checkpoint's tokenizer becomes the run's (`data.tokenizer`). The parameters are read once per run
and placed straight into their shardings on the mesh (`jaxeff.hf.load(mesh=...)`: no device ever
holds the whole model). A GGUF is converted once to a float Hugging Face directory (dequantizing
quantized blocks; cached by the file's hash, `jaxeff.gguf.converted_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

from flax import nnx

from jaxeff.config import COMPUTE_FIELDS, ModelConfig
from jaxeff.errors import ConfigError

log = logging.getLogger(__name__)


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """The Hugging Face directory for `path` (a GGUF is converted, dequantized, once and cached)."""
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    from jaxeff import gguf

    if not path.is_file():
      raise ConfigError(f"init_from: GGUF file not found: {path}")
    out = gguf.converted_checkpoint(path)
    log.info("init_from %s: GGUF weights dequantized to float32 once (cached in %s)", path, out)
    return out
  if not (path / "config.json").is_file():
    raise ConfigError(f"init_from: {path} is neither a .gguf file nor a Hugging Face directory with config.json")
  return path


def model_config(directory: pathlib.Path, compute: dict) -> ModelConfig:
  """The checkpoint's ModelConfig with the `compute` overrides (architecture changes refused)."""
  from jaxeff import hf

  try:
    hf_cfg = json.loads((directory / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"init_from: {directory / 'config.json'} is not valid JSON: {e}") from None
  try:
    return hf.config_from_hf(hf_cfg, **compute)
  except ConfigError as e:
    raise ConfigError(f"init_from {directory}: {e}") from None


def resolve(cfg, given_model_keys: set[str], default_compute: dict):
  """`cfg` (a TrainConfig with `init_from`) with its model config and tokenizer from the checkpoint.

  Args:
    given_model_keys: the `model.*` keys the user set (a config file's or overrides'); only these
      are applied, and only compute settings may be among them.
    default_compute: compute settings to use where the user gave none (the built-in config's CPU
      attention).
  """
  directory = checkpoint_dir(cfg.init_from)
  compute = {**default_compute, **{k: getattr(cfg.model, k) for k in given_model_keys}}
  model = model_config(directory, compute)
  tokenizer = directory / "tokenizer.json"
  if not tokenizer.is_file():
    raise ConfigError(f"init_from {cfg.init_from}: {directory} has no tokenizer.json (the run's tokenizer)")
  given = cfg.data.tokenizer
  if given is not None and pathlib.Path(given).resolve() != tokenizer.resolve():
    raise ConfigError(
      f"data.tokenizer={given} differs from init_from's tokenizer ({tokenizer}); a fine-tuning run uses the "
      f"pretrained model's tokenizer: drop data.tokenizer"
    )
  data = dataclasses.replace(cfg.data, tokenizer=str(tokenizer))
  return dataclasses.replace(cfg, model=model, data=data)


def load_params(cfg, mesh) -> nnx.State:
  """The pretrained parameters of `cfg.init_from` for `cfg.model`, placed by their logical axes on `mesh`."""
  from jaxeff import hf

  directory = checkpoint_dir(cfg.init_from)
  compute = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig) if f.name in COMPUTE_FIELDS}
  model, loaded = hf.load(directory, mesh=mesh, **compute)
  if loaded != cfg.model:
    raise ConfigError(f"init_from {cfg.init_from}: the checkpoint's config changed since the run was configured")
  return nnx.state(model)
