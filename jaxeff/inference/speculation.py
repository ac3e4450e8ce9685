"""What a speculator is: a static tree of draft slots and a traced function that fills it.

A `Speculator` proposes, for every row, the tokens of a static `Tree` (a chain for sequential
drafters) from what the step knows (`DraftContext`). The model runner (`jaxeff.inference.runner`)
runs the rest: one target forward over the tree, the verification rule (`jaxeff.inference.verify`),
cache compaction, stop tokens, each row's budget. `draft` and `prefill` run inside the runner's
compiled programs, so they must be traceable with static shapes; the speculators themselves live
in `jaxeff.generate.speculative` (prompt lookup, self-draft, draft models, Medusa).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxeff.inference.tree import Tree


class DraftContext(NamedTuple):
  """What a draft step sees (device arrays, one row per batch row)."""

  history: jax.Array  # [B, T] int32: token at each position so far (the root included)
  pos: jax.Array  # [B] int32: position of the root (the newest token, not yet in the cache)
  last: jax.Array  # [B] int32: the root token
  hidden: jax.Array  # [B, H]: the target's final hidden state that produced the root token
  keys: jax.Array  # [B] typed PRNG keys for this step


class Speculator:
  """Base class. Subclasses set `tree` and implement `draft`; the rest is optional.

  Attributes:
    tree: the static candidate tree; `tree.size - 1` draft tokens per step.
    name: shown in statistics and the CLI.
    rule: "exact" (lossless speculative sampling) or "typical" (Medusa's typical acceptance).
  """

  tree: Tree
  name: str = "speculator"
  rule: str = "exact"  # the verification rule at temperature > 0 ("typical": Medusa's, lossy)

  @property
  def num_draft(self) -> int:
    return self.tree.size - 1

  def bind(self, target, *, max_batch: int, max_seq_len: int, mesh=None) -> None:
    """Called once by the model runner with the target model: check compatibility, allocate."""

  def params(self):
    """Arrays the draft reads (a draft model's or heads' weights): passed to every program."""
    return None

  def init_cache(self):
    """The speculator's own cache (a `jaxeff.inference.cache.Cache` of `max_batch` rows, donated to
    every program, windowed by rows like the target's), or None."""
    return None

  def prefill(self, params, cache, tokens: jax.Array, positions: jax.Array):
    """Inside the prefill program: a prompt chunk `tokens` [B, C] at `positions` [B, C] -> the
    speculator's cache."""
    return cache

  def draft(self, target, target_cache, params, cache, ctx: DraftContext, sampling, values):
    """-> (tokens [B, N-1] for nodes 1..N-1, q [B, N-1, V] or None, target_cache, cache).

    `target` is the merged target model (a self-draft runs its first layers through
    `target_cache`); `sampling`/`values` are the step's `SamplingShape` and per-row value arrays
    (rows with temperature 0 are greedy).
    """
    raise NotImplementedError
