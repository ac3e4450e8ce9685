"""The server's engine with every speculator: each request gets under concurrency exactly what it
gets alone, greedy requests what plain greedy decoding gives (speculation is lossless), and the
per-request speculation statistics show drafts being accepted."""

import jax
import pytest
from flax import nnx
from serving import tiny_model
from serving_exactness import MAX_TOKENS, SETTINGS, alone, prompts, together

from jaxeff.generate import Generator
from jaxeff.generate.speculative import DraftModel, Medusa, PromptLookup, SelfDraft, Tree
from jaxeff.generate.speculative.medusa_heads import MedusaHeads
from jaxeff.serve import Engine


def random_heads(hidden, num_heads=2, scale=0.3):
  heads = MedusaHeads(hidden, num_heads=num_heads, rngs=nnx.Rngs(0))
  leaves, treedef = jax.tree.flatten(nnx.state(heads))
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(heads, jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves)]))
  return heads


SPECULATORS = {
  "lookup": lambda model: PromptLookup(max_ngram=3, num_draft=4),
  "self": lambda model: SelfDraft(layers=1, num_draft=2),
  "draft": lambda model: DraftModel(model, num_draft=3),  # the target itself: every draft is accepted
  "medusa_tree": lambda model: Medusa(
    random_heads(model.cfg.hidden_size), tree=Tree.from_paths([(0,), (1,), (0, 0), (1, 0)])
  ),
}


@pytest.fixture(scope="module")
def model():
  return tiny_model(initializer_range=0.1)


@pytest.fixture(scope="module")
def plain(model):
  gen = Generator(model, max_batch=1, max_seq_len=64)
  return [gen.generate([p], max_new_tokens=n)[0] for p, n in zip(prompts(), MAX_TOKENS)]


@pytest.mark.parametrize("name", list(SPECULATORS))
def test_speculation_is_exact_under_concurrency(model, plain, name):
  speculator = SPECULATORS[name](model)
  with Engine(model, max_batch=2, max_seq_len=64, prefill_chunk=16, min_kv_bucket=64, speculator=speculator) as e:
    first = alone(e, prompts())
    forwards = e.totals.decode_steps
    assert together(e, prompts()) == first
    for got, want, setting in zip(first, plain, SETTINGS):
      if not setting:  # greedy: what plain decoding gives, token for token
        assert got == want
    assert e.totals.draft_tokens > 0 and e.totals.accepted_tokens > 0
    if name == "draft":  # a draft equal to the target: every draft token of a greedy row accepted
      assert e.totals.accepted_tokens >= 0.6 * e.totals.draft_tokens
    assert forwards < sum(MAX_TOKENS) - len(MAX_TOKENS)  # fewer target forwards than plain decoding
    assert len(e.traces) == len(set(e.traces)) and all(n == 1 for n in e.traces.values())
