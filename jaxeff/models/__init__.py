"""Sharded Llama-family models."""

from jaxeff.models.attention import ATTENTION_IMPLS, register_attention
from jaxeff.models.kv_cache import KVCache, init_cache
from jaxeff.models.layers import Linear
from jaxeff.models.llama import Llama
