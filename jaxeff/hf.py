"""Hugging Face checkpoints <-> jaxeff models (Llama, Mistral, Qwen2).

>>> import tempfile
>>> from flax import nnx
>>> import jaxeff.hf
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> path = jaxeff.hf.save(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tempfile.mkdtemp() + "/hf")  # transformers loads it
>>> sorted(p.name for p in path.iterdir())
['config.json', 'model.safetensors']
>>> model, loaded = jaxeff.hf.load(path, dtype="bfloat16")   # mesh= places it; compute fields may change
>>> loaded.num_layers, loaded.dtype
(1, 'bfloat16')

Module names match HF's, so the mapping is a transpose of each linear weight ([out, in] in
PyTorch, [in, out] here) and a stack along a leading axis for scanned layers. Nothing is
downloaded: `path` is a local directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxeff import sharding
from jaxeff.config import ModelConfig, override
from jaxeff.errors import HFError
from jaxeff.models import attention as attention_lib
from jaxeff.models.llama import Llama

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------- config


def _rope(hf: dict) -> tuple[float, dict | None]:
  """(theta, scaling) from either transformers>=5 `rope_parameters` or the older top-level keys."""
  params = dict(hf.get("rope_parameters") or {})
  theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = params or hf.get("rope_scaling")
  if scaling:
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
      return theta, None
    if kind not in ("linear", "llama3"):
      raise HFError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")
  return theta, scaling or None


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict.

  `overrides` may set compute fields (`jaxeff.config.COMPUTE_FIELDS`: dtype, remat, scan_layers,
  attention, sliding_window, attention_sinks, ...), which win over the checkpoint's; an
  architecture field (sizes, heads, vocabulary) that differs from the checkpoint's is refused
  with a `ConfigError` naming it.
  """
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None and not archs:  # configs saved without `architectures`: go by model_type
    arch = {v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"))
  if arch is None:
    raise HFError(f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {', '.join(ARCHITECTURES)}")
  kind = ARCHITECTURES[arch]
  if hf.get("mlp_bias"):
    raise HFError("mlp_bias=true is not supported")
  if kind == "llama" and hf.get("attention_bias"):
    raise HFError("attention_bias=true (bias on o_proj too) is not supported for Llama")
  window = None
  if kind == "mistral":
    window = hf.get("sliding_window")
  elif kind == "qwen2" and hf.get("use_sliding_window"):
    raise HFError("Qwen2 with use_sliding_window=true is not supported")
  theta, scaling = _rope(hf)
  heads = hf["num_attention_heads"]
  try:
    saved = ModelConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      sliding_window=window,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=kind == "qwen2",
    )
  except KeyError as e:
    raise HFError(f"config.json lacks required key {e.args[0]!r}") from None
  return override(saved, overrides, source="the checkpoint")


def config_to_hf(cfg: ModelConfig, architecture: str | None = None) -> dict:
  """HF config.json dict for `cfg` (architecture inferred: bias -> Qwen2, window -> Mistral, else Llama)."""
  if architecture is None:
    architecture = (
      "Qwen2ForCausalLM" if cfg.qkv_bias else "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"
    )
  kind = ARCHITECTURES.get(architecture)
  if kind is None:
    raise HFError(f"unsupported architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
  if cfg.qkv_bias != (kind == "qwen2"):
    raise HFError(f"{architecture} cannot express qkv_bias={cfg.qkv_bias}")
  if attention_lib.get_attention(cfg.attention).module is not None or cfg.attention_sinks or cfg.attention_topk_blocks:
    raise HFError(
      f"a model with attention {cfg.attention} (parameters of its own), attention_sinks or attention_topk_blocks has "
      "no Hugging Face equivalent (transformers' Llama/Mistral/Qwen2 cannot express it)"
    )
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling:
    rope = {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_theta": cfg.rope_theta}
    rope.setdefault("rope_type", cfg.rope_scaling.get("type"))
  hf = {
    "architectures": [architecture],
    "model_type": kind,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.rms_norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "rope_parameters": rope,
    # Older transformers read these top-level keys instead of rope_parameters.
    "rope_theta": cfg.rope_theta,
    "rope_scaling": rope if cfg.rope_scaling else None,
    "torch_dtype": "float32",
    "initializer_range": cfg.initializer_range,
  }
  if kind == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  if kind == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  if kind == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None)
  return hf


# ---------------------------------------------------------------------------- tensors


def _hf_names(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
  """jaxeff per-layer param path (with '{i}') -> (HF tensor name, transpose?)."""
  names = {}
  layer = "model.layers.{i}."
  for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    names[("self_attn", proj, "kernel")] = (layer + f"self_attn.{proj}.weight", True)
  if cfg.qkv_bias:
    for proj in ("q_proj", "k_proj", "v_proj"):
      names[("self_attn", proj, "bias")] = (layer + f"self_attn.{proj}.bias", False)
  for proj in ("gate_proj", "up_proj", "down_proj"):
    names[("mlp", proj, "kernel")] = (layer + f"mlp.{proj}.weight", True)
  names[("input_layernorm", "scale")] = (layer + "input_layernorm.weight", False)
  names[("post_attention_layernorm", "scale")] = (layer + "post_attention_layernorm.weight", False)
  return names


def _top_names(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
  names = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight", False),
    ("norm", "scale"): ("model.norm.weight", False),
  }
  if not cfg.tie_embeddings:
    names[("lm_head", "kernel")] = ("lm_head.weight", True)
  return names


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  index = path / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    files = sorted(p.name for p in path.glob("*.safetensors"))
  if not files:
    raise HFError(f"no *.safetensors files in {path}")
  tensors = {}
  for name in files:
    file = path / name
    if not file.exists():
      raise HFError(f"shard {name} named in model.safetensors.index.json is missing from {path}")
    # Host memory only (bf16 arrives as ml_dtypes.bfloat16): no tensor passes through a device.
    with safe_open(str(file), framework="numpy") as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key).astype(np.float32)
  return tensors


def _get(d, path):
  for p in path:
    d = d[p]
  return d


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """The ModelConfig of the Hugging Face directory `path` (its config.json), with `overrides` as
  `config_from_hf` takes them; nothing else is read."""
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    raise HFError(f"{path} is a GGUF file; jaxeff.load reads it (the model and its tokenizer)")
  if not path.is_dir():
    raise HFError(f"checkpoint directory not found: {path}")
  if not (path / "config.json").exists():
    raise HFError(f"{path} has no config.json (not a Hugging Face checkpoint directory)")
  try:
    hf_cfg = json.loads((path / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise HFError(f"{path / 'config.json'} is not valid JSON: {e}") from None
  return config_from_hf(hf_cfg, **overrides)


def load(path: str | os.PathLike, *, mesh: Mesh | None = None, **overrides) -> tuple[Llama, ModelConfig]:
  """Loads a local Hugging Face checkpoint directory (config.json and *.safetensors); `overrides`
  set compute fields of its ModelConfig (e.g. scan_layers=True, dtype="bfloat16").

  With `mesh`, every weight is placed by its logical axes and each device receives only its shard
  (no device ever holds the whole model); without, everything goes to the first device.
  `jaxeff.load` reads a GGUF file or a training run too, and returns the tokenizer with the model.
  """
  path = pathlib.Path(path)
  cfg = load_config(path, **overrides)
  tensors = _read_safetensors(path)
  pdt = jnp.dtype(cfg.param_dtype)

  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  params = nnx.to_pure_dict(state)  # nested dict of ShapeDtypeStructs
  used = set()

  def take(name, transpose, expected_shape):
    if name not in tensors:
      raise HFError(f"tensor {name!r} is missing from the checkpoint in {path}")
    t = tensors[name].T if transpose else tensors[name]
    if t.shape != tuple(expected_shape):
      raise HFError(
        f"tensor {name!r} has shape {tensors[name].shape}, expected "
        f"{tuple(expected_shape)[::-1] if transpose else tuple(expected_shape)} for this config"
      )
    used.add(name)
    return t

  def put(path_, value):
    d = params
    for p in path_[:-1]:
      d = d[p]
    # No host copy: transposed weights stay strided views, which the device copy lays out (copying
    # a stack of transposed views in NumPy took 4.5 s of SmolLM2's 5 s first load).
    d[path_[-1]] = value.astype(pdt, copy=False)

  for key, (name, tr) in _top_names(cfg).items():
    put(key, take(name, tr, _get(params, key).shape))
  for key, (name, tr) in _hf_names(cfg).items():
    if cfg.scan_layers:
      shape = _get(params["layers"], key).shape[1:]
      layers = [take(name.format(i=i), tr, shape) for i in range(cfg.num_layers)]
      # Stacked in the file's layout (a plain copy), then transposed as a view.
      put(("layers",) + key, np.stack([w.T for w in layers]).transpose(0, 2, 1) if tr else np.stack(layers))
    else:
      for i in range(cfg.num_layers):
        put(("layers", i) + key, take(name.format(i=i), tr, _get(params["layers"][i], key).shape))
  if cfg.tie_embeddings:
    used.add("lm_head.weight")  # some tied checkpoints store a copy
  unexpected = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise HFError(
      f"checkpoint has tensors this config does not use: {', '.join(unexpected[:5])}"
      + (" ..." if len(unexpected) > 5 else "")
    )

  # Born sharded: each device receives only its shards, straight from the host arrays.
  shardings = sharding.model_shardings(state, mesh)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, sharding.place(state, shardings)), cfg


def hf_tensors(model: Llama, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face's names and layout ([out, in] linears), float32 on
  the host (what `save` writes and `jaxeff.gguf.write` converts)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors: dict[str, np.ndarray] = {}
  for key, (name, tr) in _top_names(cfg).items():
    v = np.asarray(jax.device_get(_get(params, key)), np.float32)
    tensors[name] = np.ascontiguousarray(v.T if tr else v)
  for key, (name, tr) in _hf_names(cfg).items():
    for i in range(cfg.num_layers):
      v = _get(params["layers"], key)[i] if cfg.scan_layers else _get(params["layers"][i], key)
      v = np.asarray(jax.device_get(v), np.float32)
      tensors[name.format(i=i)] = np.ascontiguousarray(v.T if tr else v)
  return tensors


def save(
  model: Llama, cfg: ModelConfig, path: str | os.PathLike, *, architecture: str | None = None, overwrite: bool = False
) -> pathlib.Path:
  """Writes config.json + model.safetensors (f32) that `transformers` loads.

  Written to a temporary directory first and renamed into place, so an error never leaves a
  half-written checkpoint; an existing non-empty directory is kept unless `overwrite=True`.
  """
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  if path.exists() and any(path.iterdir()) and not overwrite:
    raise HFError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
  hf_cfg = config_to_hf(cfg, architecture)
  tensors = hf_tensors(model, cfg)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if path.exists():
      shutil.rmtree(path)
    tmp.rename(path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return path
