"""Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v bias), tied or untied head.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama, init_cache
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> tokens = jnp.arange(6, dtype=jnp.int32)[None]
>>> model(tokens).shape                                      # int32 [B, S] -> f32 logits [B, S, vocab]
(1, 6, 64)
>>> out = model.forward_with_cache(tokens, jnp.arange(6)[None], init_cache(cfg, 1, 16))
>>> model.logits(out.hidden).shape, out.cache.max_len       # CachedForward(hidden, cache)
((1, 6, 64), 16)

Two forwards, each with one return type. `model(tokens, positions=None)` runs attention over the
tokens given (positions default to 0..S-1, which the attention implementation is told
statically) and returns logits. `forward_with_cache` writes each layer's keys and values into a
`jaxeff.models.kv_cache.KVCache` at `positions`, attends over the whole cache (masked by
position) and returns the final hidden states with the updated cache; the caller takes logits
of the positions it needs (`model.logits`), e.g. only each prompt's last one at prefill.

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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.errors import ConfigError
from jaxeff.models import attention as attention_lib
from jaxeff.models import kv_cache as kv_cache_lib
from jaxeff.models.h2o_cache import H2OCache, h2o_attention
from jaxeff.models.kivi_cache import KIVICache, kivi_attention
from jaxeff.models.kivi_cache import advance as kivi_advance
from jaxeff.models.kv_cache import KVCache
from jaxeff.models.layers import Embed, Linear, RMSNorm, apply_rope, rope_cos_sin, rope_frequencies
from jaxeff.models.ring_cache import RingCache, ring_attention
from jaxeff.models.ring_cache import advance as ring_advance
from jaxeff.models.snapkv_cache import SnapKVCache, snapkv_attention
from jaxeff.sharding import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, MLP, SEQ, VOCAB, constrain

BATCH_SEQ_EMBED = (BATCH, SEQ, EMBED)


class CachedForward(NamedTuple):
  """What `Llama.forward_with_cache` returns."""

  hidden: jax.Array  # final-norm hidden states [B, S, hidden]
  cache: KVCache  # the cache with this call's keys and values written


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

  def _attend_fn(self):
    cfg = self.cfg
    impl = attention_lib.get_attention(cfg.attention)
    options = {}
    if cfg.attention_sinks:
      options["sinks"] = cfg.attention_sinks
    if cfg.attention_topk_blocks:
      options["topk_blocks"] = cfg.attention_topk_blocks
    return functools.partial(impl.fn, sliding_window=cfg.sliding_window, **options)

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

  def ring(self, x, positions, kv, cache: RingCache):
    """Attention through a sinks + window ring cache (`jaxeff.models.ring_cache`): returns
    (output, (keys, values)) with this chunk written into the ring."""
    cfg = self.cfg
    q, k, v = self._qkv(x, None, None)
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    out, k_cache, v_cache = ring_attention(
      q, k, v, positions, kv[0], kv[1], cache.slot_positions, sinks=cache.sinks, window=cache.window, inv_freq=inv_freq
    )
    return self._out(out), (k_cache, v_cache)

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
      return self._out(self._attend_fn()(q, k, v, q_positions=None, kv_positions=None, segment_ids=segment_ids))
    if self.method is not None:
      if positions is not None:
        raise ValueError(
          f"attention {self.cfg.attention} runs over whole sequences at positions 0..S-1; "
          f"KV-cache decode and explicit positions are not implemented for it"
        )
      return self._out(self.method(x, q, k, v))
    return self._out(self._attend_fn()(q, k, v, q_positions=positions, kv_positions=positions))

  def selective(self, x, cos, sin, positions, layer, attend):
    """Attention through a cache that keeps its own entries per kv head (H2O, SnapKV): `attend`
    (q, k, v, positions, layer) -> (output, layer state after this chunk)."""
    q, k, v = self._qkv(x, cos, sin)
    out, layer = attend(q, k, v, positions, layer)
    return self._out(out), layer

  def cached(self, x, cos, sin, positions, kv, tree=None):
    """Writes this step's keys/values into the layer cache `kv` at `positions` [B, S] and attends
    over the whole cache. Returns (output, (keys, values)). `tree`: (slots, kv_positions, mask)
    from `kv_cache.tree_layout` (token-tree verification) instead of slot t = position t."""
    cfg = self.cfg
    impl = attention_lib.get_attention(cfg.attention)
    if not impl.cache:
      raise ValueError(
        f"attention {cfg.attention} runs over whole sequences at positions 0..S-1; "
        f"KV-cache decode and explicit positions are not implemented for it"
      )
    if cfg.attention_topk_blocks:
      # Training selects per query block from its first query; a one-token decode step would select
      # from each token's own query: a different mask than the model was trained with.
      raise ValueError(
        "KV-cache decode with model.attention_topk_blocks is not implemented (training selects "
        "blocks per query block); decode with a full forward, or use sliding_window/attention_sinks"
      )
    q, k, v = self._qkv(x, cos, sin)
    options = {}
    if tree is None:
      slots = positions
      kv_positions = attention_lib.index_positions(x.shape[0], kv[0].shape[2])  # slot t holds position t
    else:
      if not impl.mask:
        able = attention_lib.implementing("mask")
        raise ValueError(
          f"token-tree verification needs an attention that takes a mask ({', '.join(able)}), "
          f"not {cfg.attention!r}; use a chain speculator with this attention"
        )
      slots, kv_positions, options["mask"] = tree
    k_cache, v_cache = (kv_cache_lib.write(c, new, slots) for c, new in zip(kv, (k, v)))
    out = self._attend_fn()(
      q,
      kv_cache_lib.as_attention_layout(k_cache),
      kv_cache_lib.as_attention_layout(v_cache),
      q_positions=positions,
      kv_positions=kv_positions,
      **options,
    )
    return self._out(out), (k_cache, v_cache)


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

  def ring(self, x, positions, kv, cache):
    """As `cached`, through a ring cache."""
    h, kv = self.self_attn.ring(self.input_layernorm(x), positions, kv, cache)
    return self._mlp(x + h), kv

  def selective(self, x, cos, sin, positions, layer, attend):
    """As `cached`, through a cache with per-head entries (H2O, SnapKV)."""
    h, layer = self.self_attn.selective(self.input_layernorm(x), cos, sin, positions, layer, attend)
    return self._mlp(x + h), layer

  def cached(self, x, cos, sin, positions, kv, tree=None):
    """As `__call__`, through the layer cache `kv`: returns (x, (keys, values))."""
    h, kv = self.self_attn.cached(self.input_layernorm(x), cos, sin, positions, kv, tree)
    return self._mlp(x + h), kv


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
    cache: KVCache,
    *,
    tree: kv_cache_lib.TreeSlots | None = None,
    num_layers: int | None = None,
  ) -> CachedForward:
    """Runs `tokens` [B, S] at `positions` [B, S] through the KV cache: each layer writes its keys
    and values there and attends over the whole cache. Inference only (no remat).

    Args:
      tokens: int32 [B, S].
      positions: int32 [B, S], each row's own positions, in [0, cache.max_len).
      cache: a `KVCache` for this model's layout (`jaxeff.models.kv_cache.init_cache(model.cfg, ...)`).
      tree: the tokens are a token tree (speculative decoding): written at `tree.start`.. and each
        sees only its ancestors among them (`kv_cache.TreeSlots`); needs an attention with `mask`.
      num_layers: run only the first `num_layers` layers (then the final norm): a self-speculative
        draft; the other layers' cache is left as it is.
    """
    if positions is None:
      raise ValueError("a cached forward needs explicit positions (where to write in the cache)")
    if isinstance(cache, (RingCache, H2OCache, SnapKVCache, KIVICache)):
      if tree is not None or num_layers is not None:
        raise ValueError("a bounded cache takes plain chunks (no token tree, all layers)")
      if isinstance(cache, RingCache):
        return self._forward_ring(tokens, positions, cache)
      return self._forward_selective(tokens, positions, cache)
    if cache.stacked != self.cfg.scan_layers:
      raise ConfigError(
        f"cache layout ({'stacked' if cache.stacked else 'per layer'}) does not match "
        f"model scan_layers={self.cfg.scan_layers}; build it with init_cache(model.cfg, ...)"
      )
    depth = self.cfg.num_layers if num_layers is None else num_layers
    if not 1 <= depth <= self.cfg.num_layers:
      raise ValueError(f"num_layers must be in [1, {self.cfg.num_layers}], got {num_layers}")
    x, cos, sin = self._embed(tokens, positions)
    layout = None if tree is None else kv_cache_lib.tree_layout(tree, positions, cache.max_len)
    if self.cfg.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def run(x, block, kv):
        return block.cached(x, cos, sin, positions, kv, layout)

      layers = self.layers
      if depth < self.cfg.num_layers:  # the stacked parameters and cache of the first layers only
        graphdef, state = nnx.split(layers)
        layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:depth], state))
      x, (k, v) = run(x, layers, (cache.k[:depth], cache.v[:depth]))
      if depth < self.cfg.num_layers:
        k, v = (jax.lax.dynamic_update_slice_in_dim(full, part, 0, 0) for full, part in ((cache.k, k), (cache.v, v)))
      return CachedForward(self.norm(x), KVCache(k, v))
    ks, vs = list(cache.k), list(cache.v)
    for i in range(depth):
      x, (ks[i], vs[i]) = self.layers[i].cached(x, cos, sin, positions, (ks[i], vs[i]), layout)
    return CachedForward(self.norm(x), KVCache(tuple(ks), tuple(vs)))

  def _forward_ring(self, tokens, positions, cache: RingCache) -> CachedForward:
    cfg = self.cfg
    if cfg.sliding_window is not None or cfg.attention_sinks:
      raise ConfigError("a ring (sinks + window) cache replaces the model's own sliding window; use one of them")
    if tokens.shape[1] > cache.window:
      raise ValueError(f"a chunk through a ring cache holds at most {cache.window} tokens, got {tokens.shape[1]}")
    if cache.stacked != cfg.scan_layers:
      raise ConfigError("ring cache layout does not match model scan_layers; build it with init_ring_cache(model.cfg)")
    x = constrain(self.embed_tokens(tokens), BATCH_SEQ_EMBED)
    if cfg.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def run(x, block, kv):
        return block.ring(x, positions, kv, cache)

      x, (k, v) = run(x, self.layers, (cache.k, cache.v))
    else:
      ks, vs = [], []
      for block, kv in zip(self.layers, zip(cache.k, cache.v)):
        x, (k, v) = block.ring(x, positions, kv, cache)
        ks.append(k)
        vs.append(v)
      k, v = tuple(ks), tuple(vs)
    return CachedForward(self.norm(x), cache.replace(k=k, v=v, slot_positions=ring_advance(cache, positions)))

  def _forward_selective(self, tokens, positions, cache) -> CachedForward:
    """Through an H2O or SnapKV cache (per layer and kv head its own kept entries) or a KIVI one
    (attention over quantized entries inside the layer)."""
    cfg = self.cfg
    name = type(cache).__name__
    if cfg.sliding_window is not None or cfg.attention_sinks:
      raise ConfigError(f"an {name} replaces the model's own sliding window; use one of them")
    if cache.stacked != cfg.scan_layers:
      raise ConfigError(f"{name} layout does not match model scan_layers; build it with the policy's init(model.cfg)")
    if isinstance(cache, H2OCache):
      attend = functools.partial(h2o_attention, heavy=cache.heavy, recent=cache.recent)
    elif isinstance(cache, SnapKVCache):
      attend = functools.partial(snapkv_attention, budget=cache.budget, window=cache.window, pool=cache.pool)
    else:
      counters = (cache.quantized, cache.end) + kivi_advance(cache, positions)
      attend = functools.partial(
        kivi_attention,
        counters=counters,
        bits=cache.bits,
        group=cache.group,
        impl=cache.impl,
        interpret=cache.interpret,
      )
    # Padding (position < 0) is rotated at 0 and never kept or seen.
    x, cos, sin = self._embed(tokens, jnp.maximum(positions, 0))
    if cfg.scan_layers:

      @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), transform_metadata={nnx.PARTITION_NAME: LAYERS})
      def run(x, block, layer):
        return block.selective(x, cos, sin, positions, layer, attend)

      x, layers = run(x, self.layers, cache.layers())
    else:
      per_layer = []
      for block, layer in zip(self.layers, zip(*cache.layers())):
        x, layer = block.selective(x, cos, sin, positions, layer, attend)
        per_layer.append(layer)
      layers = tuple(tuple(xs) for xs in zip(*per_layer))
    if isinstance(cache, H2OCache):
      k, v, slot_positions, scores = layers
      return CachedForward(self.norm(x), cache.replace(k=k, v=v, positions=slot_positions, scores=scores))
    if isinstance(cache, KIVICache):
      quantized, end = counters[2:]
      return CachedForward(self.norm(x), cache.with_layers(layers).replace(quantized=quantized, end=end))
    k, v, slot_positions = layers
    return CachedForward(self.norm(x), cache.replace(k=k, v=v, positions=slot_positions))

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
