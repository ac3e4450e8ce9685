"""Grammar engines for structured output: `python -m jaxeff.bench grammar [--outputs N] [--json PATH]`.

llguidance, xgrammar and outlines-core on SmolLM2-135M-Instruct's tokenizer (49152 ids): the time to
build each engine's tokenizer view from ours, the compile time of each of `SCHEMAS` and of
json_object (any JSON object), and the time to fill the next-token bitmask (int32, ceil(V/32)
words) along outputs sampled through the engine's own mask (seeded uniform choice among the allowed
tokens: the mask's worst case, strings full of rare tokens), single request and 8 requests filled
as one batch (the engine's parallel fill where it has one). Each sampled output is checked with
`jsonschema`, so a row also says whether the engine enforced the schema. An engine that is not
installed gets one skipped line. Times are wall clock on this machine's CPU (2 cores, shared).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import time

import numpy as np

from jaxeff.bench import common
from jaxeff.loader import load_tokenizer
from jaxeff.serve.grammar import WHITESPACE

# The measured set (also tests/test_grammar.py's): strings are bounded so that a uniform choice
# among allowed tokens ends within a few hundred tokens.
SCHEMAS = {
  "nested": {
    "type": "object",
    "properties": {
      "name": {"type": "string", "maxLength": 12},
      "address": {
        "type": "object",
        "properties": {
          "city": {"type": "string", "maxLength": 10},
          "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
          "geo": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat", "lon"],
            "additionalProperties": False,
          },
        },
        "required": ["city", "zip", "geo"],
        "additionalProperties": False,
      },
    },
    "required": ["name", "address"],
    "additionalProperties": False,
  },
  "enums": {
    "type": "object",
    "properties": {
      "status": {"enum": ["active", "inactive", "pending"]},
      "priority": {"type": "integer", "enum": [1, 2, 3]},
      "color": {"type": "string", "enum": ["red", "green", "blue"]},
      "flag": {"type": "boolean"},
    },
    "required": ["status", "priority", "color", "flag"],
    "additionalProperties": False,
  },
  "arrays": {
    "type": "object",
    "properties": {
      "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 4},
      "scores": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 100},
        "minItems": 2,
        "maxItems": 3,
      },
    },
    "required": ["tags", "scores"],
    "additionalProperties": False,
  },
  "numbers": {
    "type": "object",
    "properties": {
      "age": {"type": "integer", "minimum": 0, "maximum": 120},
      "price": {"type": "number", "minimum": 0, "maximum": 1000},
      "delta": {"type": "integer", "minimum": -50, "maximum": -10},
      "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    },
    "required": ["age", "price", "delta", "ratio"],
    "additionalProperties": False,
  },
  "required": {
    "type": "object",
    "properties": {
      "id": {"type": "integer", "minimum": 1, "maximum": 9999},
      "label": {"type": "string", "maxLength": 8},
      "note": {"type": "string", "maxLength": 8},
      "active": {"type": "boolean"},
      "extra": {"type": "null"},
    },
    "required": ["id", "active"],
    "additionalProperties": False,
  },
}
JSON_OBJECT = {"type": "object"}
ENGINES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


class LLGuidance:
  def __init__(self, tok, vocab: int):
    import llguidance

    self.llg, self.vocab = llguidance, vocab
    self.tok = llguidance.LLTokenizer(str(tok.path), n_vocab=vocab, eos_token=list(tok.stop_tokens))
    self.executor = llguidance.LLExecutor()

  def compile(self, schema):
    # llguidance compiles when a matcher is made (every request pays it): time the first one.
    grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": WHITESPACE})
    self.llg.LLMatcher(self.tok, grammar, log_level=0)
    return grammar

  def matcher(self, grammar):
    return self.llg.LLMatcher(self.tok, grammar, log_level=0)

  def fill(self, m, row):
    m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

  def fill_batch(self, ms, out):
    pairs = [(m, i) for i, m in enumerate(ms)]
    self.executor.unsafe_compute_mask_ptr(pairs, out.ctypes.data, out.shape[1] * 4, len(out))

  def accept(self, m, t) -> bool:
    return m.consume_token(int(t))

  def done(self, m) -> bool:
    return m.is_stopped()


class XGrammar:
  def __init__(self, tok, vocab: int):
    import tokenizers
    import transformers
    import xgrammar

    self.xgr = xgrammar
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_file(str(tok.path)))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=list(tok.stop_tokens))
    self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    self.batch = xgrammar.BatchGrammarMatcher()

  def compile(self, schema):
    if schema == JSON_OBJECT:
      return self.compiler.compile_builtin_json_grammar()
    return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

  def matcher(self, grammar):
    return self.xgr.GrammarMatcher(grammar)

  def fill(self, m, row):
    m.fill_next_token_bitmask(row[None], 0)

  def fill_batch(self, ms, out):
    self.batch.batch_fill_next_token_bitmask(ms, out)

  def accept(self, m, t) -> bool:
    return m.accept_token(int(t))

  def done(self, m) -> bool:
    return m.is_terminated()


class OutlinesCore:
  def __init__(self, tok, vocab: int):
    import outlines_core
    import tokenizers

    self.oc = outlines_core
    hf = tokenizers.Tokenizer.from_file(str(tok.path))
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    tokens: dict[bytes, list[int]] = {}
    for text, i in hf.get_vocab(with_added_tokens=True).items():
      if text not in special:
        tokens.setdefault(tok.token_bytes(i), []).append(i)
    self.vocabulary = outlines_core.Vocabulary(tok.stop_tokens[0], tokens)

  def compile(self, schema):
    regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
    return self.oc.Index(regex, self.vocabulary)

  def matcher(self, grammar):
    return self.oc.Guide(grammar)

  def fill(self, m, row):
    m.write_mask_into(row.ctypes.data, row.size, 4)

  def fill_batch(self, ms, out):  # no batch call: one guide after another
    for i, m in enumerate(ms):
      m.write_mask_into(out[i].ctypes.data, out.shape[1], 4)

  def accept(self, m, t) -> bool:
    try:
      m.advance(int(t), return_tokens=False)
    except ValueError:
      return False
    return True

  def done(self, m) -> bool:
    return m.is_finished() and len(m.get_tokens()) == 1


ADAPTERS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def allowed_ids(row: np.ndarray, vocab: int) -> np.ndarray:
  """The ids whose bit is set in one int32 mask row."""
  return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])


def sample(engine, grammar, rng, vocab: int, stops, max_tokens: int):
  """(ids, per-token fill seconds, per-token accept seconds) of one output drawn uniformly among the
  allowed tokens until a stop id is allowed and drawn, the matcher is done, or `max_tokens`."""
  m, row = engine.matcher(grammar), np.zeros((vocab + 31) // 32, np.int32)
  ids, fills, accepts = [], [], []
  for _ in range(max_tokens):
    t0 = time.perf_counter()
    engine.fill(m, row)
    fills.append(time.perf_counter() - t0)
    allowed = allowed_ids(row, vocab)
    if len(allowed) == 0:
      break
    tok = int(rng.choice(allowed))
    if tok in stops:
      break
    t0 = time.perf_counter()
    ok = engine.accept(m, tok)
    accepts.append(time.perf_counter() - t0)
    if not ok:
      raise RuntimeError(f"the engine refused a token its own mask allowed ({tok})")
    ids.append(tok)
  return ids, fills, accepts


def batch_steps(engine, grammars, rng, vocab: int, stops, max_tokens: int) -> list[float]:
  """Seconds per step to fill the masks of len(grammars) requests at once, each drawing as `sample` does."""
  ms = [engine.matcher(g) for g in grammars]
  out = np.zeros((len(ms), (vocab + 31) // 32), np.int32)
  live, steps = list(range(len(ms))), []
  for _ in range(max_tokens):
    if not live:
      break
    t0 = time.perf_counter()
    engine.fill_batch(ms, out)
    steps.append(time.perf_counter() - t0)
    for i in list(live):
      tok = int(rng.choice(allowed_ids(out[i], vocab)))
      if tok in stops or not engine.accept(ms[i], tok):
        live.remove(i)
  return steps


def install_info(module: str) -> tuple[str, str]:
  """(installed size in MB, runtime requirements) of the distribution of `module`."""
  dist = importlib.metadata.distribution(module.replace("_", "-"))
  size = sum((f.size or 0) for f in dist.files or [])
  reqs = [r.split(";")[0].strip() for r in dist.requires or [] if "extra ==" not in r]
  return f"{dist.version}, {size / 1e6:.1f} MB", ", ".join(reqs) or "none"


def us(xs) -> str:
  return f"{np.median(xs) * 1e6:.0f} / {np.percentile(xs, 99) * 1e6:.0f}" if len(xs) else "-"


def measure(name: str, tok, vocab: int, outputs: int, max_tokens: int, seed: int) -> dict:
  import jsonschema

  t0 = time.perf_counter()
  engine = ADAPTERS[name](tok, vocab)
  build = time.perf_counter() - t0
  compiles, grammars = {}, {}
  for key, schema in [*SCHEMAS.items(), ("json_object", JSON_OBJECT)]:
    t0 = time.perf_counter()
    grammars[key] = engine.compile(schema)
    compiles[key] = time.perf_counter() - t0
  rng, stops = np.random.default_rng(seed), set(tok.stop_tokens)
  fills, accepts, valid, total, lengths = [], [], 0, 0, []
  for key, schema in SCHEMAS.items():
    for _ in range(outputs):
      ids, f, a = sample(engine, grammars[key], rng, vocab, stops, max_tokens)
      fills += f
      accepts += a
      lengths.append(len(ids))
      total += 1
      try:
        jsonschema.validate(json.loads(tok.decode(ids)), schema)
        valid += 1
      except (ValueError, jsonschema.ValidationError):
        pass
  steps = batch_steps(engine, [grammars[k] for k in list(SCHEMAS) * 2][:8], rng, vocab, stops, max_tokens)
  return {
    "build_s": build,
    "compile_s": compiles,
    "fill_s": fills,
    "accept_s": accepts,
    "batch8_s": steps,
    "valid": f"{valid}/{total}",
    "tokens": int(np.sum(lengths)),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench grammar", description=__doc__.split("\n")[0])
  p.add_argument("--outputs", type=int, default=4, help="sampled outputs per schema (default 4)")
  p.add_argument("--max-tokens", type=int, default=300)
  p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="also write the raw numbers here")
  args = p.parse_args(argv)

  names = [n.strip() for n in args.engines.split(",") if n.strip()]
  unknown = [n for n in names if n not in ENGINES]
  if unknown:
    return common.error(f"unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
  tok = load_tokenizer(str(common.require_smollm2("grammar")))
  vocab = tok.vocab_size
  print(f"# grammar engines on SmolLM2-135M-Instruct's tokenizer ({vocab} ids), {common.machine()}, {common.today()}")
  print(f"{args.outputs} outputs per schema, uniform choice among allowed tokens, at most {args.max_tokens} tokens\n")
  cols = [*SCHEMAS, "json_object"]
  header = ["engine", "version, size", "requires", "tokenizer (s)"] + [f"compile {c} (ms)" for c in cols]
  header += ["fill us med/p99", "accept us med/p99", "batch 8 fill us med/p99", "valid", "tokens"]
  rows, raw = [], {}
  for name in names:
    module = ENGINES[name]
    try:
      importlib.import_module(module)
    except ImportError:
      rows.append([name, "not installed: skipped"] + [""] * (len(header) - 2))
      continue
    version, reqs = install_info(module)
    r = measure(name, tok, vocab, args.outputs, args.max_tokens, args.seed)
    raw[name] = r
    rows.append(
      [name, version, reqs, f"{r['build_s']:.2f}"]
      + [f"{r['compile_s'][c] * 1e3:.1f}" for c in cols]
      + [us(r["fill_s"]), us(r["accept_s"]), us(r["batch8_s"]), r["valid"], r["tokens"]]
    )
  print("\n".join(common.markdown_table(header, rows)))
  if args.json:
    common.write_json(args.json, raw)
  return 0
