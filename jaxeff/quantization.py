"""Weight-only int8/int4 quantization of a model: `jaxeff.quantize(model, bits=8)`.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> import jaxeff
>>> q = jaxeff.quantize(model, bits=4, group_size=32, zero_point=True)
>>> type(q.layers[0].mlp.up_proj).__name__, q.layers[0].mlp.up_proj.qvalue.dtype
('QuantizedLinear', dtype('int8'))
>>> q(jnp.ones((1, 4), jnp.int32)).shape                 # same call as the float model
(1, 4, 64)

Every weight matmul in `jaxeff.models` goes through `layers.Linear`, so quantizing a model means
swapping each `Linear` for a `QuantizedLinear` with the same call: it stores the quantized weight
(`pallas_kernels.QuantizedWeight`'s two arrays) as variables that keep the kernel's logical axes,
so `jaxeff.sharding` shards them like the float weights, and calls `pallas_kernels.quant_matmul`
(the Pallas kernel on TPU/GPU, the chunked f32 path on CPU).

On a mesh (`jax.set_mesh`), `quantized_matmul` turns the weight's logical axes into the op's
matmul letters through the sharding rules in force (`jaxeff.sharding`), so the kernel runs per shard
(`shard_map`): column-parallel layers (out axis on "tensor") split N, row-parallel ones (in axis
on "tensor", or on "fsdp") split K and sum partial products, the batch splits over data/fsdp.
Weights never move: where the kernel cannot take the weight's stored split (an int4 weight
whose K shards would cut a tile), that layer falls back to an XLA dequantize-and-dot that GSPMD
partitions (`kernel_takes_stored_split` says which layers do).

Scanned models (`scan_layers=True`) stack each layer's kernel as [layers, in, out]; those are
quantized per layer (vmap) into [layers, ...] variables, and `nnx.scan` hands each step its 2-D slice.

`save_quantized` / `load_quantized` store a quantized model as one checkpoint (the training
engine's `Checkpointer`: its state plus the model config and `quantize` settings), so a training
checkpoint is quantized once and served from then on without the float weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff import sharding
from jaxeff.checkpoint import Checkpointer
from jaxeff.config import RESTORE_COMPUTE_FIELDS, ModelConfig, differences, from_dict
from jaxeff.errors import QuantizationError
from jaxeff.models import Llama
from jaxeff.models.layers import Embed, Linear
from pallas_kernels import QuantizedWeight, dequantize, quant_matmul, quantize_weight
from pallas_kernels.quant_matmul import partition
from pallas_kernels.quant_matmul.weights import check_group_size
from pallas_kernels.sharding import current_mesh, free_axes


class QuantizedParam(nnx.Variable):
  """Quantized weight arrays (int8 values, f32 scales). Not an `nnx.Param`: not trainable."""


def _variable(value, axes):
  return QuantizedParam(value, out_sharding=tuple(axes), eager_sharding=False)


def _axes(var: nnx.Variable, ndim: int) -> tuple:
  return tuple(var.get_metadata().get("out_sharding") or (None,) * ndim)


@functools.cache
def _quantizer(bits: int, group_size: int | None, zero_point: bool, leading_dims: int):
  # One jitted function per setting, so every Linear of a shape compiles once (a fresh partial per
  # layer missed jit's cache: 210 compilations, 14 s, for SmolLM2-135M).
  fn = functools.partial(quantize_weight, bits=bits, group_size=group_size, zero_point=zero_point)
  for _ in range(leading_dims):
    fn = jax.vmap(fn)
  return jax.jit(fn)


def _quantize_stacked(w: jax.Array, bits: int, group_size: int | None, zero_point: bool = False) -> QuantizedWeight:
  """quantize_weight over any leading (e.g. scanned LAYERS) dims, one 2-D matrix at a time."""
  return _quantizer(bits, group_size, zero_point, w.ndim - 2)(w)


def _rule(name):
  return sharding.mesh_axes(name) if name is not None else None


def matmul_axes(logical_axes) -> dict:
  """The op's letters -> mesh axes for a weight with logical axes (in, out), from the rules.

  The weight's letters come first, so where a mesh axis could split either the weight or the
  batch (fsdp), it splits the weight: activations move, weights never do.
  """
  in_axis, out_axis = logical_axes
  return {"k": _rule(in_axis), "n": _rule(out_axis), "m": _rule(sharding.BATCH)}


def stored_split(logical_axes, qw: QuantizedWeight, mesh) -> dict:
  """letter ("k", "n") -> the mesh axes the weight's storage is split over by the rules."""
  spec = sharding.fit_spec(sharding.logical_to_spec(logical_axes), qw.qvalue.shape[-2:], mesh)
  # Axes an enclosing shard_map made manual are already local; size-1 axes split nothing.
  free = {a for a in free_axes(mesh) if mesh.shape[a] > 1}
  as_tuple = lambda e: () if e is None else ((e,) if isinstance(e, str) else tuple(e))
  return {"k": tuple(a for a in as_tuple(spec[0]) if a in free), "n": tuple(a for a in as_tuple(spec[1]) if a in free)}


def kernel_takes_stored_split(x_shape, qw: QuantizedWeight, logical_axes, mesh) -> bool:
  """Whether the kernel can run on each shard of the weight as stored (else the XLA fallback)."""
  split = partition(x_shape, qw, matmul_axes(logical_axes), mesh)
  return all(set(axes) <= set(split.get(letter, ())) for letter, axes in stored_split(logical_axes, qw, mesh).items())


def quantized_matmul(
  x: jax.Array, qw: QuantizedWeight, logical_axes, *, impl: str | None = None, interpret=False
) -> jax.Array:
  """x @ dequant(qw) for a weight with logical axes (in, out), partitioned on the context mesh.

  One device: `quant_matmul` as is. On a mesh: the kernel per shard, split as the weight is
  stored; or, where that has no clean shard_map form, dequantize-and-dot in XLA in storage-row
  order (impl "xla": GSPMD partitions it without moving the weight; it does materialize each
  device's dequantized shard).
  """
  mesh = current_mesh()
  if mesh is None or math.prod(mesh.shape[a] for a in free_axes(mesh)) == 1:
    return quant_matmul(x, qw, impl=impl, interpret=interpret)
  if kernel_takes_stored_split(x.shape, qw, logical_axes, mesh):
    return quant_matmul(x, qw, impl=impl, interpret=interpret, axes=matmul_axes(logical_axes))
  return quant_matmul(x, qw, impl="xla")


class QuantizedLinear(nnx.Module):
  """Drop-in for `layers.Linear`: y = x @ dequant(W) (+ bias), with W stored int8 or packed int4.

  Variables: `qvalue` int8 [.., Ks, out] with the kernel's logical axes (int4 packs along `in`,
  so the axes still apply), `scale` f32 [.., groups, out] with the `out` axis (and `minimum`, the
  zero point, likewise when `zero_point`), `bias` unchanged. `impl` / `interpret` pick the
  `quant_matmul` implementation (default: by backend). `weight=` takes an already quantized
  weight (e.g. a GGUF file's own blocks) instead of quantizing the Linear's.
  """

  def __init__(
    self,
    linear: Linear,
    *,
    bits: int = 8,
    group_size: int | None = None,
    zero_point: bool = False,
    impl: str | None = None,
    interpret=False,
    weight: QuantizedWeight | None = None,
  ):
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.dtype = linear.dtype
    self.impl, self.interpret = impl, interpret
    w = linear.kernel
    axes = _axes(linear.kernel, w.ndim)
    self.logical_axes = tuple(axes[-2:])
    if weight is not None and weight.shape != (linear.in_features, linear.out_features):
      raise QuantizationError(
        f"quantized weight {weight.shape} does not fit Linear [{linear.in_features}, {linear.out_features}]"
      )
    qw = weight if weight is not None else _quantize_stacked(w[...], bits, group_size, zero_point)
    self.bits, self.group_size, self.zero_point = qw.bits, qw.group_size, qw.zero_point
    self.qvalue = _variable(qw.qvalue, axes)
    self.scale = _variable(qw.scale, axes[:-2] + (None, axes[-1]))
    if qw.zero_point:
      self.minimum = _variable(qw.minimum, axes[:-2] + (None, axes[-1]))
    self.bias = linear.bias

  def weight(self) -> QuantizedWeight:
    return QuantizedWeight(
      self.qvalue[...],
      self.scale[...],
      bits=self.bits,
      group_size=self.group_size,
      in_features=self.in_features,
      minimum=self.minimum[...] if self.zero_point else None,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    y = quantized_matmul(
      x.astype(self.dtype), self.weight(), self.logical_axes, impl=self.impl, interpret=self.interpret
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class QuantizedEmbed(nnx.Module):
  """Drop-in for `layers.Embed`: the table is stored transposed as a [embed, vocab] quantized
  weight (one scale per token with group_size None), so `attend` (a tied LM head) is the same
  `quantized_matmul` as every Linear, and a lookup dequantizes just the gathered columns."""

  def __init__(
    self,
    embed: Embed,
    *,
    bits: int = 8,
    group_size: int | None = None,
    zero_point: bool = False,
    impl: str | None = None,
    interpret=False,
    weight: QuantizedWeight | None = None,
  ):
    self.dtype = embed.dtype
    self.impl, self.interpret = impl, interpret
    self.features = embed.embedding.shape[1]
    vocab_axis, embed_axis = _axes(embed.embedding, 2)
    self.logical_axes = (embed_axis, vocab_axis)
    qw = (
      weight
      if weight is not None
      else quantize_weight(embed.embedding[...].T, bits=bits, group_size=group_size, zero_point=zero_point)
    )
    self.bits, self.group_size, self.zero_point = qw.bits, qw.group_size, qw.zero_point
    self.qvalue = _variable(qw.qvalue, (embed_axis, vocab_axis))
    self.scale = _variable(qw.scale, (None, vocab_axis))
    if qw.zero_point:
      self.minimum = _variable(qw.minimum, (None, vocab_axis))

  def _weight(self, columns=None) -> QuantizedWeight:
    pick = (lambda a: a) if columns is None else (lambda a: jnp.take(a, columns, axis=1))
    return QuantizedWeight(
      pick(self.qvalue[...]),
      pick(self.scale[...]),
      bits=self.bits,
      group_size=self.group_size,
      in_features=self.features,
      minimum=pick(self.minimum[...]) if self.zero_point else None,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cols = self._weight(tokens.reshape(-1))
    return dequantize(cols, self.dtype).T.reshape(*tokens.shape, self.features)

  def attend(self, x: jax.Array) -> jax.Array:
    return quantized_matmul(
      x.astype(self.dtype), self._weight(), self.logical_axes, impl=self.impl, interpret=self.interpret
    )


def replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  """Puts `new` at `path` (attribute names and list indices, as `nnx.iter_modules` gives) in `model`."""
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def quantize(
  model: nnx.Module,
  bits: int = 8,
  group_size: int | None = None,
  *,
  zero_point: bool = False,
  include_embeddings: bool = False,
  include_lm_head: bool = False,
  copy: bool = True,
  impl: str | None = None,
  interpret=False,
) -> nnx.Module:
  """Returns `model` with its `Linear` layers replaced by `QuantizedLinear` (weight-only).

  Args:
    bits: 8 or 4 (int4 packed two per byte).
    group_size: None for one scale per output channel, else one per `group_size` input rows
      (a power of two for int4).
    zero_point: asymmetric quantization: per group a scale and a minimum, all 2^bits levels over
      the group's range (`pallas_kernels.quantize_weight`). What 4-bit needs on a real model:
      SmolLM2-135M's perplexity rises 34% with symmetric int4 g32, ~0% with asymmetric
      (BENCHMARKS.md, `python -m jaxeff.bench quant`).
    include_embeddings: also quantize `Embed` tables (and so a tied LM head).
    include_lm_head: also quantize an untied `lm_head` Linear (kept float by default: the
      logits are the most quantization-sensitive matmul).
    copy: quantize a clone (default) instead of modifying `model` in place.
    impl, interpret: `pallas_kernels.quant_matmul`'s implementation choice for every quantized
      layer (default: by backend; `impl="tpu", interpret=True` runs the Pallas kernel on CPU).
  """
  try:
    check_group_size(bits, group_size)  # before cloning anything
  except ValueError as e:
    raise QuantizationError(str(e)) from None
  if copy:
    model = nnx.clone(model)
  kw = dict(bits=bits, group_size=group_size, zero_point=zero_point, impl=impl, interpret=interpret)
  targets = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, (Linear, Embed)) and path]
  for path, module in targets:
    if isinstance(module, Embed):
      if include_embeddings:
        replace_module(model, path, QuantizedEmbed(module, **kw))
    elif path[-1] != "lm_head" or include_lm_head:
      replace_module(model, path, QuantizedLinear(module, **kw))
  return model


# ---------------------------------------------------------------------------- checkpoints

# /2 (from /1): a Checkpointer directory (step 0: params + meta), and int4 nibbles that pair rows of
# a 2H-row tile (pallas_kernels/quant_matmul/weights.py) instead of neighbouring rows: a /1
# checkpoint would load with scrambled int4 weights, so it is refused.
FORMAT = "jaxeff-quantized/2"


def quantization_settings(model: nnx.Module) -> dict:
  """The `quantize` keywords (bits, group_size, include_*) that produced `model`'s quantized layers."""
  qmods = [m for _, m in nnx.iter_modules(model) if isinstance(m, (QuantizedLinear, QuantizedEmbed))]
  if not qmods:
    raise QuantizationError("model has no quantized layers; quantize it first (jaxeff.quantize(model, bits=...))")
  kinds = {(m.bits, m.group_size, m.zero_point) for m in qmods}
  if len(kinds) > 1:
    raise QuantizationError(
      f"model mixes quantization settings {sorted(kinds, key=str)} (bits, group_size, zero_point); "
      f"save_quantized stores models made by one jaxeff.quantize call"
    )
  ((bits, group_size, zero_point),) = kinds
  return dict(
    bits=bits,
    group_size=group_size,
    zero_point=zero_point,
    include_embeddings=any(isinstance(m, QuantizedEmbed) for m in qmods),
    include_lm_head=isinstance(getattr(model, "lm_head", None), QuantizedLinear),
  )


def _abstract_quantized(cfg: ModelConfig, settings: dict) -> nnx.Module:
  # Shapes only: nothing is initialized or quantized for real.
  return nnx.eval_shape(lambda: quantize(Llama(cfg, rngs=nnx.Rngs(0)), copy=False, **settings))


def _shapes(state) -> dict:
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), nnx.to_pure_dict(state))


def save_quantized(model: Llama, path: str | os.PathLike) -> pathlib.Path:
  """Writes a quantized `Llama` (from `quantize`) to a new checkpoint directory `path`.

  One `jaxeff.training.Checkpointer` step: the model state (item `params`) and, as JSON (`meta`),
  its `ModelConfig` and quantization settings, so `load_quantized(path)` rebuilds it alone. Orbax
  writes to a temporary directory and renames it when complete. An existing `path` is never
  overwritten (FileExistsError).
  """
  path = pathlib.Path(path)
  if path.exists():
    raise FileExistsError(
      f"{path} already exists; save_quantized never overwrites (choose a new path or delete the old checkpoint)"
    )
  cfg = getattr(model, "cfg", None)
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"save_quantized takes a quantized jaxeff.models.Llama, got {type(model).__name__}")
  settings = quantization_settings(model)
  state = nnx.state(model)
  # Refuse what load_quantized could not rebuild (e.g. layers swapped by hand).
  if _shapes(state) != _shapes(nnx.state(_abstract_quantized(cfg, settings))):
    raise QuantizationError(
      f"model's structure is not that of quantize(Llama(model.cfg), **{settings}); "
      f"save_quantized stores models made by one jaxeff.quantize call"
    )
  meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "quantization": settings}
  with Checkpointer(path) as ckpt:
    ckpt.save(0, arrays={"params": state}, documents={"meta": meta})
  return path


def load_quantized(path: str | os.PathLike, config: ModelConfig | None = None, *, mesh=None) -> Llama:
  """The quantized model `save_quantized` wrote to `path`, born sharded.

  Args:
    path: the directory `save_quantized` wrote.
    config: None for the saved `ModelConfig`; otherwise one that may differ from it only in
      compute settings (dtype, remat, attention, max_seq_len).
    mesh: place the weights by their logical axes on this mesh (each device reads only its
      shards); None: on the first device.
  """
  path = pathlib.Path(path)
  if not (path / "0" / "meta").is_dir() or not (path / "0" / "params").is_dir():
    raise QuantizationError(f"no quantized checkpoint (written by save_quantized) at {path}")
  with Checkpointer(path) as ckpt:
    meta = ckpt.document(0, "meta")
    if meta.get("format") != FORMAT:
      raise QuantizationError(
        f"{path} holds format {meta.get('format')!r}, expected {FORMAT!r}"
        + (
          "; the int4 layout changed since /1: quantize the float checkpoint again"
          if meta.get("format") == "jaxeff-quantized/1"
          else ""
        )
      )
    saved = from_dict(ModelConfig, meta["model"], "model")
    cfg = saved if config is None else config
    diff = differences(saved, cfg, RESTORE_COMPUTE_FIELDS)
    if diff:
      raise QuantizationError(f"config does not match the architecture saved in {path} ({'; '.join(diff)})")
    graphdef, abstract = nnx.split(_abstract_quantized(cfg, meta["quantization"]))
    target = sharding.with_shardings(abstract, sharding.model_shardings(abstract, mesh))
    state = ckpt.restore(0, {"params": target})["params"]
  return nnx.merge(graphdef, state)
