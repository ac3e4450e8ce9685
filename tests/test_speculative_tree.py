"""jaxeff.inference.tree: the Tree's structure and validation, E[tokens], and Sequoia's DP
against a brute-force search over every small tree."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jaxeff.inference.tree import Tree, best_tree, sequoia_tree

# Canonical ids: 0 root, 1 (0,), 2 (1,), 3 (0, 0), 4 (0, 1), 5 (1, 0), 6 (0, 0, 0).
PATHS = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
PARENTS = (-1, 0, 0, 1, 1, 2, 3)
RANKS = (0, 0, 1, 0, 1, 0, 0)


def test_properties_of_a_hand_built_tree():
  t = Tree(PARENTS, RANKS)
  assert t.size == 7 and t.max_depth == 3
  np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 2, 2, 3])
  assert t.depth.dtype == np.int32 and t.paths.dtype == np.int32 and t.ancestors.dtype == bool
  expected_mask = np.array(
    [
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0],
      [1, 1, 0, 1, 0, 0, 0],
      [1, 1, 0, 0, 1, 0, 0],
      [1, 0, 1, 0, 0, 1, 0],
      [1, 1, 0, 1, 0, 0, 1],
    ],
    bool,
  )
  np.testing.assert_array_equal(t.ancestors, expected_mask)
  np.testing.assert_array_equal(
    t.paths,
    [[0, -1, -1, -1], [0, 1, -1, -1], [0, 2, -1, -1], [0, 1, 3, -1], [0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]],
  )
  assert t.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())
  np.testing.assert_array_equal(t.leaves, [4, 5, 6])
  assert t.leaves.dtype == np.int32


def test_cached_arrays_are_read_only_and_lists_are_accepted():
  t = Tree(list(PARENTS), np.array(RANKS))
  assert t == Tree(PARENTS, RANKS) and hash(t) == hash(Tree(PARENTS, RANKS))
  assert type(t.parents) is tuple and all(type(p) is int for p in t.parents)
  for arr in (t.depth, t.ancestors, t.paths, t.leaves):
    with pytest.raises(ValueError):
      arr[0] = 1


def test_from_paths_round_trip_and_canonicalizes_any_order():
  t = Tree.from_paths(PATHS)
  assert (t.parents, t.ranks) == (PARENTS, RANKS)
  assert t.to_paths() == PATHS
  rng = np.random.default_rng(0)
  for _ in range(5):
    shuffled = [PATHS[i] for i in rng.permutation(len(PATHS))]
    assert Tree.from_paths(shuffled) == t
  # Missing prefixes are added; duplicates, the empty path and list input are fine.
  assert Tree.from_paths([[0, 0, 0], (1, 0), (0, 1), (0, 0, 0), ()]) == t
  assert Tree.from_paths([]) == Tree.chain(0) == Tree((-1,), (0,))
  # A gap in the ranks is kept as given (rank 2 without rank 1).
  gap = Tree.from_paths([(2,), (0,)])
  assert (gap.parents, gap.ranks, gap.to_paths()) == ((-1, 0, 0), (0, 0, 2), [(0,), (2,)])


def test_chain():
  t = Tree.chain(4)
  assert t.parents == (-1, 0, 1, 2, 3) and t.ranks == (0,) * 5
  assert t.to_paths() == [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]
  assert t.max_depth == 4 and t.children[4] == () and list(t.leaves) == [4]
  np.testing.assert_array_equal(t.ancestors, np.tril(np.ones((5, 5), bool)))


@pytest.mark.parametrize(
  "parents, ranks, match",
  [
    ((-1, 0), (0,), "differ in length"),
    ((), (), "root"),
    ((0, 0), (0, 0), "root"),
    ((-1, 0), (1, 0), "root"),
    ((-1, 1), (0, 0), r"parents\[1\] = 1"),
    ((-1, 0, -1), (0, 0, 1), r"parents\[2\] = -1"),
    ((-1, 0), (0, -1), "negative"),
    ((-1, 0, 0), (0, 1, 1), "two children of rank 1"),
    ((-1, 0, 0), (0, 1, 0), "canonical"),  # siblings out of rank order
    ((-1, 0, 1, 0), (0, 0, 0, 1), "canonical"),  # depth 2 before depth 1
    ((-1, 0, 0, 2, 1), (0, 0, 1, 0, 0), "canonical"),  # cousins out of parent order
  ],
)
def test_validation_errors(parents, ranks, match):
  with pytest.raises(ValueError, match=match):
    Tree(parents, ranks)


def test_other_errors():
  with pytest.raises(ValueError, match="negative rank"):
    Tree.from_paths([(0, -1)])
  with pytest.raises(ValueError, match="length"):
    Tree.chain(-1)
  t = Tree.from_paths(PATHS)
  with pytest.raises(ValueError, match="depth 3"):
    t.expected_tokens([[0.5, 0.5], [0.5, 0.5]])
  with pytest.raises(ValueError, match="rank 1"):
    t.expected_tokens([0.5])
  for bad in ([], [[[0.5]]], [1.5], [0.5, np.nan], [-0.1]):
    with pytest.raises(ValueError, match="acceptance"):
      t.expected_tokens(bad)
  with pytest.raises(ValueError, match="size"):
    sequoia_tree([0.5], 0)
  with pytest.raises(ValueError, match="max_depth"):
    sequoia_tree([0.5], 3, max_depth=-1)
  for costs in ({}, {0: 1.0}, {4: 0.0}, {4: -1.0}, {4: math.inf}, {2.5: 1.0}):
    with pytest.raises(ValueError, match="step_seconds"):
      best_tree([0.5], costs)


def test_expected_tokens_by_hand():
  t = Tree.from_paths(PATHS)
  # Nodes 1..6: 0.6, 0.3, 0.6*0.6, 0.6*0.3, 0.3*0.6, 0.6*0.6*0.6.
  assert t.expected_tokens([0.6, 0.3, 0.1]) == pytest.approx(1 + 0.6 + 0.3 + 0.36 + 0.18 + 0.18 + 0.216)
  depthwise = [[0.8, 0.1], [0.5, 0.2], [0.4, 0.1]]
  # 0.8, 0.1, 0.8*0.5, 0.8*0.2, 0.1*0.5, 0.8*0.5*0.4.
  assert t.expected_tokens(depthwise) == pytest.approx(1 + 0.8 + 0.1 + 0.4 + 0.16 + 0.05 + 0.16)
  assert Tree.chain(0).expected_tokens([0.5]) == 1.0
  assert Tree.chain(3).expected_tokens([0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def _brute_force(acceptance, max_size, max_depth):
  """Best E[tokens] for every size <= max_size over all prefix-closed trees whose children use any
  distinct ranks < the table's width, depth <= max_depth (rows bound it for a 2-D table)."""
  a = np.asarray(acceptance, float)
  n_ranks = a.shape[-1]
  if a.ndim == 2:
    max_depth = min(max_depth, a.shape[0])
  candidates = sorted(
    (p for d in range(1, max_depth + 1) for p in itertools.product(range(n_ranks), repeat=d)),
    key=lambda p: (len(p), p),
  )
  # Each prefix-closed set is built once: nodes added in increasing canonical order, parent first.
  reach = {(): 1.0}
  best = {}

  def grow(last, total):
    n = len(reach)
    best[n] = max(best.get(n, -1.0), total)
    if n == max_size:
      return
    for i in range(last + 1, len(candidates)):
      p = candidates[i]
      if p[:-1] in reach:
        r = reach[p[:-1]] * (a[len(p) - 1] if a.ndim == 2 else a)[p[-1]]
        reach[p] = r
        grow(i, total + r)
        del reach[p]

  grow(-1, 1.0)
  return best


def _decreasing(rng, shape):
  return -np.sort(-rng.uniform(0.0, 1.0, shape), axis=-1) * rng.uniform(0.3, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_sequoia_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  tables = [
    (_decreasing(rng, 3), 4),  # positional vector, depth bounded by max_depth
    (_decreasing(rng, 2), 4),
    (_decreasing(rng, (3, 3)), 4),  # depth-dependent: the rows bound the depth
    (_decreasing(rng, (4, 2)), 4),
  ]
  for a, max_depth in tables:
    best = _brute_force(a, 7, max_depth)
    for size in range(1, 8):
      t = sequoia_tree(a, size, max_depth=max_depth)
      assert t.size == size and t.max_depth <= max_depth
      assert t.expected_tokens(a) == pytest.approx(best[size], rel=1e-12), (seed, a, size)
      assert t == sequoia_tree(a, size, max_depth=max_depth)  # deterministic


def test_sequoia_beats_chain_and_star():
  rng = np.random.default_rng(7)
  for _ in range(5):
    a = _decreasing(rng, 8)
    for size in range(2, 10):
      t = sequoia_tree(a, size)
      star = Tree.from_paths([(r,) for r in range(size - 1)])
      value = t.expected_tokens(a)
      assert value >= Tree.chain(size - 1).expected_tokens(a) - 1e-12
      assert value >= star.expected_tokens(a) - 1e-12
  # The extremes: one likely candidate -> a chain; flat, unlikely candidates -> a star.
  assert sequoia_tree([0.9, 0.05], 6) == Tree.chain(5)
  assert sequoia_tree([0.1] * 8, 6) == Tree.from_paths([(r,) for r in range(5)])


def test_sequoia_respects_max_depth_and_the_table():
  a = [0.9, 0.5, 0.3, 0.2]
  unbounded = sequoia_tree(a, 20)
  assert unbounded.max_depth > 3
  for d in (2, 3):  # 4 ranks: 21 nodes fit in depth 2
    t = sequoia_tree(a, 20, max_depth=d)
    assert t.size == 20 and t.max_depth == d
    assert t.expected_tokens(a) <= unbounded.expected_tokens(a)
  assert sequoia_tree(a, 20, max_depth=1) == Tree.from_paths([(r,) for r in range(4)])  # only 5 fit
  assert sequoia_tree(a, 20, max_depth=0) == Tree.chain(0)
  # When the table cannot hold `size` nodes: the largest tree that fits.
  assert sequoia_tree([[0.5, 0.2]], 5) == Tree.from_paths([(0,), (1,)])
  assert sequoia_tree([0.7], 10, max_depth=3) == Tree.chain(3)
  assert sequoia_tree([[0.7, 0.3], [0.6, 0.2]], 100).size == 7  # the full binary tree of depth 2


def test_best_tree_maximizes_tokens_per_second():
  a = [0.7, 0.15, 0.08, 0.04]
  value = {n: sequoia_tree(a, n).expected_tokens(a) for n in (2, 4, 8, 16, 32)}
  # Made-up step times: flat up to 8 tokens, then memory-bound growth.
  costs = {2: 1.0, 4: 1.0, 8: 1.02, 16: 1.5, 32: 2.8}
  ratio = {n: value[n] / costs[n] for n in costs}
  want = max(ratio, key=ratio.get)
  assert want == 8  # the table is made so the answer is neither end
  assert best_tree(a, costs) == sequoia_tree(a, want)
  # Free large trees -> the largest; very expensive ones -> the smallest.
  assert best_tree(a, {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0, 32: 1.0}) == sequoia_tree(a, 32)
  assert best_tree(a, {2: 1.0, 4: 10.0, 32: 100.0}) == sequoia_tree(a, 2)
  # A depth bound is passed on.
  assert best_tree(a, costs, max_depth=2) == sequoia_tree(a, 8, max_depth=2)
