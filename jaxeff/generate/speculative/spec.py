"""The command lines' `--speculate` form -> a speculator (`python -m jaxeff.generate`, `jaxeff.serve`).

lookup           prompt lookup (`PromptLookup`)
self:LAYERS      the target's first LAYERS layers (`SelfDraft`)
draft:PATH       a smaller model with the same vocabulary, a GGUF file or HF directory (`DraftModel`)
medusa:DIR       trained Medusa heads (`Medusa`; `tree_size` builds Sequoia's tree from their table)
"""

from __future__ import annotations

import pathlib

from jaxeff import loader
from jaxeff.errors import GenerationError, HFError
from jaxeff.generate.speculative.draft import DraftModel, SelfDraft
from jaxeff.generate.speculative.lookup import PromptLookup
from jaxeff.generate.speculative.medusa import Medusa

KINDS = ("lookup", "self", "draft", "medusa")
FORMS = "lookup, self:LAYERS, draft:PATH or medusa:DIR"


def check(spec: str, *, num_draft: int | None = None, tree_size: int | None = None) -> None:
  """Raises GenerationError for a malformed `--speculate` value or options that do not go with it
  (before any model is loaded)."""
  kind = spec.split(":", 1)[0]
  if kind not in KINDS or (kind == "lookup") != (":" not in spec):
    raise GenerationError(f"--speculate takes {FORMS}, got {spec!r}")
  if tree_size is not None and kind != "medusa":
    raise GenerationError("--tree-size goes with --speculate medusa:DIR")
  if num_draft is not None and (num_draft < 1 or kind == "medusa"):
    raise GenerationError(
      "--draft-tokens takes a positive count, for lookup/self/draft (Medusa drafts one token per head)"
    )


def from_spec(spec: str, target, *, num_draft: int | None = None, tree_size: int | None = None):
  """The speculator `spec` names, for `target` (a draft model is loaded in the target's dtype).
  Raises JaxeffError for bad values (a missing path, a bad layer count)."""
  check(spec, num_draft=num_draft, tree_size=tree_size)
  kind, _, value = spec.partition(":")
  count = {} if num_draft is None else {"num_draft": num_draft}
  if kind == "lookup":
    return PromptLookup(**count)
  if kind == "self":
    if not value.isdigit():
      raise GenerationError(f"--speculate self:LAYERS needs a layer count, got {value!r}")
    return SelfDraft(layers=int(value), **count)
  if kind == "draft":
    if not pathlib.Path(value).exists():
      raise HFError(f"--speculate draft:{value}: no such file or directory")
    draft, _ = loader.load(value, dtype=target.cfg.dtype, param_dtype=target.cfg.dtype)
    return DraftModel(draft, **count)
  return Medusa(value, tree_size=tree_size)
