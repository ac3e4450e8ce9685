"""jaxeff.serve.grammar on SmolLM2's tokenizer: outputs drawn through the masks parse and validate."""

import json
import re

import jsonschema
import numpy as np
import pytest

from jaxeff.bench.grammar import SCHEMAS
from jaxeff.data.tokenizer import ByteTokenizer
from jaxeff.errors import GenerationError
from jaxeff.loader import load_tokenizer
from jaxeff.serve.grammar import GrammarCompiler, fill_masks, mask_words
from tests.smollm2 import smollm2_path

PAD = 70  # the model's vocab past the tokenizer's (a padded embedding)


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(str(smollm2_path()))


@pytest.fixture(scope="module")
def compiler(tok):
  return GrammarCompiler(tok, tok.vocab_size + PAD)


def allowed(row, vocab):
  return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])


def draw(compiler, grammar, rng, max_tokens=200):
  """Ids drawn from random logits masked by the matcher, until a stop id or max_tokens; each
  accepted. Returns (ids without the stop id, stopped)."""
  m, row, vocab = grammar.matcher(), np.zeros(compiler.words, np.int32), compiler.vocab_size
  ids = []
  for _ in range(max_tokens):
    m.fill(row)
    logits = rng.standard_normal(vocab)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab].astype(bool)
    assert bits.any(), f"no token allowed after {ids}"
    token = int(np.argmax(np.where(bits, logits, -np.inf)))
    assert m.accept(token), f"the matcher refused {token}, which its mask allowed"
    if token in compiler.stop_tokens:
      assert m.done
      return ids, True
    ids.append(token)
  return ids, False


def schema_spec(schema):
  return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_outputs_validate(compiler, tok, name):
  grammar, rng = compiler.compile(schema_spec(SCHEMAS[name])), np.random.default_rng(len(name))
  for _ in range(3):
    ids, stopped = draw(compiler, grammar, rng)
    assert stopped, f"{name}: no stop within 200 tokens: {tok.decode(ids)!r}"
    jsonschema.validate(json.loads(tok.decode(ids)), SCHEMAS[name])


def test_json_object_forbids_a_breaking_token(compiler, tok):
  m, row = compiler.compile({"type": "json_object"}).matcher(), np.zeros(compiler.words, np.int32)
  m.fill(row)
  assert tok.encode("[", add_special_tokens=False)[0] not in allowed(row, compiler.vocab_size)
  assert m.accept(tok.encode("{", add_special_tokens=False)[0])
  m.fill(row)
  ok = allowed(row, compiler.vocab_size)
  close_bracket, quote = tok.encode("]", add_special_tokens=False)[0], tok.encode('"', add_special_tokens=False)[0]
  assert close_bracket not in ok and quote in ok
  assert not set(compiler.stop_tokens) & set(ok)  # "{" is no JSON text yet
  assert not m.accept(close_bracket)
  assert not m.accept(quote), "a broken matcher refuses every token"
  m.fill(row)
  assert set(allowed(row, compiler.vocab_size)) <= set(compiler.stop_tokens)


def test_tagged_json(compiler, tok):
  begin, end = "<tool_call>\n", "\n</tool_call>"
  schema = SCHEMAS["enums"]
  grammar, rng = (
    compiler.compile({"type": "tagged_json", "begin": begin, "schema": schema, "end": end}),
    np.random.default_rng(1),
  )
  for _ in range(3):
    ids, stopped = draw(compiler, grammar, rng)
    text = tok.decode(ids)
    assert stopped and text.startswith(begin) and text.endswith(end), text
    jsonschema.validate(json.loads(text[len(begin) : -len(end)]), schema)


def test_regex_and_lark(compiler, tok):
  pattern = r"(yes|no), [0-9]{2,4}(\.[0-9])?"
  rng = np.random.default_rng(2)
  grammar = compiler.compile({"type": "regex", "pattern": pattern})
  for _ in range(5):
    ids, stopped = draw(compiler, grammar, rng)
    assert stopped and re.fullmatch(pattern, tok.decode(ids)), tok.decode(ids)
  lark = compiler.compile({"type": "grammar", "grammar": 'start: "a" ("b" | "c")+ "d"'})
  ids, stopped = draw(compiler, lark, rng)
  assert stopped and re.fullmatch("a[bc]+d", tok.decode(ids))


@pytest.mark.parametrize(
  "spec, words",
  [
    (schema_spec({"type": "object", "properties": {"a": {"type": "intger"}}}), "intger"),
    ({"type": "regex", "pattern": "a(b"}, "regex"),
    ({"type": "grammar", "grammar": "start: foo"}, "foo"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "xml"}, "'xml'"),
    ({"type": "regex"}, "'pattern'"),
  ],
)
def test_bad_specs_raise_one_line(compiler, spec, words):
  with pytest.raises(GenerationError, match=re.escape(words)) as e:
    compiler.compile(spec)
  assert "\n" not in str(e.value)


def test_rollback_restores_state(compiler, tok):
  grammar = compiler.compile(schema_spec(SCHEMAS["enums"]))
  m, row, again = grammar.matcher(), np.zeros(compiler.words, np.int32), np.zeros(compiler.words, np.int32)
  prefix = tok.encode('{"status": "pending", "priority": ', add_special_tokens=False)
  assert all(m.accept(t) for t in prefix)
  m.fill(row)
  for t in tok.encode('2, "color": "red"', add_special_tokens=False):
    assert m.accept(t)
  m.rollback(len(tok.encode('2, "color": "red"', add_special_tokens=False)))
  m.fill(again)
  np.testing.assert_array_equal(row, again)
  rest = tok.encode('3, "color": "blue", "flag": true}', add_special_tokens=False)
  assert all(m.accept(t) for t in rest) and m.accept(compiler.stop_tokens[0]) and m.done
  m.rollback(2)  # the stop id and "}"
  assert not m.done
  m.fill(again)
  assert tok.encode("}", add_special_tokens=False)[0] in allowed(again, compiler.vocab_size)


def test_padding_ids_never_allowed_and_batch_fill_matches(compiler, tok):
  assert compiler.words == mask_words(tok.vocab_size + PAD) == (tok.vocab_size + PAD + 31) // 32
  any_text = compiler.compile({"type": "regex", "pattern": r"(.|\n)*"})
  specs = [schema_spec(SCHEMAS[n]) for n in SCHEMAS] + [{"type": "json_object"}]
  matchers = [any_text.matcher()] + [compiler.compile(s).matcher() for s in specs]
  out = np.full((len(matchers), compiler.words), -1, np.int32)
  fill_masks(matchers, out, parallel=True)
  serial = np.zeros_like(out)
  fill_masks(matchers, serial)
  np.testing.assert_array_equal(out, serial)
  bits = np.unpackbits(out.view(np.uint8), axis=1, bitorder="little")
  assert bits[0, : tok.vocab_size].sum() > 40000  # free text: nearly every id
  assert not bits[:, tok.vocab_size :].any()
  row = np.zeros(compiler.words, np.int32)
  for i, m in enumerate(matchers):
    m.fill(row)
    np.testing.assert_array_equal(row, out[i])


def test_byte_tokenizer_refused():
  with pytest.raises(GenerationError, match="ByteTokenizer"):
    GrammarCompiler(ByteTokenizer(), 256)


def test_cache_returns_the_compiled_grammar(compiler):
  spec = schema_spec(SCHEMAS["arrays"])
  assert compiler.compile(spec) is compiler.compile(json.loads(json.dumps(spec)))
