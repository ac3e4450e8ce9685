"""Verification rules: which draft tokens the target accepts, and the token it adds.

Every rule takes the target's logits at each node of a static token tree (`tree.Tree`; a chain is
a tree) and returns, per row, the deepest accepted node `final` and the `bonus` token that follows
it (the target's own choice after the accepted path: a correction or, when every node of the path
was accepted, the free extra token).

- `accept_greedy`: a node is accepted when its token is the target's argmax after its parent, and
  so is every node on its path. The output equals plain greedy decoding token for token.
- `accept_sampled` with deterministic candidates (`q` None: prompt lookup, Medusa's top-k, a greedy
  draft): the rule of speculative sampling for one-hot drafts tried one child after another
  (SpecInfer / Sequoia's sampling without replacement): at a node with target distribution p and
  untried mass r, child x is accepted with probability p(x) / (1 - r); a rejected child's token is
  removed (r += p(x)); when every child is rejected, the bonus is drawn from p without the tried
  tokens. The output distribution is exactly the target's.
- `accept_sampled` with draft distributions `q` (a draft model sampling its chain; Leviathan et al.
  2023, Chen et al. 2023): x_i ~ q_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the
  first rejection the bonus is drawn from norm(max(0, p_i - q_i)); with every draft accepted, from
  the next p. Again exactly the target's distribution.
- `accept_typical` (Medusa's typical acceptance, lossy): a node is accepted when p(x) >
  min(epsilon, alpha * exp(-H(p))) at its parent; the bonus is sampled from the final node's p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.inference.tree import Tree


def _path_accepted(ok: jax.Array, tree: Tree) -> jax.Array:
  """ok [B, N] (node's own test; root True) -> [B, N]: every node on the path passed."""
  paths = np.asarray(tree.paths)
  along = jnp.where(paths[None] >= 0, ok[:, np.maximum(paths, 0)], True)  # [B, N, D+1]
  return jnp.all(along, axis=-1)


def _deepest(accepted: jax.Array, tree: Tree) -> jax.Array:
  """The deepest accepted node per row (the lowest index among equals; the root is always accepted)."""
  depth = jnp.asarray(np.asarray(tree.depth), jnp.int32)
  return jnp.argmax(jnp.where(accepted, depth[None], -1), axis=-1).astype(jnp.int32)


def accept_greedy(logits: jax.Array, tokens: jax.Array, tree: Tree) -> tuple[jax.Array, jax.Array]:
  """logits [B, N, V] at the nodes, node tokens [B, N] -> (final node [B], bonus token [B])."""
  target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # the target's next token after each node
  parents = np.maximum(np.asarray(tree.parents), 0)
  ok = (tokens == target[:, parents]).at[:, 0].set(True)
  final = _deepest(_path_accepted(ok, tree), tree)
  return final, jnp.take_along_axis(target, final[:, None], axis=1)[:, 0]


def _last_children(tree: Tree) -> dict[int, int]:
  return {kids[-1]: parent for parent, kids in enumerate(tree.children) if kids}


def accept_sampled(
  logits: jax.Array,
  tokens: jax.Array,
  tree: Tree,
  key: jax.Array,
  q: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Lossless speculative sampling (module docstring).

  Args:
    logits: [B, N, V] the target's filtered logits at each node (temperature and top-k/p/min-p
      applied, -inf outside): what plain sampling would draw from.
    tokens: [B, N] node tokens (the root's is unused).
    tree: the static tree; with `q`, a chain.
    key: [B] typed PRNG keys, one per row, fresh for this step.
    q: optional [B, N, V] draft probabilities: q[:, i] the distribution node i's token was drawn from.
  Returns (final node [B], bonus token [B]).
  """
  b, n, _ = logits.shape
  probs = jax.nn.softmax(logits, axis=-1)
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(key)
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys[:, 0])
  rows = jnp.arange(b)
  cur = jnp.zeros(b, jnp.int32)
  stopped = jnp.zeros(b, bool)
  last_child = _last_children(tree)
  if q is None:
    # One-hot candidates: the residual at a node is p without the tried tokens; only the tried mass
    # is tracked, and the bonus masks the tried tokens (distinct siblings, as top-k gives).
    tried_mass = jnp.zeros(b, jnp.float32)
    for i in range(1, n):
      parent = tree.parents[i]
      at = (cur == parent) & ~stopped
      px = probs[rows, parent, tokens[:, i]]
      accept = at & (uniforms[:, i] * jnp.maximum(1.0 - tried_mass, 0.0) < px)
      tried_mass = jnp.where(accept, 0.0, jnp.where(at, tried_mass + px, tried_mass))
      cur = jnp.where(accept, i, cur)
      if i in last_child:
        stopped |= (cur == parent) & ~stopped
    children = np.full((n, max(1, max(len(c) for c in tree.children))), -1)
    for parent, kids in enumerate(tree.children):
      children[parent, : len(kids)] = kids
    kids = jnp.asarray(children)[cur]  # [B, C]: the final node's children (all tried if it stopped)
    tried = jnp.where((kids >= 0) & stopped[:, None], tokens[rows[:, None], jnp.maximum(kids, 0)], -1)
    final_logits = logits[rows, cur]
    vocab = jnp.arange(final_logits.shape[-1])
    masked = jnp.any(vocab[None, :, None] == tried[:, None, :], axis=-1)
    final_logits = jnp.where(masked, -jnp.inf, final_logits)
    return cur, jax.vmap(jax.random.categorical)(keys[:, 1], final_logits).astype(jnp.int32)
  if any(len(c) > 1 for c in tree.children):
    raise ValueError("draft distributions (q) are supported for chains only")
  resid = probs[:, 0]
  for i in range(1, n):
    at = ~stopped
    x = tokens[:, i]
    px, qx = resid[rows, x], q[rows, i, x]
    accept = at & (uniforms[:, i] * qx < px)
    reject = at & ~accept
    leftover = jnp.maximum(resid - q[:, i], 0.0)
    total = jnp.sum(leftover, axis=-1, keepdims=True)
    leftover = jnp.where(total > 0, leftover / jnp.where(total > 0, total, 1.0), resid)
    resid = jnp.where(accept[:, None], probs[:, i], jnp.where(reject[:, None], leftover, resid))
    cur = jnp.where(accept, i, cur)
    stopped |= reject
  bonus = jax.vmap(jax.random.categorical)(keys[:, 1], jnp.log(resid)).astype(jnp.int32)
  return cur, bonus


def accept_typical(
  logits: jax.Array, tokens: jax.Array, tree: Tree, key: jax.Array, *, epsilon: float = 0.09, alpha: float = 0.3
) -> tuple[jax.Array, jax.Array]:
  """Medusa's typical acceptance (lossy): same arguments as `accept_sampled` without `q`."""
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
  threshold = jnp.minimum(epsilon, alpha * jnp.exp(-entropy))  # [B, N]
  parents = np.maximum(np.asarray(tree.parents), 0)
  b = tokens.shape[0]
  px = probs[jnp.arange(b)[:, None], parents[None], tokens]  # [B, N]: p_parent(token)
  ok = (px > threshold[:, parents]).at[:, 0].set(True)
  final = _deepest(_path_accepted(ok, tree), tree)
  final_logits = logits[jnp.arange(b), final]
  return final, jax.vmap(jax.random.categorical)(key, final_logits).astype(jnp.int32)
