"""Sharded Llama-family models: the decoder, its layers, the attention registry and the KV cache."""

from jaxeff.models import nsa  # noqa: F401  (registers attention "nsa")
from jaxeff.models.attention import ATTENTION_IMPLS, AttentionImpl, register_attention
from jaxeff.models.kv_cache import KVCache, init_cache
from jaxeff.models.layers import Linear
from jaxeff.models.llama import CachedForward, Llama

__all__ = [
  "ATTENTION_IMPLS",
  "AttentionImpl",
  "register_attention",
  "KVCache",
  "init_cache",
  "Linear",
  "CachedForward",
  "Llama",
]
