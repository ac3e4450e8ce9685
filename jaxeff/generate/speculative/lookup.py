"""Prompt lookup decoding: draft by copying what followed the last n-gram earlier in the text.

Saxena, "Prompt Lookup Decoding" (2023; transformers' `prompt_lookup_num_tokens`), a
retrieval-style draft with no model: summarizing, editing, code completion and RAG answers repeat
spans of their input, so the tokens that followed the latest earlier occurrence of the text's last
n-gram are a good guess for what comes next.

For n = max_ngram down to 1, find the latest end position j < pos with
history[j-n+1 .. j] == history[pos-n+1 .. pos]; the first n with a match wins and the draft is
history[j+1 .. j+num_draft]. Past `pos` the text is unknown, so those draft tokens continue the
period pos - j (history[j + 1 + (i mod (pos - j))]): a repeating loop is predicted in full. With no
match at any n, the draft repeats the root token (a guess that costs only its verification).
Everything runs on the device, inside the compiled draft step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff.errors import GenerationError
from jaxeff.inference.speculation import DraftContext, Speculator
from jaxeff.inference.tree import Tree


def lookup_draft(history: jax.Array, pos: jax.Array, *, max_ngram: int, num_draft: int) -> tuple[jax.Array, jax.Array]:
  """(draft [B, num_draft] int32, matched n-gram length [B], 0 for none) from history [B, T] up to pos [B]."""
  b, t = history.shape
  idx = jnp.arange(t)[None]  # candidate match end j
  best_end = jnp.full(b, -1, jnp.int32)
  best_n = jnp.zeros(b, jnp.int32)
  for n in range(max_ngram, 0, -1):
    match = (idx < pos[:, None]) & (idx - n + 1 >= 0) & (pos[:, None] - n + 1 >= 0)
    for m in range(n):
      suffix = jnp.take_along_axis(history, jnp.maximum(pos - m, 0)[:, None], axis=1)  # [B, 1]
      shifted = jnp.roll(history, m, axis=1)  # shifted[:, j] = history[:, j - m]
      match &= shifted == suffix
    end = jnp.max(jnp.where(match, idx, -1), axis=1).astype(jnp.int32)
    take = (best_end < 0) & (end >= 0)
    best_end = jnp.where(take, end, best_end)
    best_n = jnp.where(take, n, best_n)
  found = best_end >= 0
  period = jnp.maximum(pos - best_end, 1)
  offsets = jnp.arange(num_draft)[None]
  source = jnp.where(found[:, None], best_end[:, None] + 1 + offsets % period[:, None], pos[:, None])
  return jnp.take_along_axis(history, source, axis=1), best_n


class PromptLookup(Speculator):
  """Draft `num_draft` tokens by n-gram lookup in the prompt and the text so far (no draft model).

  Args:
    max_ngram: longest n-gram matched (the longest match is preferred).
    num_draft: draft tokens verified per step (a chain).
  """

  name = "lookup"

  def __init__(self, max_ngram: int = 3, num_draft: int = 8):
    if max_ngram < 1 or num_draft < 1:
      raise GenerationError(f"PromptLookup needs max_ngram >= 1 and num_draft >= 1, got {max_ngram}, {num_draft}")
    self.max_ngram, self.tree = max_ngram, Tree.chain(num_draft)

  def __repr__(self):
    return f"PromptLookup(max_ngram={self.max_ngram}, num_draft={self.num_draft})"

  def draft(self, target, target_cache, params, cache, ctx: DraftContext, sampling, values):
    tokens, _ = lookup_draft(ctx.history, ctx.pos, max_ngram=self.max_ngram, num_draft=self.num_draft)
    return tokens, None, target_cache, cache
