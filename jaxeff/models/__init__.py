"""Sharded Llama-family models: the decoder, its layers and the attention registry (KV caches:
`jaxeff.inference.cache`)."""

from jaxeff.models import nsa  # noqa: F401  (registers attention "nsa")
from jaxeff.models.attention import ATTENTION_IMPLS, AttentionImpl, register_attention
from jaxeff.models.layers import Linear
from jaxeff.models.llama import CachedForward, Llama

__all__ = [
  "ATTENTION_IMPLS",
  "AttentionImpl",
  "register_attention",
  "Linear",
  "CachedForward",
  "Llama",
]
