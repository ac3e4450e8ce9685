"""Medusa: draft heads on the target's last hidden state, candidates arranged as a token tree.

Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads". Head k reads the final hidden state h_t that produced the newest token (position t + 1)
and predicts the token at t + k + 2 (`medusa_heads.MedusaHeads`). Each step the draft takes the
top candidates of every head (ranks 0, 1, ... without replacement) and places them on a static
tree: a node at depth d with rank r holds head d-1's rank-r token. One target forward verifies the
whole tree (tree attention mask) and the hidden state of the deepest accepted node feeds the next
step's heads, so the draft costs only the heads and one LM-head product for all of them.

Trees: a chain of top-1 tokens (depth = number of heads) by default; `tree_size=N` builds
Sequoia's optimal tree of N nodes from the acceptance table measured when the heads were trained
(`jaxeff.inference.tree.sequoia_tree`); `tree=` takes any `Tree` (e.g. Medusa's
"medusa_choices" through `Tree.from_paths`). Verification is exact (greedy: the argmax; sampled:
the lossless rule for deterministic candidates); `typical=True` uses Medusa's typical acceptance
instead, which is faster at temperature > 0 but changes the output distribution (lossy).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.generate.speculative import medusa_heads
from jaxeff.inference.speculation import DraftContext, Speculator
from jaxeff.inference.tree import Tree, sequoia_tree


class Medusa(Speculator):
  """Medusa-1 heads as the draft.

  Args:
    heads: a checkpoint directory written by `python -m jaxeff.train medusa.base=...` (or
      `medusa_heads.save_heads`), or a `MedusaHeads` module.
    tree: the candidate tree; its depth must not exceed the number of heads.
    tree_size: instead of `tree`, Sequoia's best tree of this many nodes for the checkpoint's
      measured acceptance table.
    typical: Medusa's typical acceptance at temperature > 0 (lossy; see the module docstring).
  """

  name = "medusa"

  def __init__(self, heads, *, tree: Tree | None = None, tree_size: int | None = None, typical: bool = False):
    if isinstance(heads, (str, os.PathLike)):
      self.path = os.fspath(heads)
      heads, self.info = medusa_heads.load_heads(heads)
    else:
      self.path, self.info = None, None
    self.num_heads = heads.num_heads
    self._graphdef, self._state = nnx.split(heads)
    if tree is not None and tree_size is not None:
      raise GenerationError("give Medusa either tree or tree_size, not both")
    if tree_size is not None:
      acceptance = None if self.info is None else self.info.acceptance
      if acceptance is None:
        raise GenerationError("tree_size needs the heads' measured acceptance table (a checkpoint that has one)")
      tree = sequoia_tree(np.asarray(acceptance), tree_size, max_depth=self.num_heads)
    self.tree = Tree.chain(self.num_heads) if tree is None else tree
    if self.tree.max_depth > self.num_heads:
      raise GenerationError(f"the tree is {self.tree.max_depth} deep but there are only {self.num_heads} heads")
    self.rule = "typical" if typical else "exact"
    self._ranks = max(self.tree.ranks) + 1

  def __repr__(self):
    return f"Medusa({self.num_heads} heads, tree of {self.tree.size} nodes, depth {self.tree.max_depth}, {self.rule})"

  def bind(self, target, *, max_batch, max_seq_len, mesh=None):
    if self.info is not None:
      medusa_heads.check_base(self.info, target)
    hidden = jax.tree.leaves(self._state)[0].shape[-1]
    if hidden != target.cfg.hidden_size:
      raise GenerationError(f"the heads read hidden size {hidden}, the target has {target.cfg.hidden_size}")
    if mesh is not None:
      self._state = jax.device_put(self._state, sharding.state_shardings(self._state, mesh))

  def params(self):
    return self._state

  def draft(self, target, target_cache, params, cache, ctx: DraftContext, sampling, values):
    if self.tree.size == 1:  # a tree of the root alone (best_tree's choice when guessing does not pay)
      return jnp.zeros((ctx.last.shape[0], 0), jnp.int32), None, target_cache, cache
    heads = nnx.merge(self._graphdef, params)
    logits = target.logits(heads(ctx.hidden))  # [B, K, V]
    candidates = jax.lax.top_k(logits, self._ranks)[1].astype(jnp.int32)  # [B, K, R]
    depth, ranks = np.asarray(self.tree.depth)[1:], np.asarray(self.tree.ranks)[1:]
    return candidates[:, depth - 1, ranks], None, target_cache, cache
