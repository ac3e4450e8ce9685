"""Speculative decoding is lossless: greedy output with every speculator == plain greedy (tiny
models and SmolLM2, f32), sampled output keeps the target's distribution (chi-square), tree
verification == verifying each path on its own, and the accepted path's cache entries are
compacted so later tokens stay exact."""

import collections
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from smollm2 import smollm2_path

import jaxeff.gguf
from jaxeff.config import ModelConfig
from jaxeff.generate import GenerationError, Generator, SamplingParams
from jaxeff.generate.speculative import DraftModel, Medusa, PromptLookup, SelfDraft, Speculator, Tree
from jaxeff.generate.speculative.lookup import lookup_draft
from jaxeff.generate.speculative.medusa_heads import MedusaHeads
from jaxeff.inference.cache import Dense, Paged, TreeSlots
from jaxeff.inference.verify import accept_greedy
from jaxeff.models import Llama
from jaxeff.models.attention import index_positions

# Peaked logits (larger init): greedy comparisons have no near-ties.
CFG = ModelConfig(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=128,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  initializer_range=0.15,
)
# Ragged, with repeats for the lookup to find.
PROMPTS = [[5, 17, 3, 88, 41, 5, 17, 3, 88, 41, 5, 17], [7, 8], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]]
NEW = 24
SEQ = 64


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def plain(model):
  return Generator(model, max_batch=4, max_seq_len=SEQ).generate(PROMPTS, max_new_tokens=NEW)


def random_heads(num_heads, scale=0.3, seed=3):
  heads = MedusaHeads(CFG.hidden_size, num_heads=num_heads, rngs=nnx.Rngs(0))
  state = nnx.state(heads)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(heads, jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves)]))
  return heads


MEDUSA_TREE = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])

SPECULATORS = {
  "lookup": lambda model: PromptLookup(max_ngram=3, num_draft=6),
  "self": lambda model: SelfDraft(layers=1, num_draft=3),
  "draft_other": lambda model: DraftModel(Llama(CFG, rngs=nnx.Rngs(7)), num_draft=3),
  "medusa_chain": lambda model: Medusa(random_heads(3)),
  "medusa_tree": lambda model: Medusa(random_heads(3), tree=MEDUSA_TREE),
}


@pytest.mark.parametrize("name", list(SPECULATORS))
def test_greedy_equals_plain_greedy(model, plain, name):
  gen = Generator(model, max_batch=4, max_seq_len=SEQ, speculator=SPECULATORS[name](model))
  assert gen.generate(PROMPTS, max_new_tokens=NEW) == plain
  stats = gen.stats
  assert stats.new_tokens == sum(map(len, plain))
  assert sum(stats.accepted_histogram.values()) >= stats.target_forwards  # one entry per live row per forward
  assert max(stats.accepted_histogram) <= gen.speculator.tree.max_depth
  assert 0 <= stats.draft_share <= 1
  # Each program compiled once, and a second call compiles nothing.
  traced = dict(gen.traces)
  assert gen.generate(PROMPTS, max_new_tokens=NEW) == plain
  assert dict(gen.traces) == traced and all(v == 1 for v in traced.values())


def test_a_token_tree_through_the_paged_cache_equals_plain_greedy(model, plain):
  """Tree verification writes the nodes to logical slots of the rows' blocks and moves the
  accepted path into place through the block tables (`Paged.move`)."""
  speculator = Medusa(random_heads(3), tree=MEDUSA_TREE)
  gen = Generator(model, max_batch=4, max_seq_len=SEQ, speculator=speculator, kv_cache=Paged(block_size=4))
  assert gen.generate(PROMPTS, max_new_tokens=NEW) == plain
  assert gen.stats.accepted_histogram.keys() - {0}  # some drafts were accepted (moved into place)


def test_typical_acceptance_is_greedy_at_temperature_zero_and_samples_otherwise(model, plain):
  gen = Generator(model, max_batch=4, max_seq_len=SEQ, speculator=Medusa(random_heads(3), typical=True))
  assert gen.generate(PROMPTS, max_new_tokens=NEW) == plain
  out = gen.generate(PROMPTS, max_new_tokens=NEW, temperature=0.7, seed=1)
  assert [len(o) for o in out] == [NEW] * 3 and all(0 <= t < CFG.vocab_size for o in out for t in o)
  assert ("verify", 4, None, SamplingParams(0.7).static, "typical") in gen.traces


def test_draft_equal_to_target_accepts_everything(model, plain):
  gen = Generator(model, max_batch=4, max_seq_len=SEQ, speculator=DraftModel(model, num_draft=4))
  assert gen.generate(PROMPTS, max_new_tokens=NEW) == plain
  # Every row accepts all 4 drafts in every verification but the ones its token budget cuts short.
  hist = gen.stats.accepted_histogram
  assert set(hist) == {4} and gen.stats.tokens_per_forward == 5.0
  assert gen.stats.target_forwards == -(-(NEW - 1) // 5)


def test_lookup_finds_repeats_and_stream_matches(model, plain):
  gen = Generator(model, max_batch=4, max_seq_len=SEQ, speculator=PromptLookup(num_draft=6))
  steps = list(gen.stream(PROMPTS, max_new_tokens=NEW))
  assert [[s[i] for s in steps if s[i] is not None] for i in range(len(PROMPTS))] == plain
  assert len(steps) == NEW  # one token per row per step, as plain streaming
  stop = plain[0][5]
  cut = [row[: row.index(stop)] if stop in row else row for row in plain]
  assert gen.generate(PROMPTS, max_new_tokens=NEW, stop_tokens=[stop]) == cut


def numpy_lookup(h, t, max_ngram, num_draft):
  """The lookup draft from tokens h[0..t] (the text up to the root at t), in plain Python."""
  for size in range(max_ngram, 0, -1):
    ends = [j for j in range(size - 1, t) if h[j - size + 1 : j + 1] == h[t - size + 1 : t + 1]]
    if ends and t - size + 1 >= 0:
      j = max(ends)
      return [h[j + 1 + i % (t - j)] for i in range(num_draft)], size
  return [h[t]] * num_draft, 0


def test_lookup_acceptance_matches_a_simulation(model):
  """Greedy text is known in advance, so how many drafts each step accepts is too: replaying the
  lookup on the plain output must give exactly the measured histogram (and some acceptance)."""
  new = 48
  plain = Generator(model, max_batch=1, max_seq_len=128).generate([PROMPTS[0]], max_new_tokens=new)[0]
  truth = PROMPTS[0] + plain
  gen = Generator(model, max_batch=1, max_seq_len=128, speculator=PromptLookup(max_ngram=3, num_draft=6))
  assert gen.generate([PROMPTS[0]], max_new_tokens=new) == [plain]
  want = collections.Counter()
  pos, count = len(PROMPTS[0]), 1
  while count < new:
    draft, _ = numpy_lookup(truth, pos, 3, 6)
    accepted = next((i for i, tok in enumerate(draft) if pos + 1 + i >= len(truth) or tok != truth[pos + 1 + i]), 6)
    want[accepted] += 1
    pos, count = pos + accepted + 1, count + accepted + 1
  assert gen.stats.accepted_histogram == want
  assert sum(k * v for k, v in want.items()) > 0


def test_lookup_draft_against_numpy():
  rng = np.random.default_rng(0)
  for _ in range(50):
    t = int(rng.integers(4, 30))
    history = rng.integers(0, 4, (1, 40)).astype(np.int32)
    got, n = lookup_draft(jnp.asarray(history), jnp.asarray([t]), max_ngram=3, num_draft=5)
    want, want_n = numpy_lookup(history[0, : t + 1].tolist(), t, 3, 5)
    assert int(n[0]) == want_n and got[0].tolist() == want


class Oracle(Speculator):
  """Places the true continuation at chosen nodes of a tree (others: a wrong token), so the
  accepted path is known and lies off the slot order: a wrong cache compaction shows later."""

  name = "oracle"

  def __init__(self, tree, truth, good_nodes):
    self.tree, self.truth, self.good = tree, truth, set(good_nodes)

  def draft(self, target, target_cache, params, cache, ctx, sampling, values):
    truth = jnp.asarray(self.truth)  # [B, T] the plain greedy sequence by position
    cols = []
    for i in range(1, self.tree.size):
      tok = jnp.take_along_axis(truth, (ctx.pos + int(self.tree.depth[i]))[:, None], axis=1)[:, 0]
      cols.append(tok if i in self.good else (tok + 1) % CFG.vocab_size)
    return jnp.stack(cols, axis=1), None, target_cache, cache


def test_tree_accepts_the_true_path_and_compacts_the_cache(model, plain):
  tree = Tree.from_paths([(0,), (1,), (0, 0), (1, 0), (1, 1), (1, 1, 0)])
  # Good path: node 2 (depth 1, rank 1) -> node 5 (rank 1 under it) -> node 6: slots 2, 5, 6, not 1, 2, 3.
  path = [2, 5, 6]
  assert [int(tree.depth[i]) for i in path] == [1, 2, 3] and tree.parents[5] == 2 and tree.parents[6] == 5
  truth = np.zeros((4, SEQ), np.int32)
  for i, (p, new) in enumerate(zip(PROMPTS, plain)):
    truth[i, : len(p) + len(new)] = p + new
  gen = Generator(model, max_batch=4, max_seq_len=SEQ, speculator=Oracle(tree, truth, path))
  assert gen.generate(PROMPTS, max_new_tokens=NEW) == plain
  assert set(gen.stats.accepted_histogram) == {3}


def test_tree_verification_equals_each_path_alone(model):
  """The tree forward's logits at every node == a chain forward along that node's path, and the
  greedy acceptance == the longest path a sequential check accepts."""
  tree = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)])
  rng = np.random.default_rng(1)
  prompt = np.asarray([PROMPTS[2]], np.int32)
  forward = nnx.jit(lambda m, t, p, c, tree=None: m.forward_with_cache(t, p, c, tree=tree))
  _, cache = forward(model, prompt, index_positions(*prompt.shape), Dense().init(CFG, 1, SEQ))
  pos = prompt.shape[1]
  root = int(rng.integers(CFG.vocab_size))
  tokens = np.concatenate([[root], rng.integers(0, CFG.vocab_size, tree.size - 1)]).astype(np.int32)[None]
  positions = (pos + tree.depth)[None].astype(np.int32)
  slots = TreeSlots(jnp.asarray([pos]), jnp.asarray(tree.ancestors))
  x, _ = forward(model, tokens, positions, jax.tree.map(jnp.copy, cache), tree=slots)
  tree_logits = np.asarray(model.logits(x))[0]
  for leaf in tree.leaves:
    nodes = [int(n) for n in tree.paths[leaf] if n >= 0]
    chain_tokens = tokens[:, nodes]
    xc, _ = forward(model, chain_tokens, pos + np.arange(len(nodes))[None], jax.tree.map(jnp.copy, cache))
    np.testing.assert_allclose(tree_logits[nodes], np.asarray(model.logits(xc))[0], atol=1e-4, rtol=1e-4)
  # Make one path acceptable: each node on it the argmax after its parent.
  argmax = lambda lg: int(np.argmax(lg))
  good = tokens.copy()
  for n in (1, 4, 7):  # (0,), (0, 1), (0, 1, 0)
    hidden = forward(model, good, positions, jax.tree.map(jnp.copy, cache), tree=slots)[0]
    good[0, n] = argmax(np.asarray(model.logits(hidden))[0, tree.parents[n]])
  x, _ = forward(model, good, positions, jax.tree.map(jnp.copy, cache), tree=slots)
  final, bonus = accept_greedy(model.logits(x), jnp.asarray(good), tree)
  longest = (0, 0)
  for leaf in tree.leaves:
    nodes = [int(n) for n in tree.paths[leaf] if n >= 0]
    xc, _ = forward(model, good[:, nodes], pos + np.arange(len(nodes))[None], jax.tree.map(jnp.copy, cache))
    target = np.argmax(np.asarray(model.logits(xc))[0], axis=-1)
    accepted = next((i for i in range(1, len(nodes)) if good[0, nodes[i]] != target[i - 1]), len(nodes)) - 1
    longest = max(longest, (accepted, nodes[accepted]))
  assert (int(final[0]), int(tree.depth[int(final[0])])) == (7, 3) == (longest[1], longest[0])
  assert int(bonus[0]) == argmax(np.asarray(model.logits(x))[0, 7])


# ---------------------------------------------------------------- sampling keeps the distribution

SMALL = ModelConfig(
  vocab_size=6, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, initializer_range=0.5
)
SAMPLES = 1024


def exact_distribution(model, prompt, steps):
  """P(tokens at new positions 1..steps) by enumeration with full forwards: {sequence: prob}."""
  v = SMALL.vocab_size
  seqs = np.asarray(list(itertools.product(range(v), repeat=steps)), np.int32)
  full = np.concatenate([np.broadcast_to(prompt, (len(seqs), len(prompt))), seqs], axis=1)
  probs = np.asarray(jax.nn.softmax(nnx.jit(lambda m, t: m(t))(model, full), axis=-1))
  out = np.ones(len(seqs))
  for s in range(steps):
    out *= probs[np.arange(len(seqs)), len(prompt) - 1 + s, seqs[:, s]].astype(np.float64)
  out /= out.sum()  # f32 softmax rounding
  return {tuple(s): p for s, p in zip(seqs.tolist(), out)}


TREE_SMALL = Tree.from_paths([(0,), (1,), (2,), (0, 0), (1, 0)])
SMALL_SPECULATORS = {
  "lookup": lambda: PromptLookup(max_ngram=2, num_draft=3),
  "draft": lambda: DraftModel(Llama(SMALL, rngs=nnx.Rngs(1)), num_draft=3),
  "medusa_tree": lambda: Medusa(MedusaHeads(SMALL.hidden_size, num_heads=2, rngs=nnx.Rngs(0)), tree=TREE_SMALL),
}
SMALL_PROMPT = [1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def small_target():
  target = Llama(SMALL, rngs=nnx.Rngs(0))
  return target, exact_distribution(target, np.asarray(SMALL_PROMPT, np.int32), 3)


@functools.cache
def small_generator(target, name):
  return Generator(target, max_batch=128, max_seq_len=16, speculator=SMALL_SPECULATORS[name]())


def chi_square_p(out, exact) -> float:
  """p-value of the observed 3-token sequences against the exact distribution (cells with an
  expectation under 5 pooled, so the chi-square approximation holds)."""
  counts = collections.Counter(tuple(o) for o in out)
  n = len(out)
  cells = [(p * n, counts.get(seq, 0)) for seq, p in exact.items() if p * n >= 5]
  cells.append((n - sum(e for e, _ in cells), n - sum(o for _, o in cells)))
  expected, observed = zip(*cells)
  return scipy.stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("name", list(SMALL_SPECULATORS))
def test_sampling_preserves_the_target_distribution(small_target, name):
  target, exact = small_target
  gen = small_generator(target, name)
  out = gen.generate([SMALL_PROMPT] * SAMPLES, max_new_tokens=3, temperature=1.0, seed=list(range(SAMPLES)))
  assert gen.stats.tokens_per_forward > 1.3  # drafts were accepted (and rejected: the rule ran both ways)
  assert chi_square_p(out, exact) > 1e-3


def test_sampling_check_can_fail(small_target):
  """The same check rejects a sampler that is off: the same speculator at temperature 0.7."""
  target, exact = small_target
  gen = small_generator(target, "lookup")
  out = gen.generate([SMALL_PROMPT] * SAMPLES, max_new_tokens=3, temperature=0.7, seed=list(range(SAMPLES)))
  assert chi_square_p(out, exact) < 1e-3


# ---------------------------------------------------------------- errors


def test_bad_speculator_settings(model):
  with pytest.raises(GenerationError, match="lookahead of 6.*at most 16 new tokens fit"):
    Generator(model, max_batch=1, max_seq_len=32, speculator=PromptLookup(num_draft=6)).generate(
      [[1] * 10], max_new_tokens=20
    )
  with pytest.raises(GenerationError, match="fewer layers"):
    Generator(model, max_batch=1, max_seq_len=32, speculator=SelfDraft(layers=3))
  other = Llama(ModelConfig(**{**CFG.__dict__, "vocab_size": 50}), rngs=nnx.Rngs(0))
  with pytest.raises(GenerationError, match="vocabulary"):
    Generator(model, max_batch=1, max_seq_len=32, speculator=DraftModel(other))
  with pytest.raises(GenerationError, match="only 3 heads"):
    Medusa(random_heads(3), tree=Tree.chain(4))
  with pytest.raises(GenerationError, match="num_draft"):
    PromptLookup(num_draft=0)


def test_tree_needs_an_attention_that_takes_a_mask():
  sparse = Llama(ModelConfig(**{**CFG.__dict__, "attention": "sparse"}), rngs=nnx.Rngs(0))
  gen = Generator(sparse, max_batch=1, max_seq_len=SEQ, speculator=Medusa(random_heads(3), tree=MEDUSA_TREE))
  with pytest.raises(ValueError, match="needs an attention with mask"):
    gen.generate([PROMPTS[1]], max_new_tokens=4)


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2():
  model, _ = jaxeff.load(smollm2_path(), scan_layers=True)
  tokenizer = jaxeff.gguf.tokenizer(smollm2_path())
  return model, tokenizer


@pytest.mark.slow
@pytest.mark.usefixtures("runtime_bound")
def test_smollm2_greedy_is_exact_with_a_self_draft(smollm2):
  """The real model (stacked layers: the self-draft runs a slice of them) in f32."""
  model, tokenizer = smollm2
  prompts = [tokenizer.encode("The capital of France is").ids, tokenizer.encode("def add(a, b):\n    return").ids]
  plain = Generator(model, max_batch=2, max_seq_len=64).generate(prompts, max_new_tokens=16)
  gen = Generator(model, max_batch=2, max_seq_len=64, speculator=SelfDraft(layers=10, num_draft=2))
  assert gen.generate(prompts, max_new_tokens=16) == plain
  assert gen.stats.target_forwards <= 15
