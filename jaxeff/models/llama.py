"""Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v bias), tied or untied head.

  logits = Llama(config, rngs=nnx.Rngs(0))(tokens)                      # int32 [B, S] -> f32 [B, S, vocab]
  logits, cache = model(tokens, positions, cache=init_cache(cfg, B, T))  # with a static KV cache

One forward serves training and inference: without a cache, attention runs over the tokens given
(positions default to 0..S-1, which the attention implementation is told statically); with a
`jaxeff.models.kv_cache.KVCache`, each layer writes its keys and values at `positions` and attends
over the whole cache, masked by position, and the updated cache is returned.

Module and parameter names follow Hugging Face's (q_proj, gate_proj, input_layernorm, ...), so
`jaxeff.hf` maps checkpoints one to one. Every parameter carries logical axes
(`jaxeff.sharding.LOGICAL_RULES` maps them to the mesh); activations are constrained by the same names.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.models import attention as attention_lib
from jaxeff.models import kv_cache as kv_cache_lib
from jaxeff.models.kv_cache import KVCache
from jaxeff.models.layers import Embed, Linear, RMSNorm, apply_rope, rope_cos_sin, rope_frequencies
from jaxeff.models.nsa import NativeSparseAttention
from jaxeff.sharding import constrain

BATCH_SEQ_EMBED = ("batch", "seq", "embed")


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(dtype=dt, param_dtype=pdt, init_std=cfg.initializer_range, rngs=rngs)
    d, hd = cfg.hidden_size, cfg.head_dim
    self.q_proj = Linear(d, cfg.num_heads * hd, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
    self.k_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.v_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **kw)
    self.o_proj = Linear(cfg.num_heads * hd, d, axes=("heads", "embed"), **kw)
    self.nsa = NativeSparseAttention(cfg, rngs=rngs) if cfg.attention == "nsa" else None

  def __call__(self, x, cos, sin, positions, kv=None):
    """positions: [B, S], or None for 0..S-1. kv: this layer's (keys, values) cache arrays, or None.

    Returns the output, and with `kv` also the updated (keys, values).
    """
    cfg = self.cfg
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    if self.nsa is not None:
      if kv is not None or positions is not None:
        raise ValueError("attention nsa runs over whole sequences at positions 0..S-1; KV-cache decode and "
                         "explicit positions are not implemented for it")
      return self.o_proj(self.nsa(x, q, k, v).reshape(b, s, cfg.num_heads * cfg.head_dim))
    attend = attention_lib.get_attention(cfg.attention)
    if cfg.attention_sinks:
      attend = functools.partial(attend, sinks=cfg.attention_sinks)
    if cfg.attention_topk_blocks:
      attend = functools.partial(attend, topk_blocks=cfg.attention_topk_blocks)
    if kv is None:
      out = attend(q, k, v, q_positions=positions, kv_positions=positions, sliding_window=cfg.sliding_window)
      return self.o_proj(out.reshape(b, s, cfg.num_heads * cfg.head_dim))
    if cfg.attention_topk_blocks:
      # Training selects per query block from its first query; a one-token decode step would select
      # from each token's own query: a different mask than the model was trained with.
      raise ValueError("KV-cache decode with model.attention_topk_blocks is not implemented (training selects "
                       "blocks per query block); decode with a full forward, or use sliding_window/attention_sinks")
    k_cache, v_cache = (kv_cache_lib.write(c, new, positions) for c, new in zip(kv, (k, v)))
    kv_positions = attention_lib.index_positions(b, k_cache.shape[2])  # slot t holds position t
    out = attend(q, kv_cache_lib.as_attention_layout(k_cache), kv_cache_lib.as_attention_layout(v_cache),
                 q_positions=positions, kv_positions=kv_positions, sliding_window=cfg.sliding_window)
    return self.o_proj(out.reshape(b, s, cfg.num_heads * cfg.head_dim)), (k_cache, v_cache)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
              init_std=cfg.initializer_range, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ("batch", "seq", "mlp")))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, positions, kv=None):
    """Returns x, and with a layer cache `kv` also the updated (keys, values)."""
    if kv is None:
      x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions)
    else:
      h, kv = self.self_attn(self.input_layernorm(x), cos, sin, positions, kv)
      x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    x = constrain(x, BATCH_SEQ_EMBED)
    return x if kv is None else (x, kv)


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_fn(remat: str):
  call = lambda block, x, cos, sin, pos: block(x, cos, sin, pos)
  if remat == "none":
    return call
  return nnx.remat(call, policy=_REMAT_POLICIES[remat])


class Llama(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                              init_std=cfg.initializer_range, rngs=rngs)
    if cfg.scan_layers:
      # One Block whose parameters have a leading "layers" axis, applied with nnx.scan.
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_stack(rngs):
        return Block(cfg, rngs=rngs)

      self.layers = make_stack(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), dtype=dt, param_dtype=pdt,
        init_std=cfg.initializer_range, rngs=rngs)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                    cache: KVCache | None = None):
    """Final-norm hidden states [B, S, hidden]; with `cache`, also the updated cache.

    Args:
      tokens: int32 [B, S].
      positions: int32 [B, S], each row's positions; None for 0..S-1. Required with a cache.
      cache: a `KVCache` (`jaxeff.models.kv_cache.init_cache`) for this model's layout.
    """
    cfg = self.cfg
    if cache is not None and positions is None:
      raise ValueError("a cached forward needs explicit positions (where to write in the cache)")
    rope_positions = positions
    if positions is None:
      rope_positions = attention_lib.index_positions(*tokens.shape)
    # A constant under jit; not a variable, so the model state is exactly its parameters.
    cos, sin = rope_cos_sin(rope_positions, rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    x = constrain(self.embed_tokens(tokens), BATCH_SEQ_EMBED)
    if cache is not None:
      x, cache = self._layers_with_cache(x, cos, sin, positions, cache)
      return self.norm(x), cache
    block_fn = _block_fn(cfg.remat)
    if cfg.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run(x, block):
        return block_fn(block, x, cos, sin, positions)

      x = run(x, self.layers)
    else:
      for block in self.layers:
        x = block_fn(block, x, cos, sin, positions)
    return self.norm(x)

  def _layers_with_cache(self, x, cos, sin, positions, cache: KVCache):
    # Inference only: nothing is differentiated, so no remat.
    if cache.stacked != self.cfg.scan_layers:
      raise ValueError(f"cache layout ({'stacked' if cache.stacked else 'per layer'}) does not match "
                       f"model scan_layers={self.cfg.scan_layers}; build it with init_cache(model.cfg, ...)")
    if self.cfg.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def run(x, block, kv):
        return block(x, cos, sin, positions, kv)

      x, (k, v) = run(x, self.layers, (cache.k, cache.v))
      return x, KVCache(k, v)
    ks, vs = [], []
    for block, kv in zip(self.layers, zip(cache.k, cache.v)):
      x, (k, v) = block(x, cos, sin, positions, kv)
      ks.append(k)
      vs.append(v)
    return x, KVCache(tuple(ks), tuple(vs))

  def logits(self, x: jax.Array) -> jax.Array:
    """f32 logits [..., vocab] from final hidden states [..., hidden] (the LM head, tied or not)."""
    logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *, cache: KVCache | None = None):
    """int32 tokens [B, S] -> f32 logits [B, S, vocab]; with `cache`, (logits, updated cache)."""
    if cache is None:
      return constrain(self.logits(self.hidden_states(tokens, positions)), ("batch", "seq", "vocab"))
    x, cache = self.hidden_states(tokens, positions, cache=cache)
    return constrain(self.logits(x), ("batch", "seq", "vocab")), cache
