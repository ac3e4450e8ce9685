"""Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v bias), tied or untied head.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.inference.cache import Dense
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> tokens = jnp.arange(6, dtype=jnp.int32)[None]
>>> model(tokens).shape                                      # int32 [B, S] -> f32 logits [B, S, vocab]
(1, 6, 64)
>>> out = model.forward_with_cache(tokens, jnp.arange(6)[None], Dense().init(cfg, 1, 16))
>>> model.logits(out.hidden).shape, out.cache.batch_size    # CachedForward(hidden, cache)
((1, 6, 64), 1)

Two forwards, each with one return type. `model(tokens, positions=None)` runs attention over the
tokens given (positions default to 0..S-1, which the attention implementation is told
statically) and returns logits. `forward_with_cache` runs the tokens at `positions` through a
KV cache (`jaxeff.inference.cache`: any policy; each attention layer hands its queries, keys and
values to the policy's `attend`) and returns the final hidden states with the updated cache; the
caller takes logits of the positions it needs (`model.logits`), e.g. only each prompt's last one
at prefill.

Packed examples (fine-tuning on short conversations): `model(tokens, positions, segment_ids)` with
`segment_ids` [B, S] numbering the examples of each row and `positions` restarting at 0 for each:
a token attends only to earlier tokens of its own example, and each example sees the RoPE phases
it would see alone. Needs an attention implementation with `segments` (dense, blocked).

Module and parameter names follow Hugging Face's (q_proj, gate_proj, input_layernorm, ...), so
`jaxeff.hf` maps checkpoints one to one. Every parameter carries logical axes (`jaxeff.sharding`'s
rules map them to the mesh); activations are constrained by the same names. The attention
implementation comes from the registry (`jaxeff.models.attention`), including any parameters of
its own (NSA's compressor and gate live in `self_attn.method`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.errors import ConfigError
from jaxeff.models import attention as attention_lib
from jaxeff.models.layers import Embed, Linear, RMSNorm, Rope, apply_rope, rope_cos_sin, rope_frequencies
from jaxeff.sharding import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, SEQ, VOCAB, constrain

BATCH_SEQ_EMBED = (BATCH, SEQ, EMBED)


class CachedForward(NamedTuple):
  """What `Llama.forward_with_cache` returns."""

  hidden: jax.Array  # final-norm hidden states [B, S, hidden]
  cache: Any  # the cache (`jaxeff.inference.cache.Cache`) after this call


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    impl = attention_lib.check_config(cfg)
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dt, param_dtype=pdt, init_std=cfg.initializer_range, rngs=rngs)
    d, hd = cfg.hidden_size, cfg.head_dim
    self.q_proj = Linear(d, cfg.num_heads * hd, axes=(EMBED, HEADS), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = Linear(d, cfg.num_kv_heads * hd, axes=(EMBED, KV_HEADS), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = Linear(d, cfg.num_kv_heads * hd, axes=(EMBED, KV_HEADS), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = Linear(cfg.num_heads * hd, d, axes=(HEADS, EMBED), **kw)
    # An implementation with parameters of its own (NSA) runs as this module.
    self.method = impl.module(cfg, rngs=rngs) if impl.module is not None else None

  def _qkv(self, x, cos, sin):
    """q, k, v [B, S, heads, D]; q and k rotated unless cos is None (a ring cache rotates later)."""
    cfg = self.cfg
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    if cos is not None:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, (BATCH, SEQ, HEADS, HEAD_DIM))
    k = constrain(k, (BATCH, SEQ, KV_HEADS, HEAD_DIM))
    return q, k, constrain(v, (BATCH, SEQ, KV_HEADS, HEAD_DIM))

  def _out(self, out):
    b, s = out.shape[:2]
    return self.o_proj(out.reshape(b, s, self.cfg.num_heads * self.cfg.head_dim))

  def __call__(self, x, cos, sin, positions, segment_ids=None):
    """Attention over the tokens of `x`; positions [B, S], or None for 0..S-1. With `segment_ids`
    (packed examples) the positions went to RoPE only: attention is causal by index within each
    segment."""
    q, k, v = self._qkv(x, cos, sin)
    if segment_ids is not None:
      impl = attention_lib.get_attention(self.cfg.attention)
      if not impl.segments:
        able = attention_lib.implementing("segments")
        raise ValueError(
          f"packed examples (segment_ids) need an attention that masks by segment ({', '.join(able)}), "
          f"not {self.cfg.attention!r}"
        )
      return self._out(
        attention_lib.bind(self.cfg)(q, k, v, q_positions=None, kv_positions=None, segment_ids=segment_ids)
      )
    if self.method is not None:
      if positions is not None:
        raise ValueError(
          f"attention {self.cfg.attention} runs over whole sequences at positions 0..S-1; "
          f"KV-cache decode and explicit positions are not implemented for it"
        )
      return self._out(self.method(x, q, k, v))
    return self._out(attention_lib.bind(self.cfg)(q, k, v, q_positions=positions, kv_positions=positions))

  def cached(self, x, rope: Rope, layer, attend):
    """Attention through a KV cache: `attend(q, k, v, rope, layer)` is the cache policy's (keys and
    queries before rotary embedding; the policy rotates them). Returns (output, layer state)."""
    q, k, v = self._qkv(x, None, None)
    out, layer = attend(q, k, v, rope, layer)
    return self._out(out), layer


class SwiGLU(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), init_std=cfg.initializer_range, rngs=rngs
    )
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, axes=(EMBED, MLP), **kw)
    self.up_proj = Linear(d, f, axes=(EMBED, MLP), **kw)
    self.down_proj = Linear(f, d, axes=(MLP, EMBED), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, (BATCH, SEQ, MLP)))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def _mlp(self, x):
    return constrain(x + self.mlp(self.post_attention_layernorm(x)), BATCH_SEQ_EMBED)

  def __call__(self, x, cos, sin, positions, segment_ids=None):
    return self._mlp(x + self.self_attn(self.input_layernorm(x), cos, sin, positions, segment_ids))

  def cached(self, x, rope, layer, attend):
    """As `__call__`, through a KV cache (`Attention.cached`): returns (x, layer state)."""
    h, layer = self.self_attn.cached(self.input_layernorm(x), rope, layer, attend)
    return self._mlp(x + h), layer


_REMAT_POLICIES = {
  "full": None,  # save nothing, recompute the whole block
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_fn(remat: str):
  call = lambda block, x, cos, sin, pos, seg: block(x, cos, sin, pos, seg)
  if remat == "none":
    return call
  return nnx.remat(call, policy=_REMAT_POLICIES[remat])


class Llama(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = Embed(
      cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, init_std=cfg.initializer_range, rngs=rngs
    )
    if cfg.scan_layers:
      # One Block whose parameters have a leading LAYERS axis, applied with nnx.scan.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def make_stack(rngs):
        return Block(cfg, rngs=rngs)

      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else Linear(
        cfg.hidden_size,
        cfg.vocab_size,
        axes=(EMBED, VOCAB),
        dtype=dt,
        param_dtype=pdt,
        init_std=cfg.initializer_range,
        rngs=rngs,
      )
    )

  def _embed(self, tokens, positions):
    cfg = self.cfg
    rope_positions = attention_lib.index_positions(*tokens.shape) if positions is None else positions
    # A constant under jit; not a variable, so the model state is exactly its parameters.
    cos, sin = rope_cos_sin(rope_positions, rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    return constrain(self.embed_tokens(tokens), BATCH_SEQ_EMBED), cos, sin

  def hidden_states(
    self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Final-norm hidden states [B, S, hidden] of int32 `tokens` [B, S] at `positions` [B, S]
    (None: 0..S-1). `segment_ids` [B, S]: packed examples (module docstring)."""
    x, cos, sin = self._embed(tokens, positions)
    block_fn = _block_fn(self.cfg.remat)
    if self.cfg.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def run(x, block):
        return block_fn(block, x, cos, sin, positions, segment_ids)

      x = run(x, self.layers)
    else:
      for block in self.layers:
        x = block_fn(block, x, cos, sin, positions, segment_ids)
    return self.norm(x)

  def forward_with_cache(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    cache,
    *,
    tree=None,
    num_layers: int | None = None,
    layout=None,
  ) -> CachedForward:
    """Runs `tokens` [B, S] at `positions` [B, S] through a KV cache: each layer's attention goes
    through the cache's policy (`jaxeff.inference.cache`), which writes what it keeps. Inference
    only (no remat).

    Args:
      tokens: int32 [B, S].
      positions: int32 [B, S], each row's own positions (negative: padding, for policies that
        take it).
      cache: a `jaxeff.inference.cache.Cache` built for this model (`policy.init(model.cfg, ...)`).
      tree: the tokens are a token tree (speculative decoding; `jaxeff.inference.cache.TreeSlots`):
        each sees only its ancestors among them. Policies that can roll back (dense) take it.
      num_layers: run only the first `num_layers` layers (then the final norm): a self-speculative
        draft; the other layers' cache is left as it is.
      layout: a ragged step (`jaxeff.inference.cache.paged.PackedLayout` or `RaggedLayout`):
        `tokens` [1, T] are several sequences' tokens in one row, for policies that take it (paged).
    """
    if positions is None:
      raise ValueError("a cached forward needs explicit positions (where to write in the cache)")
    cfg = self.cfg
    impl = attention_lib.get_attention(cfg.attention)
    if not impl.cache:
      raise ValueError(
        f"attention {cfg.attention} runs over whole sequences at positions 0..S-1; "
        f"KV-cache decode and explicit positions are not implemented for it"
      )
    if cache.stacked != cfg.scan_layers:
      raise ConfigError(
        f"cache layout ({'stacked' if cache.stacked else 'per layer'}) does not match "
        f"model scan_layers={cfg.scan_layers}; build it with the policy's init(model.cfg, ...)"
      )
    depth = cfg.num_layers if num_layers is None else num_layers
    if not 1 <= depth <= cfg.num_layers:
      raise ValueError(f"num_layers must be in [1, {cfg.num_layers}], got {num_layers}")
    policy = cache.policy
    policy.check_model(cfg)
    # Padding (position < 0) is rotated at 0; policies that take padding never keep or show it.
    rope = Rope.make(jnp.maximum(positions, 0), rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    extra = {}
    if layout is not None:
      if not policy.ragged:
        raise ConfigError(f"a ragged step needs a cache that takes one (paged), not {policy.name}")
      extra["layout"] = layout
    step = policy.begin(cache, positions, rope=rope, tree=tree, partial=depth < cfg.num_layers, **extra)
    attention = attention_lib.bind(cfg)
    attend = lambda q, k, v, rope, layer: policy.attend(step, q, k, v, rope, layer, attention)
    x = constrain(self.embed_tokens(tokens), BATCH_SEQ_EMBED)
    if cfg.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def run(x, block, layer):
        return block.cached(x, rope, layer, attend)

      layers, states = self.layers, cache.layers
      if depth < cfg.num_layers:  # the stacked parameters and cache of the first layers only
        graphdef, params = nnx.split(layers)
        layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:depth], params))
        states = jax.tree.map(lambda a: a[:depth], states)
      x, states = run(x, layers, states)
      if depth < cfg.num_layers:
        states = jax.tree.map(
          lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, 0), cache.layers, states
        )
    else:
      states = list(cache.layers)
      for i in range(depth):
        x, states[i] = self.layers[i].cached(x, rope, states[i], attend)
      states = tuple(states)
    return CachedForward(self.norm(x), policy.finish(cache, states, step))

  def logits(self, x: jax.Array) -> jax.Array:
    """f32 logits [..., vocab] from final hidden states [..., hidden] (the LM head, tied or not)."""
    logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(
    self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """int32 tokens [B, S] -> f32 logits [B, S, vocab]; positions [B, S] (None: 0..S-1);
    `segment_ids` [B, S]: packed examples (module docstring)."""
    return constrain(self.logits(self.hidden_states(tokens, positions, segment_ids)), (BATCH, SEQ, VOCAB))
