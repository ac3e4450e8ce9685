"""Model configuration: one dataclass describes the architecture.

Named sizes live in `configs/*.yaml` under the `model:` key; `load_yaml` reads them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import yaml

from jaxeff.errors import ConfigError


@dataclasses.dataclass
class ModelConfig:
  """A Llama-family decoder (Llama 2/3, Mistral, Qwen2).

  Parameters are stored in `param_dtype`; matmuls run in `dtype`. On XLA:CPU keep
  `dtype="float32"`: bf16 matrix-vector products run ~25x slower there.
  """

  vocab_size: int = 256
  hidden_size: int = 256
  intermediate_size: int = 768
  num_layers: int = 4
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int | None = None  # None -> hidden_size // num_heads
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  # Llama-3 style scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
  # "high_freq_factor", "original_max_position_embeddings"}; None for plain RoPE.
  rope_scaling: dict | None = None
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2
  initializer_range: float = 0.02
  # A registered attention implementation (jaxeff.models.attention: dense, blocked, sparse, nsa); what
  # it supports (sinks, top-k blocks, a KV cache) is checked when the model is built.
  attention: str = "dense"
  # StreamingLLM attention sinks: the first N positions stay visible to every query beside the
  # sliding window (needs `sliding_window`; implemented by `dense` and `sparse`).
  attention_sinks: int = 0
  # attention: sparse only: each query block also reads the `attention_topk_blocks` key blocks its
  # first query scores highest against their mean key (MoBA-style top-k; 0: off), besides the blocks
  # it overlaps; a union with the window and sinks when those are set.
  attention_topk_blocks: int = 0
  # attention: nsa (Native Sparse Attention, jaxeff/models/nsa.py): compressed blocks of
  # `nsa_compress_block` keys every `nsa_compress_stride` tokens, the top `nsa_select_blocks` key
  # blocks of the sparse kernel per query block, and a sliding window of `nsa_window` tokens.
  nsa_compress_block: int = 32
  nsa_compress_stride: int = 16
  nsa_select_blocks: int = 16
  nsa_window: int = 512
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs, recompute the rest)
  scan_layers: bool = False

  def __post_init__(self):
    if self.head_dim is None:
      self.head_dim = self.hidden_size // self.num_heads
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
      )
    if self.attention_sinks < 0:
      raise ConfigError(f"model.attention_sinks must be >= 0, got {self.attention_sinks}")
    if self.attention_topk_blocks < 0:
      raise ConfigError(f"model.attention_topk_blocks must be >= 0, got {self.attention_topk_blocks}")
    if self.attention_sinks and self.sliding_window is None and not self.attention_topk_blocks:
      raise ConfigError(
        "model.attention_sinks needs model.sliding_window or model.attention_topk_blocks "
        "(without a restriction every key is visible already)"
      )
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ConfigError(f"model.sliding_window must be >= 1 or null, got {self.sliding_window}")
    for name in ("nsa_compress_block", "nsa_compress_stride", "nsa_select_blocks", "nsa_window"):
      if getattr(self, name) < 1:
        raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if self.nsa_compress_stride > self.nsa_compress_block:
      raise ConfigError(
        f"model.nsa_compress_stride={self.nsa_compress_stride} must be <= "
        f"model.nsa_compress_block={self.nsa_compress_block} (blocks would skip tokens)"
      )
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"model.remat must be one of none, full, dots; got {self.remat!r}")

  @property
  def num_params(self) -> int:
    """Parameter count (embedding included)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += hd * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * layer + d + head

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N plus attention (PaLM appendix B)."""
    n = self.num_params - self.vocab_size * self.hidden_size  # embedding lookup is not a matmul
    if self.tie_embeddings:
      n += self.vocab_size * self.hidden_size  # ...but the tied head is
    return 6 * n + 12 * self.num_layers * self.num_heads * self.head_dim * seq_len


# Fields that change how the model computes or which keys attention sees, not what its parameters
# are: a loader's overrides (`jaxeff.hf.load(path, sliding_window=...)`) replace a checkpoint's
# values. Every other field describes the architecture and must match the checkpoint.
COMPUTE_FIELDS = frozenset(
  {
    "dtype",
    "param_dtype",
    "remat",
    "scan_layers",
    "attention",
    "max_seq_len",
    "sliding_window",
    "attention_sinks",
    "attention_topk_blocks",
  }
)
# Of those, the ones a checkpoint of parameter trees restores across: the others change the trees'
# structure (stacked layers) or storage.
RESTORE_COMPUTE_FIELDS = COMPUTE_FIELDS - {"scan_layers", "param_dtype"}


def override(
  saved: ModelConfig, overrides: dict[str, Any], *, source: str, allowed: frozenset[str] = COMPUTE_FIELDS
) -> ModelConfig:
  """`saved` (a checkpoint's config) with `overrides` applied.

  Fields in `allowed` take the override; any other field may only repeat the saved value, else
  `ConfigError` names it (an architecture field: sizes, heads, vocabulary).
  """
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"unknown model config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
  changed = sorted(k for k, v in overrides.items() if k not in allowed and getattr(saved, k) != v)
  if changed:
    what = "; ".join(f"{k}={overrides[k]!r} (checkpoint: {getattr(saved, k)!r})" for k in changed)
    raise ConfigError(
      f"{what}: would change the architecture of {source}; only compute settings may be "
      f"overridden: {', '.join(sorted(allowed))}"
    )
  return dataclasses.replace(saved, **overrides)


def differences(saved: ModelConfig, cfg: ModelConfig, allowed: frozenset[str] = RESTORE_COMPUTE_FIELDS) -> list[str]:
  """ "field: checkpoint X vs config Y" for every field outside `allowed` where the two differ."""
  return [
    f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs config {getattr(cfg, f.name)!r}"
    for f in dataclasses.fields(ModelConfig)
    if f.name not in allowed and getattr(saved, f.name) != getattr(cfg, f.name)
  ]


def _coerce(value: Any, field: dataclasses.Field, where: str) -> Any:
  """Checks a YAML/CLI value against a dataclass field's annotated type."""
  kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
  optional = "None" in kind
  if value is None:
    if optional:
      return None
    raise ConfigError(f"{where} may not be null")
  base = kind.replace("| None", "").strip()
  if base == "bool":
    if isinstance(value, bool):
      return value
  elif base == "int":
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif base == "float":
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-2" (no dot) as a string
      try:
        return float(value)
      except ValueError:
        pass
  elif base == "str":
    if isinstance(value, str):
      return value
  elif base == "dict":
    if isinstance(value, dict):
      return value
  elif base.startswith("list"):
    if isinstance(value, list):
      return value
    if isinstance(value, str):
      return [value]
  else:
    return value
  raise ConfigError(f"{where} must be {kind}, got {type(value).__name__} {value!r}")


def from_dict(cls, values: dict, where: str = ""):
  """Builds dataclass `cls` from a dict, rejecting unknown keys and wrong types."""
  if not isinstance(values, dict):
    raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(values).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    name = f"{where}.{key}" if where else key
    if key not in fields:
      raise ConfigError(f"unknown config key {name!r}; valid keys: {', '.join(sorted(fields))}")
    kwargs[key] = _coerce(value, fields[key], name)
  return cls(**kwargs)


def load_yaml(path: str | pathlib.Path) -> dict:
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  try:
    data = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"config file {path} must hold a mapping at the top level")
  return data
