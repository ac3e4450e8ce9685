"""Model drafts: the target's own first layers (`SelfDraft`) or a smaller model (`DraftModel`).

Both draft a chain of `num_draft` tokens one at a time (greedy when the request is greedy, else
sampled from the draft's own filtered distribution q, which the verification rule then corrects:
Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

`SelfDraft(layers=L)`: the target's first L layers, then its final norm and LM head (early exit, as
LayerSkip, Elhoushi et al. 2024, and Draft & Verify, Zhang et al. 2023, which skips layers). It
shares the target's KV cache for those layers: the draft writes its tokens' keys/values for layers
< L and the verification forward writes the same values again (same tokens, same positions,
same layers), so nothing needs syncing.

`DraftModel(model)`: any jaxeff model with the target's vocabulary, with a cache of its own. The
draft step starts by running the token before the root again (the last accepted draft token is
never run through the draft when the whole chain was accepted), so its cache stays in step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.inference.cache import Dense
from jaxeff.inference.sampling import filtered_logits, sample
from jaxeff.inference.speculation import DraftContext, Speculator
from jaxeff.inference.tree import Tree


def _draw(logits, key, sampling, values):
  """(token [B], q [B, V] or None) from draft logits [B, V] (rows at temperature 0: the argmax)."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  q = jax.lax.cond(
    jnp.any(jnp.asarray(values["temperature"]) > 0),
    lambda: jax.nn.softmax(filtered_logits(logits, sampling, values), axis=-1),
    lambda: jnp.zeros(logits.shape, jnp.float32),  # every row greedy: q is never read
  )
  return sample(logits, key, sampling, values), q


def _draft_keys(keys, positions):
  # A stream apart from the verification's (which folds the root position into the row key).
  return jax.vmap(lambda k, p: jax.random.fold_in(jax.random.fold_in(k, p), 7))(keys, positions)


def _chain(step, first_logits, ctx: DraftContext, num_draft: int, sampling, values, carry):
  """Runs `step(carry, tokens [B], positions [B]) -> (logits [B, V], carry)` num_draft - 1 times."""
  tokens, qs = [], []
  logits = first_logits
  for i in range(num_draft):
    tok, q = _draw(logits, _draft_keys(ctx.keys, ctx.pos + i + 1), sampling, values)
    tokens.append(tok)
    qs.append(q)
    if i + 1 < num_draft:
      logits, carry = step(carry, tok, ctx.pos + i + 1)
  q = None if sampling.greedy else jnp.stack(qs, axis=1)
  return jnp.stack(tokens, axis=1), q, carry


class SelfDraft(Speculator):
  """Draft with the target's first `layers` layers plus its final norm and head.

  Args:
    layers: draft depth L, 1 <= L < the target's layer count.
    num_draft: draft tokens per step (a chain).
  """

  name = "self"

  def __init__(self, layers: int, num_draft: int = 4):
    if layers < 1 or num_draft < 1:
      raise GenerationError(f"SelfDraft needs layers >= 1 and num_draft >= 1, got {layers}, {num_draft}")
    self.layers, self.tree = layers, Tree.chain(num_draft)

  def __repr__(self):
    return f"SelfDraft(layers={self.layers}, num_draft={self.num_draft})"

  def bind(self, target, *, max_batch, max_seq_len, mesh=None):
    if self.layers >= target.cfg.num_layers:
      raise GenerationError(
        f"SelfDraft(layers={self.layers}) needs fewer layers than the target's {target.cfg.num_layers}"
      )

  def draft(self, target, target_cache, params, cache, ctx: DraftContext, sampling, values):
    def step(target_cache, tok, pos):
      out = target.forward_with_cache(tok[:, None], pos[:, None], target_cache, num_layers=self.layers)
      return target.logits(out.hidden[:, 0]), out.cache

    logits, target_cache = step(target_cache, ctx.last, ctx.pos)
    tokens, q, target_cache = _chain(step, logits, ctx, self.num_draft, sampling, values, target_cache)
    return tokens, q, target_cache, cache


class DraftModel(Speculator):
  """Draft with a separate (smaller) jaxeff model of the same vocabulary, with its own KV cache.

  Args:
    model: the draft model (its weights are used as they are at construction).
    num_draft: draft tokens per step (a chain).
  """

  name = "draft"

  def __init__(self, model, num_draft: int = 4):
    if num_draft < 1:
      raise GenerationError(f"DraftModel needs num_draft >= 1, got {num_draft}")
    self.cfg = model.cfg
    self._graphdef, self._state = nnx.split(model)
    self.tree = Tree.chain(num_draft)
    self._cache_shape = None

  def __repr__(self):
    return f"DraftModel({self.cfg.num_layers} layers, hidden {self.cfg.hidden_size}, num_draft={self.num_draft})"

  def bind(self, target, *, max_batch, max_seq_len, mesh=None):
    if target.cfg.vocab_size != self.cfg.vocab_size:
      raise GenerationError(
        f"the draft model's vocabulary ({self.cfg.vocab_size}) differs from the target's ({target.cfg.vocab_size})"
      )
    self._mesh = mesh
    if mesh is not None:
      self._state = jax.device_put(self._state, sharding.state_shardings(self._state, mesh))
    self._cache_shape = (max_batch, max_seq_len)

  def params(self):
    return self._state

  def init_cache(self):
    cache = jax.jit(lambda: Dense().init(self.cfg, *self._cache_shape))()
    if self._mesh is None:  # committed like the target's, so the donated cache keeps its program
      cache = jax.device_put(cache, jax.tree.leaves(self._state)[0].sharding)
    return cache

  def prefill(self, params, cache, tokens, positions):
    model = nnx.merge(self._graphdef, params)
    return model.forward_with_cache(tokens, positions, cache).cache

  def draft(self, target, target_cache, params, cache, ctx: DraftContext, sampling, values):
    model = nnx.merge(self._graphdef, params)

    def step(cache, tok, pos):
      out = model.forward_with_cache(tok[:, None], pos[:, None], cache)
      return model.logits(out.hidden[:, 0]), out.cache

    # The token before the root again, then the root: the draft's cache holds every accepted token.
    before = jnp.take_along_axis(ctx.history, jnp.maximum(ctx.pos - 1, 0)[:, None], axis=1)[:, 0]
    tokens = jnp.stack([before, ctx.last], axis=1)
    positions = jnp.stack([jnp.maximum(ctx.pos - 1, 0), ctx.pos], axis=1)
    out = model.forward_with_cache(tokens, positions, cache)
    logits = model.logits(out.hidden[:, 1])
    draft_tokens, q, cache = _chain(step, logits, ctx, self.num_draft, sampling, values, out.cache)
    return draft_tokens, q, target_cache, cache
