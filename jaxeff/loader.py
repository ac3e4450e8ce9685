"""One loader: `jaxeff.load(path, **overrides) -> (model, tokenizer)`.

`path` is any of the three things jaxeff reads a model from:
- a Hugging Face directory (config.json, *.safetensors, tokenizer.json: `jaxeff.hf.load`);
- a llama.cpp `.gguf` file (converted once to such a directory and cached, `jaxeff.gguf`; with
  `quant="gguf"` its Q8_0 / Q4_0 / Q4_1 blocks are served as they are stored);
- a `jaxeff.train` output directory (its newest checkpoint that reads back, or `step=`, with
  the tokenizer the run trained with: bytes or its tokenizer.json).

>>> import tempfile, tokenizers
>>> from flax import nnx
>>> import jaxeff, jaxeff.hf
>>> from jaxeff.models import Llama
>>> cfg = jaxeff.ModelConfig(
...   vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
>>> path = jaxeff.hf.save(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tempfile.mkdtemp() + "/hf")
>>> tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")).save(
...   str(path / "tokenizer.json"))
>>> model, tok = jaxeff.load(path, scan_layers=True, dtype="bfloat16")     # compute settings may change
>>> model.cfg.scan_layers, model.cfg.dtype, tok.encode("hi")
(True, 'bfloat16', [1])
>>> jaxeff.load(path, num_layers=3)                                          # the architecture may not
Traceback (most recent call last):
jaxeff.errors.ConfigError: num_layers=3 (checkpoint: 2): would change the architecture of ...

Overrides:
- compute settings (`jaxeff.config.COMPUTE_FIELDS`: dtype, param_dtype, scan_layers, attention,
  remat, max_seq_len, ...) replace the saved ones; any other ModelConfig field may only repeat
  the saved value, else one `ConfigError` line names it. A training run's layers are restacked
  (scan_layers) or its parameters cast (param_dtype) after reading, when those differ.
- `mesh=`: every parameter is placed by its logical axes, each device reading only its shard (no
  device ever holds the whole model); without it, everything goes to the first device.
- `quant="int8" | "int4"` (`zero_point`, `group_size`: `jaxeff.quantize`'s; default group per
  channel for int8, 32 for int4) quantizes every Linear after loading; `quant="gguf"` (GGUF files
  only, per-layer modules) keeps the file's own blocks: nothing is re-quantized, 4-bit weights stay
  4-bit in memory (matrices of other block types stay float, with one warning naming them).

Bad input (a path that is none of the three, a missing file, an override or quantization that
does not apply) raises one `JaxeffError` whose message names it. `model_config` and
`tokenizer_file` describe a path without reading its weights (a fine-tuning run's `init_from`);
`read_run` is the reading of a run's checkpoint that `jaxeff.training.load_checkpoint` shares.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff import gguf, hf, quantization, sharding
from jaxeff.checkpoint import Checkpointer
from jaxeff.config import RESTORE_COMPUTE_FIELDS, ModelConfig, from_dict, override
from jaxeff.data.tokenizer import HFTokenizer, Tokenizer, get_tokenizer
from jaxeff.errors import CheckpointError, ConfigError, HFError, QuantizationError, TrainError
from jaxeff.models.llama import Llama

log = logging.getLogger(__name__)

RUN_FORMAT = "jaxeff.train/2"  # the `meta` document of a training run's checkpoint step
QUANT = ("int8", "int4", "gguf")


def path_kind(path: str | os.PathLike) -> str:
  """ "gguf" (a .gguf file), "hf" (a directory with config.json) or "run" (a directory with
  checkpoints/, a `jaxeff.train` output_dir).

  Raises:
    CheckpointError: `path` does not exist or is none of these; the message starts with the path.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or directory")
  if path.is_file() and path.suffix == ".gguf":
    return "gguf"
  if (path / "config.json").is_file():
    return "hf"
  if (path / "checkpoints").is_dir():
    return "run"
  raise CheckpointError(
    f"{path} is not a .gguf file, a Hugging Face directory (no config.json) or a jaxeff.train output_dir "
    f"(no checkpoints/)"
  )


def _hf_dir(path: pathlib.Path, kind: str) -> pathlib.Path:
  """The Hugging Face directory of an "hf" or "gguf" path (a GGUF is converted once and cached)."""
  if kind == "gguf":
    directory = gguf.converted_checkpoint(path)
    log.debug("%s: GGUF weights dequantized to float32 once (cached in %s)", path, directory)
    return directory
  return path


# ---------------------------------------------------------------------------- training runs


def _run_config(meta: dict, where: str) -> dict:
  if meta.get("format") != RUN_FORMAT:
    raise TrainError(f"{where} has format {meta.get('format')!r}; this jaxeff reads {RUN_FORMAT!r}")
  return meta["config"]


def _llama(cfg: ModelConfig, rngs: nnx.Rngs) -> Llama:
  return Llama(cfg, rngs=rngs)


def read_run(
  output_dir: str | os.PathLike,
  step: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  *,
  model_factory: Callable[[ModelConfig, nnx.Rngs], nnx.Module] = _llama,
  overrides: dict | None = None,
) -> tuple[nnx.Module, dict]:
  """The model a `jaxeff.train` run saved and the run's config as it recorded it (a dict).

  Args:
    output_dir: the run's directory (holding `checkpoints/`).
    step: which step (default: the newest that reads back completely; skipped newer ones are
      named in one log line).
    mesh: place the parameters by their logical axes on this mesh; None: on the first device.
      Each device reads only its shards; the optimizer state is not read.
    model_factory: the factory the run trained with (default `Llama`).
    overrides: ModelConfig fields that restore across (`RESTORE_COMPUTE_FIELDS`: dtype, attention,
      ...); another field that differs from the run's is a `ConfigError`.

  Raises:
    TrainError: no checkpoints, or one of another format.
    CheckpointError: the step (with `step=None`: every step) is damaged or cannot be read.
  """
  ckpt_dir = pathlib.Path(output_dir) / "checkpoints"

  def read(s: int):
    config = _run_config(ckpt.document(s, "meta"), f"checkpoint step {s} in {ckpt_dir}")
    cfg = from_dict(ModelConfig, config.get("model") or {}, "model")
    cfg = override(cfg, overrides or {}, source=f"the run in {output_dir}", allowed=RESTORE_COMPUTE_FIELDS)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_factory(cfg, nnx.Rngs(0))))
    target = sharding.with_shardings(abstract, sharding.model_shardings(abstract, mesh))
    return nnx.merge(graphdef, ckpt.restore(s, {"params": target})["params"]), config

  with Checkpointer(ckpt_dir, read_only=True) as ckpt:
    if not ckpt.steps():
      raise TrainError(f"no checkpoints in {ckpt_dir}")
    if step is not None:
      return read(step)
    newest, result, skipped = ckpt.restore_newest(read)
  if skipped:
    why = "; ".join(f"step {s} {reason}" for s, reason in skipped)
    log.warning("%s: checkpoint %s; loaded step %s", output_dir, why, newest)
  return result


def _run_meta(path: pathlib.Path) -> dict:
  """The recorded config of a run's newest step (no arrays read)."""
  with Checkpointer(path / "checkpoints", read_only=True) as ckpt:
    if not ckpt.steps():
      raise TrainError(f"no checkpoints in {path / 'checkpoints'}")
    step = ckpt.latest_step()
    return _run_config(ckpt.document(step, "meta"), f"checkpoint step {step} in {path / 'checkpoints'}")


def _relayout(model: Llama, cfg: ModelConfig, mesh) -> Llama:
  """`model` as `cfg` lays it out (layers stacked or unstacked for scan_layers, floats cast to
  param_dtype), placed on `mesh` (None: the first device)."""
  pure = nnx.to_pure_dict(nnx.state(model))
  layers = pure["layers"]
  if cfg.scan_layers and not model.cfg.scan_layers:
    pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(cfg.num_layers)))
  elif model.cfg.scan_layers and not cfg.scan_layers:
    pure["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(cfg.num_layers)}
  dtype = jnp.dtype(cfg.param_dtype)
  pure = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, pure)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, jax.device_put(state, sharding.model_shardings(state, mesh)))


def _load_run(path: pathlib.Path, step, mesh, overrides: dict) -> tuple[Llama, dict]:
  model_config(path, **overrides)  # a refused override fails before any array is read
  restorable = {k: v for k, v in overrides.items() if k in RESTORE_COMPUTE_FIELDS}
  model, config = read_run(path, step, mesh, overrides=restorable)
  cfg = override(model.cfg, overrides, source=f"the run in {path}")
  if (cfg.scan_layers, cfg.param_dtype) != (model.cfg.scan_layers, model.cfg.param_dtype):
    model = _relayout(model, cfg, mesh)
  return model, config


# ---------------------------------------------------------------------------- GGUF blocks as stored


def _load_gguf_as_is(path: pathlib.Path, mesh, overrides: dict) -> Llama:
  if overrides.get("scan_layers"):
    raise QuantizationError("quant='gguf' builds per-layer quantized modules; scan_layers=True does not go with it")
  model, _ = hf.load(_hf_dir(path, "gguf"), **overrides)  # the float model: norms, structure, other tensors
  _, weights, others = gguf.quantized_weights(path)
  if others:
    listed = ", ".join(f"{len(names)} {kind}" for kind, names in sorted(others.items()))
    log.warning("jaxeff.load: %s tensor(s) dequantized to float (served as stored: %s)", listed, ", ".join(gguf.AS_IS))
  for name, qw in weights.items():
    # "model.layers.3.mlp.up_proj.weight" -> ("layers", 3, "mlp", "up_proj"); "lm_head.weight" -> ("lm_head",)
    where = tuple(int(p) if p.isdigit() else p for p in name.removeprefix("model.").split(".")[:-1])
    old = functools.reduce(lambda m, p: m[p] if isinstance(p, int) else getattr(m, p), where, model)
    new = quantization.QuantizedEmbed if where == ("embed_tokens",) else quantization.QuantizedLinear
    quantization.replace_module(model, where, new(old, weight=qw))
  return _place(model, mesh)


def _place(model: nnx.Module, mesh) -> nnx.Module:
  """`model` with every variable placed by its logical axes on `mesh` (unchanged without one)."""
  if mesh is not None:
    state = nnx.state(model)
    nnx.update(model, sharding.place(state, sharding.model_shardings(state, mesh)))
  return model


# ---------------------------------------------------------------------------- the loader


def _check_quant(kind: str, path: pathlib.Path, quant, zero_point: bool, group_size) -> None:
  if quant is not None and quant not in QUANT:
    raise QuantizationError(f"quant must be one of {', '.join(QUANT)} (or None), got {quant!r}")
  if (zero_point or group_size is not None) and quant not in ("int8", "int4"):
    raise QuantizationError("zero_point and group_size go with quant='int8' or 'int4' (a GGUF's blocks keep theirs)")
  if quant == "gguf" and kind != "gguf":
    raise QuantizationError(f"quant='gguf' serves a .gguf file's blocks as stored; {path} is not a .gguf file")


def load(
  path: str | os.PathLike,
  *,
  mesh: jax.sharding.Mesh | None = None,
  quant: str | None = None,
  zero_point: bool = False,
  group_size: int | None = None,
  step: int | None = None,
  **overrides,
) -> tuple[Llama, Tokenizer]:
  """(model, tokenizer) of a Hugging Face directory, a `.gguf` file or a `jaxeff.train` output
  directory (the module docstring describes the overrides).

  Args:
    path: what to load.
    mesh: place the parameters by their logical axes on this mesh (None: the first device).
    quant: None, "int8", "int4" (with `zero_point`, `group_size`) or "gguf" (a GGUF's blocks as stored).
    step: a training run's step (default: its newest that reads back).
    overrides: ModelConfig compute settings (dtype, param_dtype, scan_layers, attention, ...).

  Raises:
    JaxeffError: one line naming the problem (CheckpointError for a path that is none of the
      three, ConfigError for an override, QuantizationError, HFError / GGUFError / TrainError for
      a file that cannot be read).
  """
  path = pathlib.Path(path)
  kind = path_kind(path)
  _check_quant(kind, path, quant, zero_point, group_size)
  if step is not None and kind != "run":
    raise ConfigError(f"step={step} picks a checkpoint of a training run; {path} is a {kind} checkpoint")
  if kind == "run":
    model, config = _load_run(path, step, mesh, overrides)
    tokenizer = get_tokenizer((config.get("data") or {}).get("tokenizer"))
  elif quant == "gguf":
    model, tokenizer = _load_gguf_as_is(path, mesh, overrides), _hf_tokenizer(path, kind)
  else:
    model, _ = hf.load(_hf_dir(path, kind), mesh=mesh, **overrides)
    tokenizer = _hf_tokenizer(path, kind)
  if quant in ("int8", "int4"):
    bits = 8 if quant == "int8" else 4
    group = group_size if group_size is not None else (None if bits == 8 else 32)
    model = _place(quantization.quantize(model, bits=bits, group_size=group, zero_point=zero_point, copy=False), mesh)
  return model, tokenizer


def _hf_tokenizer(path: pathlib.Path, kind: str) -> HFTokenizer:
  directory = _hf_dir(path, kind)
  if not (directory / "tokenizer.json").is_file():
    raise HFError(
      f"{path} has no tokenizer.json (jaxeff.load returns the model with its tokenizer; jaxeff.hf.load reads "
      f"the weights alone)"
    )
  return HFTokenizer(directory)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer `load(path)` returns, without reading the weights."""
  path = pathlib.Path(path)
  kind = path_kind(path)
  if kind == "run":
    return get_tokenizer(tokenizer_file(path))
  return _hf_tokenizer(path, kind)


def tokenizer_file(path: str | os.PathLike) -> pathlib.Path | None:
  """The tokenizer.json of a Hugging Face directory or a GGUF's conversion, or the one a training
  run trained with; None: a run on bytes."""
  path = pathlib.Path(path)
  kind = path_kind(path)
  if kind == "run":
    given = (_run_meta(path).get("data") or {}).get("tokenizer")
    return None if given is None else pathlib.Path(given)
  return _hf_tokenizer(path, kind).path


def model_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """The ModelConfig `load(path, **overrides)` builds, without reading the weights."""
  path = pathlib.Path(path)
  kind = path_kind(path)
  if kind == "run":
    saved = from_dict(ModelConfig, _run_meta(path).get("model") or {}, "model")
    return override(saved, overrides, source=f"the run in {path}")
  return hf.load_config(_hf_dir(path, kind), **overrides)
