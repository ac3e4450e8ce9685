"""Speculative decoding: draft several tokens, verify them in one target forward, keep the output.

>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.generate import Generator
>>> from jaxeff.generate.speculative import PromptLookup
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> prompt = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]]
>>> plain = Generator(model, max_batch=1, max_seq_len=64).generate(prompt, max_new_tokens=16)
>>> gen = Generator(model, max_batch=1, max_seq_len=64, speculator=PromptLookup(num_draft=4))
>>> gen.generate(prompt, max_new_tokens=16) == plain        # greedy: the same tokens, fewer forwards
True
>>> gen.stats.target_forwards <= 15
True

Batch-1 decoding reads every weight once per token, so scoring several guessed tokens in one
forward costs about as much as one; every guess the target agrees with is a forward saved.
Speculators (each a static tree of draft slots, `tree.Tree`; most are chains):
- `PromptLookup(max_ngram=3, num_draft=8)`: copies what followed the last n-gram earlier in the text.
- `SelfDraft(layers=L)`: the target's own first L layers plus its final norm and head.
- `DraftModel(model)`: a smaller model with the same vocabulary, its own cache kept in step.
- `Medusa(path)`: trained heads on the last hidden state, candidates on a token tree (Sequoia's).
Verification (`verify.py`): greedy keeps exact argmax matches; sampling uses the lossless rule of
speculative sampling (Leviathan et al. 2023; Chen et al. 2023), so the target's distribution is
unchanged; Medusa's typical acceptance is an option marked lossy. `Generator.stats` reports target
forwards, accepted tokens per forward (`accepted_histogram`, `tokens_per_forward`) and the draft's
share of decode time.
"""

from jaxeff.generate.speculative.draft import DraftModel, SelfDraft
from jaxeff.generate.speculative.lookup import PromptLookup
from jaxeff.generate.speculative.medusa import Medusa
from jaxeff.inference.speculation import DraftContext, Speculator
from jaxeff.inference.tree import Tree, best_tree, sequoia_tree

__all__ = [
  "DraftContext",
  "DraftModel",
  "Medusa",
  "PromptLookup",
  "SelfDraft",
  "Speculator",
  "Tree",
  "best_tree",
  "sequoia_tree",
]
