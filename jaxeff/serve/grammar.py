"""Structured output: next-token masks that keep a request's output inside a grammar.

    compiler = GrammarCompiler(tokenizer, vocab_size=model_config.vocab_size)     # once per server
    grammar = compiler.compile({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    matcher = grammar.matcher()                                                   # once per request
    matcher.fill(mask)  # then sample a token the mask allows, and: matcher.accept(token)

Specs (OpenAI's `response_format` shapes plus three extensions): `{"type": "json_object"}` (any
JSON object); `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
`{"type": "regex", "pattern": str}` (the whole output matches); `{"type": "grammar", "grammar": str}`
(llguidance's Lark dialect, https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md:
`start` is the whole output, `%json {schema}` embeds a JSON schema); `{"type": "tagged_json",
"begin": str, "schema": dict, "end": str}` (the literal `begin`, JSON matching `schema`, the
literal `end`: a tool call). JSON whitespace is bounded (`WHITESPACE`: at most one space, or a
newline and up to 20 spaces/tabs, between tokens), so a model cannot loop on blank space.

Mask format (xgrammar's, llguidance's, vLLM's): int32 [ceil(vocab_size/32)] per row, bit j of word i
set = id 32*i + j allowed; the stop ids (the tokenizer's `stop_tokens`) are allowed exactly when the
grammar may end; ids past the tokenizer's vocabulary (a model's padded embedding) never are.

Engine: llguidance (Earley parser over a derivative-regex lexer, token-trie walk). Measured by
`python -m jaxeff.bench grammar` on SmolLM2's 49152-id tokenizer, this 2-core CPU, along outputs
drawn uniformly among the allowed tokens (5 schemas: nested objects, enums, bounded arrays, bounded
numbers, optional fields):
- llguidance 1.9.1: mask 18 us median, 449 us p99 per token; 8 requests 55 us per step (filled in
  turn; 166 us on its thread pool); compile 0.4-1 ms; 20/20 outputs valid; 7.8 MB, no dependencies.
- xgrammar 0.2.9: mask 3 us median, 27 us p99; compile 2-8 ms; 20/20 valid; but it requires torch,
  transformers and triton (GBs, with CUDA wheels where torch is not yet installed; import 3.5 s).
- outlines-core 0.2.14: 3 us median once built, but compile 30-150 ms per schema and 6 s for
  json_object (a regex of bounded depth), and 9/20 outputs invalid (number bounds not enforced).
Both fast engines are far below a decode step (milliseconds), and the mask is computed on the
host while the step runs; llguidance wins on footprint and on keeping jaxeff free of torch.

Errors: a spec, schema, regex or grammar the engine rejects raises GenerationError with one line.
A matcher never raises on a token: `accept` returns False, and from then on the matcher allows only
the stop ids (so the row ends) and refuses every token.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Sequence

import numpy as np

from jaxeff.data.tokenizer import HFTokenizer
from jaxeff.errors import GenerationError

WHITESPACE = r"[ ]?|\n[ \t]{0,20}"  # the JSON whitespace allowed between tokens (llama.cpp's bound too)
CACHE_SIZE = 64  # compiled grammars kept per compiler
SPEC_TYPES = ("json_object", "json_schema", "regex", "grammar", "tagged_json")


def mask_words(vocab_size: int) -> int:
  """int32 words in one mask row: ceil(vocab_size / 32)."""
  return (int(vocab_size) + 31) // 32


def _one_line(message: str) -> str:
  """llguidance's multi-line error (location, source echo, caret, reason) as one line."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if not lines:
    return "rejected by the grammar engine"
  reasons = [line for line in lines[1:] if line.lower().startswith("error")]
  return "; ".join(dict.fromkeys([lines[0], *reasons]))


def _with_whitespace(schema: dict) -> dict:
  """`schema` with the bounded JSON whitespace, unless its own x-guidance options say otherwise."""
  options = schema.get("x-guidance") or {}
  if not isinstance(options, dict):
    raise GenerationError(f"JSON schema 'x-guidance' must be an object, got {type(options).__name__}")
  return {**schema, "x-guidance": {"whitespace_pattern": WHITESPACE, **options}}


def _schema(value, where: str) -> dict:
  if not isinstance(value, dict):
    raise GenerationError(f"{where} must be a JSON schema object, got {type(value).__name__}")
  return value


def _string(spec: dict, key: str, kind: str) -> str:
  value = spec.get(key)
  if not isinstance(value, str):
    raise GenerationError(f"a {kind!r} response format needs a string {key!r}, got {type(value).__name__}")
  return value


class GrammarCompiler:
  """Compiles specs into `Grammar`s for one tokenizer and model; built once per server.

  Args:
    tokenizer: the model's Tokenizer; it must be an HFTokenizer (a tokenizer.json): the engine
      reads the byte-level vocabulary from it. Its `stop_tokens` are the ids that end a grammar.
    vocab_size: the model's vocabulary (its logits' width): at least the tokenizer's; ids past
      the tokenizer's are never allowed.
  """

  def __init__(self, tokenizer, vocab_size: int):
    if not isinstance(tokenizer, HFTokenizer):
      raise GenerationError(
        f"structured output needs a Hugging Face tokenizer (tokenizer.json); this model has a "
        f"{type(tokenizer).__name__}, whose ids the grammar engine cannot read"
      )
    if vocab_size < tokenizer.vocab_size:
      raise GenerationError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    if not tokenizer.stop_tokens:
      raise GenerationError(f"the tokenizer {tokenizer.path} has no stop token to end a grammar with")
    try:
      import llguidance
    except ImportError:
      raise GenerationError("structured output needs llguidance: pip install 'jaxeff[serve]'") from None
    self._llg = llguidance
    self.vocab_size = int(vocab_size)
    self.words = mask_words(vocab_size)
    self.stop_tokens = tuple(int(t) for t in tokenizer.stop_tokens)
    try:
      # n_vocab: the model's width, so masks have its words and the padding ids stay cleared.
      self._tok = llguidance.LLTokenizer(str(tokenizer.path), n_vocab=self.vocab_size, eos_token=list(self.stop_tokens))
    except Exception as e:  # the Rust side raises plain exceptions
      raise GenerationError(f"the grammar engine cannot use the tokenizer {tokenizer.path}: {e}") from None
    self._executor = None
    self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
    self._lock = threading.Lock()

  def compile(self, spec: dict) -> Grammar:
    """The Grammar of `spec` (see the module docstring), from the cache when it was compiled lately."""
    if not isinstance(spec, dict):
      raise GenerationError(f"a response format must be an object, got {type(spec).__name__}")
    try:
      key = json.dumps(spec, sort_keys=True)
    except (TypeError, ValueError) as e:
      raise GenerationError(f"a response format must be plain JSON: {e}") from None
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
    grammar = Grammar(self, self._source(spec), spec["type"])
    with self._lock:
      self._cache[key] = grammar
      while len(self._cache) > CACHE_SIZE:
        self._cache.popitem(last=False)
    return grammar

  def _source(self, spec: dict) -> str:
    """llguidance's grammar text for `spec`."""
    llg, kind = self._llg.LLMatcher, spec.get("type")
    if kind == "json_object":
      return llg.grammar_from_json_schema(_with_whitespace({"type": "object"}))
    if kind == "json_schema":
      outer = spec.get("json_schema")
      if not isinstance(outer, dict):
        raise GenerationError("a 'json_schema' response format needs a 'json_schema' object")
      if "strict" in outer and not isinstance(outer["strict"], bool | None):
        raise GenerationError(f"json_schema.strict must be a boolean, got {outer['strict']!r}")
      schema = _schema(outer.get("schema"), "json_schema.schema")
      return llg.grammar_from_json_schema(_with_whitespace(schema))
    if kind == "regex":
      return llg.grammar_from_regex(_string(spec, "pattern", kind))
    if kind == "grammar":
      return llg.grammar_from_lark(_string(spec, "grammar", kind))
    if kind == "tagged_json":
      begin, end = _string(spec, "begin", kind), _string(spec, "end", kind)
      schema = json.dumps(_with_whitespace(_schema(spec.get("schema"), "tagged_json.schema")))
      # Lark string literals take JSON's escapes; %json embeds the schema's grammar.
      literal = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731
      rules = f"start: {literal(begin)} body {literal(end)}\nbody: %json {schema}"
      return llg.grammar_from_lark(rules if begin or end else f"start: body\nbody: %json {schema}")
    raise GenerationError(f"unknown response format type {kind!r}; expected one of {', '.join(SPEC_TYPES)}")

  def executor(self):
    """llguidance's thread pool for `fill_masks`, made on first use."""
    if self._executor is None:
      self._executor = self._llg.LLExecutor()
    return self._executor


class Grammar:
  """A compiled spec: `matcher()` gives each request its own state (a copy of a fresh one)."""

  def __init__(self, compiler: GrammarCompiler, source: str, kind: str):
    self.compiler, self.kind = compiler, kind
    # Compiling happens here, once; matchers are copies (microseconds, against ~1 ms to compile).
    self._fresh = compiler._llg.LLMatcher(compiler._tok, source, log_level=0)
    if self._fresh.is_error():
      raise GenerationError(f"invalid {kind} response format: {_one_line(self._fresh.get_error())}")

  def matcher(self) -> Matcher:
    return Matcher(self, self._fresh.deep_copy())


class Matcher:
  """One request's place in its grammar.

  `fill(out)` writes the allowed-next-token mask into `out` (int32 [words]); `accept(token)` moves
  past a sampled token (False: the token breaks the grammar; the matcher then refuses every token
  and allows only the stop ids); `rollback(n)` undoes the last n accepted tokens (a stop id
  included); `done`: the grammar has ended, only a stop id may follow.
  """

  def __init__(self, grammar: Grammar, state):
    self.grammar = grammar
    self.words = grammar.compiler.words
    self._m = state
    self._stopped = False  # a stop id was accepted: llguidance does not count it for rollback

  @property
  def done(self) -> bool:
    return self._stopped or self._m.is_stopped()

  @property
  def failed(self) -> bool:
    """A refused token (or a rollback past the start) broke the matcher."""
    return self._m.is_error()

  def fill(self, out: np.ndarray) -> None:
    """Write the next-token mask into `out` (C-contiguous int32 [words])."""
    _check_rows(out, 1, self.words)
    if self._stopped:  # past the stop id: nothing more to say but another stop id
      _stops_only(out, self.grammar.compiler.stop_tokens)
      return
    self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

  def accept(self, token: int) -> bool:
    token = int(token)
    if self._m.is_error():
      return False
    if token in self.grammar.compiler.stop_tokens:
      if self._stopped or not self._m.is_accepting():
        self._m.consume_token(token)  # puts it in the error state, as any refused token
        return False
      self._stopped = True
      return True
    if self._stopped:
      return False
    return self._m.consume_token(token)

  def valid_prefix(self, tokens: Sequence[int]) -> int:
    """How many of `tokens` (draft tokens) the grammar accepts in a row from here, without moving."""
    return 0 if self._m.is_error() or self._stopped else self._m.validate_tokens([int(t) for t in tokens])

  def rollback(self, n: int) -> None:
    """Undo the last `n` accepted tokens."""
    if n <= 0:
      return
    if self._stopped:
      self._stopped, n = False, n - 1
    if n and not self._m.rollback(n):
      raise GenerationError(f"cannot roll a grammar back {n} tokens: {_one_line(self._m.get_error())}")


def _stops_only(row: np.ndarray, stops: Sequence[int]) -> None:
  row[...] = 0
  for t in stops:
    row.view(np.uint32)[..., t // 32] |= np.uint32(1 << (t % 32))


def _check_rows(out: np.ndarray, rows: int, words: int) -> None:
  shape = (words,) if rows == 1 and out.ndim == 1 else (rows, words)
  if out.dtype != np.int32 or out.shape != shape or not out.flags["C_CONTIGUOUS"]:
    raise GenerationError(f"a mask must be a C-contiguous int32 array of shape {shape}, got {out.dtype} {out.shape}")


def fill_masks(matchers: Sequence[Matcher], out: np.ndarray, parallel: bool = False) -> None:
  """Fill row i of `out` (int32 [len(matchers), words]) with matchers[i]'s mask; all matchers must
  come from one compiler. Each fill releases the GIL. `parallel`: on llguidance's thread pool,
  which on a busy 2-core host was 13x slower than one after another (8 requests: 697 against 55 us
  per step, median); it pays off only with idle cores to spare."""
  if not matchers:
    return
  compiler = matchers[0].grammar.compiler
  if any(m.grammar.compiler is not compiler for m in matchers):
    raise GenerationError("fill_masks takes matchers of one compiler (one tokenizer and vocab size)")
  _check_rows(out, len(matchers), compiler.words)
  if not parallel:
    for i, m in enumerate(matchers):
      m.fill(out[i])
    return
  pairs = [(m._m, i) for i, m in enumerate(matchers) if not m._stopped]
  if pairs:
    compiler.executor().unsafe_compute_mask_ptr(pairs, out.ctypes.data, compiler.words * 4, len(matchers))
  for i, m in enumerate(matchers):
    if m._stopped:
      _stops_only(out[i], compiler.stop_tokens)
