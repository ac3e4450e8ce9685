"""Next-token perplexity of a long text as a decoder with a given KV-cache policy sees it.

>>> import numpy as np
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.inference import StreamingLLM, perplexity
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> tokens = np.random.default_rng(0).integers(0, 64, 200)
>>> dense = perplexity(model, tokens, chunk=64)
>>> covered = perplexity(model, tokens, kv_cache=StreamingLLM(sinks=4, window=196), chunk=64)
>>> bool(abs(dense - covered) < 1e-3 * dense)        # a budget that covers the text: dense attention
True
>>> StreamingLLM(sinks=4, window=28).cache_bytes(cfg, batch_size=1)   # flat: 32 slots, however long
4224

The text goes through the cache in chunks (each token attends to what the policy kept of the past,
plus the chunk up to itself): the measurement every paper of this family reports.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff.errors import GenerationError
from jaxeff.inference.cache import Dense
from jaxeff.inference.runner import mesh_of


def _forward_program(graphdef):
  @functools.partial(jax.jit, donate_argnums=1)
  def forward(state, cache, tokens, positions, targets):
    model = nnx.merge(graphdef, state)
    x, cache = model.forward_with_cache(tokens, positions, cache)
    logp = jax.nn.log_softmax(model.logits(x), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], cache

  return forward


def token_nll(model, tokens, *, kv_cache=None, chunk: int = 256) -> np.ndarray:
  """Next-token negative log-likelihoods [B, N-1] of `tokens` (int [N] or [B, N]) read in chunks
  through the cache policy `kv_cache` (None: `Dense()`), as a decoder with that cache sees it.

  Every chunk compiles once (a shorter last chunk is padded, its tail dropped), so the cost is one
  program per call whatever the length. Raises GenerationError for bad input."""
  policy = Dense() if kv_cache is None else kv_cache
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise GenerationError(f"perplexity needs at least 2 tokens per row, got shape {tokens.shape}")
  if tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size:
    raise GenerationError(f"token ids must lie in [0, {model.cfg.vocab_size})")
  b, n = tokens.shape
  if chunk < 1:
    raise GenerationError(f"chunk must be >= 1, got {chunk}")
  chunk = min(chunk, policy.max_chunk(n), n - 1)
  steps = math.ceil((n - 1) / chunk)
  length = steps * chunk  # the dense cache holds the padded text
  graphdef, state = nnx.split(model)
  forward = _forward_program(graphdef)
  make = jax.jit(lambda: policy.init(model.cfg, b, policy.reading_length(length, chunk)))
  mesh = mesh_of(state)
  if mesh is not None:  # a sharded model: the cache in its logical sharding on the same mesh
    with jax.set_mesh(mesh):
      cache = make()
  else:  # committed like the cache each chunk returns, so the second chunk reuses the first's program
    cache = jax.device_put(make(), jax.tree.leaves(state)[0].sharding)
  padded = np.zeros((b, length + 1), np.int32)
  padded[:, :n] = tokens
  nll = []
  for i in range(steps):
    start = i * chunk
    positions = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (b, chunk))
    out, cache = forward(
      state, cache, padded[:, start : start + chunk], positions, padded[:, start + 1 : start + chunk + 1]
    )
    nll.append(np.asarray(out, np.float64))
  return np.concatenate(nll, axis=1)[:, : n - 1]  # the padded tail predicts nothing


def perplexity(model, tokens, *, kv_cache=None, chunk: int = 256) -> float:
  """exp(mean next-token negative log-likelihood) of `tokens` (int [N] or [B, N]) read in chunks
  through the cache policy `kv_cache` (None: `Dense()`); see `token_nll`."""
  return math.exp(float(token_nll(model, tokens, kv_cache=kv_cache, chunk=chunk).mean()))
