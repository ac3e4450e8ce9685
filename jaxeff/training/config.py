"""What a training run is: `TrainConfig` (model, data, optimizer, mesh, run settings) and its loaders.

>>> from jaxeff.training import load_config
>>> cfg = load_config(None, ["steps=100", "model.num_layers=2"])   # the built-in small config + overrides
>>> cfg.steps, cfg.model.num_layers, cfg.optimizer.name
(100, 2, 'adamw')

`load_config("configs/125m.yaml", [...])` starts from a file instead.

Every key is checked against the dataclass fields (unknown keys and wrong types raise
`ConfigError` naming the key), and `config_to_dict(cfg)` is what checkpoints record.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import yaml

from jaxeff import loader
from jaxeff.config import ConfigError, ModelConfig, from_dict, load_yaml
from jaxeff.data import DataConfig
from jaxeff.errors import JaxeffError

# The CPU training default: exact like "dense", but its backward recomputes instead of storing
# probabilities and skips masked blocks (BENCHMARKS.md). Only the built-in config (no --config)
# gets it; accelerator configs name their attention themselves.
CPU_ATTENTION = "blocked"


@dataclasses.dataclass
class OptimizerConfig:
  """The optax chain: [global-norm clipping] -> optimizer `name` with warmup + cosine decay."""

  name: str = "adamw"  # any name in jaxeff.optim.OPTIMIZERS
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  decay_steps: int | None = None  # length of the cosine schedule; None -> steps
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  clip_norm: float | None = 1.0  # applied when the optimizer's spec says clipping fits it
  weight_decay: float = 0.1  # applied to matrices only (ndim >= 2), never to norms or biases
  hyperparams: dict = dataclasses.field(default_factory=dict)  # extra keywords for jaxeff.optim.build


@dataclasses.dataclass
class MedusaConfig:
  """Medusa mode: with `base` set, the run trains Medusa-1 heads for that frozen model instead
  (`jaxeff.generate.speculative.medusa_training`, where every key is described)."""

  base: str | None = None  # a .gguf file, a Hugging Face directory or a jaxeff.train output_dir
  num_heads: int = 4
  num_layers: int = 1
  sequences: int = 64  # training prompts
  eval_sequences: int = 16  # held-out prompts for the acceptance table (0: none)
  prompt_len: int = 32
  new_tokens: int = 96  # greedy tokens the base adds to each prompt
  generate_batch: int = 16
  max_rank: int = 10
  overwrite: bool = False  # replace heads already saved in output_dir/medusa
  chat: bool = False  # wrap each prompt in the base's chat template (a user turn), as chat requests are

  def __post_init__(self):
    for name in ("num_heads", "num_layers", "sequences", "prompt_len", "generate_batch", "max_rank"):
      if getattr(self, name) < 1:
        raise ConfigError(f"medusa.{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_sequences < 0:
      raise ConfigError(f"medusa.eval_sequences must be >= 0, got {self.eval_sequences}")
    if self.new_tokens < self.num_heads + 1:
      raise ConfigError(
        f"medusa.new_tokens must be >= medusa.num_heads + 1 = {self.num_heads + 1} (the last head needs a label), "
        f"got {self.new_tokens}"
      )


@dataclasses.dataclass
class TrainConfig:
  """One training run. The defaults are `configs/small.yaml`: a ~3M-parameter byte-level model."""

  model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(attention=CPU_ATTENTION))
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  medusa: MedusaConfig = dataclasses.field(default_factory=MedusaConfig)  # medusa.base set: train Medusa heads
  # Fine-tune a pretrained model: a Hugging Face directory, a .gguf file or a jaxeff.train output_dir
  # (anything jaxeff.load reads): its architecture and tokenizer; model.* keys may change compute settings only.
  init_from: str | None = None
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})  # axes data, fsdp, tensor
  steps: int = 200
  batch_size: int = 16  # global, across all processes
  seq_len: int = 256
  seed: int = 0  # parameter initialization and the state's RNG
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  output_dir: str = "runs/default"
  tensorboard: bool = True
  progress: bool = True
  peak_flops_per_device: float | None = None  # for MFU; None -> a table by device kind (measured on CPU)

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_batches < 0:
      raise ConfigError(f"eval_batches must be >= 0, got {self.eval_batches}")


_NESTED = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig, "medusa": MedusaConfig}


def config_from_dict(values: dict) -> TrainConfig:
  """A `TrainConfig` from nested dicts (as YAML or `config_to_dict` give); missing keys take the
  dataclass defaults, a given `model` section those of `ModelConfig`."""
  values = dict(values)
  nested = {k: from_dict(cls, values.pop(k) or {}, k) for k, cls in _NESTED.items() if k in values}
  cfg = from_dict(TrainConfig, values)
  for k, v in nested.items():
    setattr(cfg, k, v)
  return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
  """Plain nested dicts (YAML/JSON-safe); `config_from_dict` inverts it."""
  return dataclasses.asdict(cfg)


def _set_path(d: dict, dotted: str, value: Any):
  keys = dotted.split(".")
  for k in keys[:-1]:
    d = d.setdefault(k, {})
    if not isinstance(d, dict):
      raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
  d[keys[-1]] = value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
  """A YAML config file (optional) plus `key=value` overrides -> `TrainConfig`.

  Args:
    path: a YAML file with sections `model`, `data`, `optimizer`, `mesh`, `medusa` and top-level run keys
      (see configs/). None: the built-in small CPU config (`TrainConfig()`), which the overrides
      then modify. A file's `model` section starts from `ModelConfig`'s defaults.
    overrides: `key=value` strings with dotted keys (`model.num_layers=2`); values parse as YAML
      (`mesh={data: 4}`, `data.paths=[a.txt]`, `optimizer.clip_norm=null`).
    With `init_from=PATH` the model config and tokenizer come from that checkpoint (`resolve_init_from`);
    the `model.*` keys given may change compute settings only.

  Raises:
    ConfigError: a missing or invalid file, an unknown key, a value of the wrong type.
  """
  values = load_yaml(path) if path else config_to_dict(TrainConfig())
  given_model = set((values.get("model") or {}) if path else ())  # the keys a file's model section sets
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"override {item!r} must look like key=value (e.g. steps=100 or model.num_layers=2)")
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
      value = raw
    _set_path(values, key.strip(), value)
    if key.strip().startswith("model."):
      given_model.add(key.strip().split(".", 1)[1])
    elif key.strip() == "model" and isinstance(value, dict):
      given_model |= set(value)
  cfg = config_from_dict(values)
  if cfg.init_from is not None:
    if cfg.medusa.base is not None:
      raise ConfigError("init_from (fine-tuning) and medusa.base (Medusa heads) are different runs; give one")
    default = {} if path else {"attention": CPU_ATTENTION}  # the built-in config's CPU attention
    cfg = resolve_init_from(cfg, given_model, default)
  return cfg


def resolve_init_from(cfg: TrainConfig, given_model_keys: set[str], default_compute: dict) -> TrainConfig:
  """`cfg` (with `init_from`: anything `jaxeff.load` reads) with the model config and tokenizer of
  that checkpoint; `Trainer.init_state` then starts from its weights.

  Args:
    given_model_keys: the `model.*` keys the user set (a config file's or overrides'); only these
      are applied, and only compute settings may be among them (else one `ConfigError` line).
    default_compute: compute settings to use where the user gave none (the built-in config's CPU
      attention).
  """
  compute = {**default_compute, **{k: getattr(cfg.model, k) for k in given_model_keys}}
  try:
    model = loader.model_config(cfg.init_from, **compute)
    tokenizer = loader.tokenizer_file(cfg.init_from)
  except JaxeffError as e:
    raise ConfigError(f"init_from {cfg.init_from}: {e}") from None
  given = cfg.data.tokenizer
  if given is not None and (tokenizer is None or pathlib.Path(given).resolve() != tokenizer.resolve()):
    raise ConfigError(
      f"data.tokenizer={given} differs from init_from's tokenizer ({tokenizer or 'bytes'}); a fine-tuning run uses "
      f"the pretrained model's tokenizer: drop data.tokenizer"
    )
  data = dataclasses.replace(cfg.data, tokenizer=None if tokenizer is None else str(tokenizer))
  return dataclasses.replace(cfg, model=model, data=data)
