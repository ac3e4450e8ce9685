"""Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v bias), tied or untied head.

  logits = Llama(config, rngs=nnx.Rngs(0))(tokens)      # int32 [B, S] -> f32 [B, S, vocab]

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
from jaxeff.models.layers import Embed, Linear, RMSNorm, apply_rope, rope_cos_sin, rope_frequencies
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

  def __call__(self, x, cos, sin, positions):
    cfg = self.cfg
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, cfg.num_heads, cfg.head_dim)
    k = self.k_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    attend = attention_lib.get_attention(cfg.attention)
    out = attend(q, k, v, q_positions=positions, kv_positions=positions, sliding_window=cfg.sliding_window)
    return self.o_proj(out.reshape(b, s, cfg.num_heads * cfg.head_dim))


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

  def __call__(self, x, cos, sin, positions):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, BATCH_SEQ_EMBED)


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

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [B, S, hidden]."""
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    # A constant under jit; not a variable, so the model state is exactly its parameters.
    cos, sin = rope_cos_sin(positions, rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    x = constrain(self.embed_tokens(tokens), BATCH_SEQ_EMBED)
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

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """int32 tokens [B, S] -> f32 logits [B, S, vocab]."""
    x = self.hidden_states(tokens, positions)
    logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
    return constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
