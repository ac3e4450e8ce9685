"""Static token trees for speculative decoding: `Tree`, `sequoia_tree`, `best_tree`.

A draft proposes several candidates per future position; a token tree arranges them so that one
forward of the target model verifies every path at once (Medusa: Cai et al., "Medusa: Simple LLM
Inference Acceleration Framework with Multiple Decoding Heads", 2024, arXiv 2401.10774; Sequoia:
Chen et al., "Sequoia: Scalable, Robust, and Hardware-aware Speculative Decoding", 2024, arXiv
2402.12374). Node 0 is the root, the last accepted token. A node at depth d >= 1 holds the
`rank`-th most likely candidate (0 = top-1) for position root + d, continuing its parent's path.

With `a[d-1][r]` the probability that the rank-r candidate at depth d is the target's token given
that its parent was accepted (a 1-D `a` is the same for every depth, Sequoia's positional
acceptance vector), and acceptances independent, one verification yields in expectation

    E[tokens] = 1 + sum_{nodes v != root} prod_{u on the path root -> v, u != root} a[depth(u)-1][rank(u)]

(the 1 is the target's own token after the last accepted node: the correction or bonus token).

`sequoia_tree` finds the tree of a given size (and depth bound) maximizing E[tokens] with Sequoia's
dynamic program; `best_tree` picks the size maximizing E[tokens] / step time from measured times.

Canonical order: nodes sorted by (depth, parent index, rank), i.e. breadth first with siblings by
rank, so a tree has exactly one representation (`Tree` rejects any other order; `Tree.from_paths`
builds the canonical tree from paths in any order). For verification, `depth` gives the position
offsets, `ancestors` the attention mask (row = query node) and `paths` the node ids of each path.

>>> from jaxeff.inference.tree import Tree, sequoia_tree
>>> tree = Tree.from_paths([(1,), (0, 0), (0,)])        # Medusa's "medusa_choices" format
>>> tree.parents, tree.ranks
((-1, 0, 0, 1), (0, 0, 1, 0))
>>> tree.ancestors.astype(int)
array([[1, 0, 0, 0],
       [1, 1, 0, 0],
       [1, 0, 1, 0],
       [1, 1, 0, 1]])
>>> round(tree.expected_tokens([0.6, 0.2]), 4)           # 1 + 0.6 + 0.2 + 0.6 * 0.6
2.16
>>> best = sequoia_tree([[0.7, 0.2, 0.05], [0.5, 0.25, 0.1]], size=5)   # depth-dependent acceptance
>>> best.to_paths()
[(0,), (1,), (0, 0), (0, 1)]
>>> round(best.expected_tokens([[0.7, 0.2, 0.05], [0.5, 0.25, 0.1]]), 4)
2.425
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def _readonly(x: np.ndarray) -> np.ndarray:
  # Cached arrays are shared by every caller: a write would corrupt the tree.
  x.flags.writeable = False
  return x


@dataclasses.dataclass(frozen=True)
class Tree:
  """A token tree in canonical order (see the module docstring).

  Attributes:
    parents: parents[0] == -1 (the root); 0 <= parents[i] < i for i > 0.
    ranks: ranks[0] == 0 (unused); node i is the ranks[i]-th candidate (0 = top-1) at its depth.
  """

  parents: tuple[int, ...]
  ranks: tuple[int, ...]

  def __post_init__(self):
    # Accept any int sequences (lists, arrays) but store hashable tuples of Python ints.
    object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
    object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
    parents, ranks = self.parents, self.ranks
    if len(parents) != len(ranks):
      raise ValueError(f"Tree: parents and ranks differ in length ({len(parents)} vs {len(ranks)})")
    if not parents or parents[0] != -1 or ranks[0] != 0:
      raise ValueError(f"Tree: node 0 must be the root with parent -1 and rank 0, got {parents[:1]}, {ranks[:1]}")
    for i in range(1, len(parents)):
      if not 0 <= parents[i] < i:
        raise ValueError(f"Tree: parents[{i}] = {parents[i]}, must be in [0, {i}) (a parent comes before its child)")
      if ranks[i] < 0:
        raise ValueError(f"Tree: ranks[{i}] = {ranks[i]} is negative")
    seen = set()
    for i in range(1, len(parents)):
      if (parents[i], ranks[i]) in seen:
        raise ValueError(f"Tree: node {parents[i]} has two children of rank {ranks[i]}")
      seen.add((parents[i], ranks[i]))
    depth = self.depth
    for i in range(2, len(parents)):
      if (depth[i - 1], parents[i - 1], ranks[i - 1]) > (depth[i], parents[i], ranks[i]):
        raise ValueError(
          f"Tree: nodes {i - 1} and {i} are not in canonical (depth, parent, rank) order; build it with Tree.from_paths"
        )

  @classmethod
  def chain(cls, length: int) -> Tree:
    """The root and `length` top-1 candidates in a line: a single-chain draft."""
    if length < 0:
      raise ValueError(f"Tree.chain: length must be >= 0, got {length}")
    return cls((-1, *range(length)), (0,) * (length + 1))

  @classmethod
  def from_paths(cls, paths: Iterable[Sequence[int]]) -> Tree:
    """The canonical tree holding `paths` (rank tuples from the root, in any order) and their prefixes.

    This is Medusa's "medusa_choices" format: `[(0,), (1,), (0, 0)]` is the root's top-1 and top-2
    candidates and the top-1 continuation of the first. Duplicates and the empty path are ignored.
    """
    nodes = set()
    for path in paths:
      path = tuple(int(r) for r in path)
      if any(r < 0 for r in path):
        raise ValueError(f"Tree.from_paths: negative rank in path {path}")
      nodes.update(path[:k] for k in range(1, len(path) + 1))
    # Sorting rank paths by (length, lexicographic) is the (depth, parent, rank) order: a parent's
    # index order at depth d - 1 is its path's lexicographic order, by induction.
    ordered = [(), *sorted(nodes, key=lambda p: (len(p), p))]
    index = {p: i for i, p in enumerate(ordered)}
    return cls(tuple(index[p[:-1]] if p else -1 for p in ordered), tuple(p[-1] if p else 0 for p in ordered))

  def to_paths(self) -> list[tuple[int, ...]]:
    """The rank path of every non-root node, in canonical order (the inverse of `from_paths`)."""
    rank_paths = [()]
    for i in range(1, self.size):
      rank_paths.append((*rank_paths[self.parents[i]], self.ranks[i]))
    return rank_paths[1:]

  @functools.cached_property
  def size(self) -> int:
    """N, the number of nodes including the root."""
    return len(self.parents)

  @functools.cached_property
  def depth(self) -> np.ndarray:
    """[N] int32: the root is 0, a child one more than its parent (position offset from the root)."""
    depth = np.zeros(self.size, np.int32)
    for i in range(1, self.size):
      depth[i] = depth[self.parents[i]] + 1
    return _readonly(depth)

  @functools.cached_property
  def max_depth(self) -> int:
    return int(self.depth[-1])  # canonical order: the last node is the deepest

  @functools.cached_property
  def ancestors(self) -> np.ndarray:
    """[N, N] bool: [i, j] when j is i or an ancestor of i (the tree attention mask, row = query)."""
    mask = np.eye(self.size, dtype=bool)
    for i in range(1, self.size):
      mask[i] |= mask[self.parents[i]]
    return _readonly(mask)

  @functools.cached_property
  def paths(self) -> np.ndarray:
    """[N, max_depth + 1] int32: row i is the node ids from the root to node i, then -1s."""
    paths = np.full((self.size, self.max_depth + 1), -1, np.int32)
    paths[0, 0] = 0
    for i in range(1, self.size):
      d = self.depth[i]
      paths[i, :d] = paths[self.parents[i], :d]
      paths[i, d] = i
    return _readonly(paths)

  @functools.cached_property
  def children(self) -> tuple[tuple[int, ...], ...]:
    """children[i]: node ids of i's children, by rank (canonical order lists them so)."""
    kids = [[] for _ in range(self.size)]
    for i in range(1, self.size):
      kids[self.parents[i]].append(i)
    return tuple(tuple(k) for k in kids)

  @functools.cached_property
  def leaves(self) -> np.ndarray:
    """int32 ids of the nodes without children, ascending."""
    return _readonly(np.array([i for i, k in enumerate(self.children) if not k], np.int32))

  def expected_tokens(self, acceptance) -> float:
    """E[tokens per verification] = 1 + sum over non-root nodes of the product of acceptance along the path.

    Args:
      acceptance: [max_depth, ranks] (row d-1 for depth d) or [ranks] (every depth) probabilities.
    """
    a = _acceptance(acceptance)
    if a.ndim == 2 and self.max_depth > a.shape[0]:
      raise ValueError(f"expected_tokens: the tree has depth {self.max_depth}, acceptance covers {a.shape[0]}")
    if self.size > 1 and max(self.ranks) >= a.shape[-1]:
      raise ValueError(f"expected_tokens: the tree uses rank {max(self.ranks)}, acceptance covers {a.shape[-1]}")
    reach = np.ones(self.size)
    for i in range(1, self.size):
      reach[i] = reach[self.parents[i]] * _row(a, int(self.depth[i]))[self.ranks[i]]
    return float(reach.sum())


def _acceptance(acceptance) -> np.ndarray:
  a = np.asarray(acceptance, dtype=np.float64)
  if a.ndim not in (1, 2) or a.size == 0:
    raise ValueError(f"acceptance must be a non-empty [ranks] or [depths, ranks] array, got shape {a.shape}")
  if not np.all((a >= 0) & (a <= 1)):  # also rejects NaN
    raise ValueError("acceptance must hold probabilities in [0, 1]")
  return a


def _row(a: np.ndarray, depth: int) -> np.ndarray:
  return a[depth - 1] if a.ndim == 2 else a


@dataclasses.dataclass(frozen=True)
class _Sequoia:
  value: np.ndarray  # [size + 1]: best E[tokens] with n nodes, -inf where no tree of n nodes fits
  choice: dict  # (depth, rank) -> [size + 1]: subtree size of that rank's child, given m nodes for ranks >= it

  def tree(self, n: int) -> Tree:
    paths, stack = [], [((), n)]
    while stack:
      prefix, n = stack.pop()
      m, r = n - 1, 0
      while m > 0:
        s = int(self.choice[len(prefix), r][m])
        paths.append((*prefix, r))
        stack.append(((*prefix, r), s))
        m, r = m - s, r + 1
    return Tree.from_paths(paths)

  def largest_fitting(self, size: int) -> int:
    return int(np.flatnonzero(np.isfinite(self.value[: size + 1]))[-1])


def _sequoia(acceptance, size: int, max_depth: int | None) -> _Sequoia:
  """Sequoia's dynamic program (sec. 3.1), over (subtree size, depth) with the child ranks as a third index.

  T(n, d): best sum, over a subtree of n nodes whose top node is at depth d, of each node's
  acceptance product relative to the top node (the top node counts 1). The top node's children are
  ranks 0..k-1 (with acceptance non-increasing in rank the lowest ranks are best):
    G(m, d, r) = max_{1 <= s <= m} a[d][r] * T(s, d + 1) + G(m - s, d, r + 1),  G(0, d, r) = 0,
    T(n, d) = 1 + G(n - 1, d, 0),  and E[tokens] of the best n-node tree is T(n, 0).
  """
  a = _acceptance(acceptance)
  if size < 1:
    raise ValueError(f"size must be >= 1 (the root), got {size}")
  if max_depth is not None and max_depth < 0:
    raise ValueError(f"max_depth must be >= 0, got {max_depth}")
  cap = size - 1  # an n-node tree is never deeper than n - 1
  if a.ndim == 2:
    cap = min(cap, a.shape[0])
  if max_depth is not None:
    cap = min(cap, max_depth)
  n_ranks = min(a.shape[-1], size - 1)
  sizes = np.arange(size + 1)
  m, s = sizes[:, None], sizes[None, :]
  valid = (s >= 1) & (s <= m)
  rest = np.where(valid, m - s, 0)
  value = np.full(size + 1, -np.inf)
  value[1] = 1.0  # at the depth cap a subtree is its top node alone
  choice = {}
  for d in range(cap - 1, -1, -1):
    row = _row(a, d + 1)
    g = np.full(size + 1, -np.inf)
    g[0] = 0.0
    for r in range(n_ranks - 1, -1, -1):
      gain = np.where(np.isfinite(value), row[r] * value, -np.inf)  # 0 * -inf would be NaN
      cand = np.where(valid, gain[s] + g[rest], -np.inf)
      # Ties go to the largest subtree for the lower rank: deterministic, and deep on the likely path.
      best = size - np.argmax(cand[:, ::-1], axis=1)
      g = np.where(sizes == 0, 0.0, cand[sizes, best])
      choice[d, r] = np.where(sizes == 0, 0, best)
    value = np.concatenate([[-np.inf], 1.0 + g[:-1]])
  return _Sequoia(value, choice)


def sequoia_tree(acceptance, size: int, max_depth: int | None = None) -> Tree:
  """The tree of `size` nodes (with the root) and depth <= `max_depth` maximizing `expected_tokens`.

  Sequoia's dynamic program (Chen et al. 2024, sec. 3.1). Each node's children take ranks 0..k-1,
  optimal when acceptance is non-increasing in rank. A depth-dependent table bounds the depth by
  its rows; if the table's depths and ranks cannot hold `size` nodes, the largest tree that fits.

  Args:
    acceptance: [depths, ranks] (row d-1 for depth d) or [ranks] (every depth) probabilities.
    size: nodes including the root.
    max_depth: deepest allowed node (None: only the table bounds it).
  """
  dp = _sequoia(acceptance, size, max_depth)
  return dp.tree(dp.largest_fitting(size))


def best_tree(acceptance, step_seconds: Mapping[int, float], max_depth: int | None = None) -> Tree:
  """Hardware-aware size (Sequoia): the `sequoia_tree` maximizing expected_tokens / step_seconds[size].

  Args:
    acceptance: as for `sequoia_tree`.
    step_seconds: tree size -> measured seconds of one verification step with that many tree tokens.
    max_depth: as for `sequoia_tree`.

  Ties go to the smaller size. A size the table cannot fill is scored with the tree that fits, at that size's time.
  """
  if not step_seconds:
    raise ValueError("best_tree: step_seconds is empty")
  for k, t in step_seconds.items():
    if int(k) != k or k < 1 or not t > 0 or not np.isfinite(t):
      raise ValueError(f"best_tree: step_seconds needs sizes >= 1 and positive finite times, got {k}: {t}")
  # One DP at the largest size answers every smaller size too (its T(n, 0) is the n-node optimum).
  dp = _sequoia(acceptance, int(max(step_seconds)), max_depth)
  best_n, best_rate = None, -np.inf
  for k in sorted(step_seconds):
    n = dp.largest_fitting(int(k))
    rate = dp.value[n] / step_seconds[k]
    if rate > best_rate:
      best_n, best_rate = n, rate
  return dp.tree(best_n)
