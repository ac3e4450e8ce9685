"""Tests for jaxeff.data: tokenizing, packing, shuffling, splitting, resuming, sharding."""

import itertools
import json
import pathlib
import sysconfig

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxeff import data as data_lib
from jaxeff.data import DataConfig, DataError, TextData
from jaxeff.errors import HFError


def _write_corpus(tmp_path, n_docs=4, doc_len=500, seed=0):
  """Random lowercase documents: long windows of them are unique, so rows can be located."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n_docs):
    text = bytes(rng.integers(ord("a"), ord("z") + 1, doc_len, dtype=np.uint8)).decode()
    path = tmp_path / f"doc{i}.txt"
    path.write_text(text)
    paths.append(path)
  return paths


@pytest.fixture
def corpus(tmp_path):
  """Config over 4 random documents: 2004 byte tokens, 100 of them validation."""
  _write_corpus(tmp_path)
  return DataConfig(paths=[str(tmp_path / "*.txt")], val_fraction=0.05)


def _take(it, n):
  return list(itertools.islice(it, n))


def _window_index(tokens, row, seq_len):
  """k such that `row` is tokens[k*L : k*L + L], or None."""
  matches = [
    k for k in range((len(tokens) - 1) // seq_len) if np.array_equal(tokens[k * seq_len : k * seq_len + seq_len], row)
  ]
  assert len(matches) <= 1
  return matches[0] if matches else None


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {"inputs", "targets"}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------- tokens


def test_byte_tokens_round_trip():
  tok = data_lib.ByteTokenizer()
  text = "héllo, wörld ✓\n"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert [d.dtype for d in tok.encode_each([b"ab", "c"])] == [np.int32, np.int32]


def test_load_tokens_concatenates_documents_with_eod(tmp_path):
  (tmp_path / "a.txt").write_text("abc")
  (tmp_path / "b.txt").write_text("de")
  tokens = data_lib.load_tokens(DataConfig(paths=[str(tmp_path / "b.txt"), str(tmp_path / "*.txt")]))
  # b first (explicit), then the glob's sorted matches minus the repeat; each doc ends with 0.
  assert tokens.dtype == np.int32
  assert tokens.tolist() == [*b"de", 0, *b"abc", 0]
  assert data_lib.vocab_size(DataConfig(paths=[str(tmp_path / "a.txt")])) == 256


def test_hf_tokenizer_json(tmp_path):
  vocab = {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 3, "jax": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok_path = tmp_path / "tokenizer.json"
  tok.save(str(tok_path))
  (tmp_path / "a.txt").write_text("hello world")
  (tmp_path / "b.txt").write_text("jax hello pytorch")
  cfg = DataConfig(paths=[str(tmp_path / "*.txt")], tokenizer=str(tok_path))

  hf = data_lib.get_tokenizer(cfg.tokenizer)
  assert hf.encode("world jax hello") == [3, 4, 2]
  assert hf.eod_id == 1
  assert data_lib.vocab_size(cfg) == 5
  # Unknown words map to [UNK]; each document ends with <|endoftext|>.
  assert data_lib.load_tokens(cfg).tolist() == [2, 3, 1, 4, 2, 0, 1]


def test_hf_tokenizer_trained_bpe(tmp_path):
  """A BPE trained by `tokenizers` itself: ids decode back to the corpus text."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300, special_tokens=["</s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
  )
  text = "the quick brown fox jumps over the lazy dog. " * 20
  tok.train_from_iterator([text], trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "a.txt").write_text(text)
  cfg = DataConfig(paths=[str(tmp_path / "a.txt")], tokenizer=str(tmp_path / "tokenizer.json"))

  tokens = data_lib.load_tokens(cfg)
  hf = data_lib.get_tokenizer(cfg.tokenizer)
  assert hf.eod_id == 0 and tokens[-1] == 0 and 0 not in tokens[:-1]
  assert len(tokens) < len(text)  # merges were learned
  assert hf.decode(tokens[:-1]) == text
  assert tokens.max() < data_lib.vocab_size(cfg) == tok.get_vocab_size()


def test_one_tokenizer_type_serves_data_and_generation(tmp_path):
  """`HFTokenizer` (a tokenizer.json and what lies beside it) and `ByteTokenizer` are both the
  `Tokenizer` every part of jaxeff takes: prompts with special tokens, documents without."""
  vocab = {"[UNK]": 0, "[BOS]": 1, "</s>": 2, "<|im_end|>": 3, "hi": 4, "there": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["[BOS]", "</s>", "<|im_end|>"])
  tok.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
  tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  tok.save(str(tmp_path / "tokenizer.json"))

  bare = data_lib.HFTokenizer(tmp_path)  # a directory or its tokenizer.json: the same tokenizer
  assert bare.path == tmp_path / "tokenizer.json" and bare.fingerprint == data_lib.HFTokenizer(bare.path).fingerprint
  assert isinstance(bare, data_lib.Tokenizer) and isinstance(data_lib.ByteTokenizer(), data_lib.Tokenizer)
  assert bare.encode("hi there") == [1, 4, 5] and bare.encode("hi there", add_special_tokens=False) == [4, 5]
  assert [d.tolist() for d in bare.encode_each([b"hi", "there hi"])] == [[4, 2], [5, 4, 2]]  # eod, never BOS
  assert bare.decode([1, 4, 5, 3]) == "hi there" and bare.decode([4, 3], skip_special_tokens=False) == "hi <|im_end|>"
  assert bare.eod_id == 2 and bare.stop_tokens == (2,) and bare.chat_template is None  # no config: stop at eod
  with pytest.raises(HFError, match="no chat template"):
    bare.apply_chat_template([{"role": "user", "content": "hi"}])

  template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"eos_token": "<|im_end|>", "chat_template": [{"name": "default", "template": template}]})
  )
  chat = data_lib.HFTokenizer(tmp_path / "tokenizer.json")
  assert chat.chat_template == template and chat.stop_tokens == (3,)
  assert chat.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi<|im_end|>"
  (tmp_path / "tokenizer_config.json").write_text("{}")
  (tmp_path / "chat_template.jinja").write_text(template)
  assert data_lib.HFTokenizer(tmp_path).chat_template == template
  with pytest.raises(DataError, match="past the 256 byte values"):
    data_lib.ByteTokenizer(bos_id=10)


def test_data_modules_import_without_a_cycle():
  """jaxeff.data's modules import one another at module level only, in one direction."""
  import ast

  root = pathlib.Path(data_lib.__file__).parent
  graph = {}
  for path in root.glob("*.py"):
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    imports = [
      n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("jaxeff.data.")
    ]
    assert all(id(n) in top for n in imports), f"{path.name} imports jaxeff.data inside a function"
    graph[path.stem] = {n.module.split(".")[2] for n in imports}
  graph.pop("__init__"), graph.pop("__main__")
  order = []
  while graph:
    ready = sorted(m for m, deps in graph.items() if not deps - set(order))
    assert ready, f"import cycle among {sorted(graph)}"
    order += ready
    for m in ready:
      graph.pop(m)
  assert order.index("chat") < order.index("prepared") < order.index("pipeline")


def test_default_corpus_is_stdlib_bytes():
  files = data_lib.default_corpus_files(16_000_000)
  assert files == data_lib.default_corpus_files(16_000_000)  # deterministic order
  assert any(f.name == "dataclasses.py" for f in files)
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  assert not any({"test", "tests", "site-packages"} & set(f.relative_to(root).parts) for f in files)
  small = data_lib.default_corpus_files(200_000)
  assert small == files[: len(small)] and sum(f.stat().st_size for f in small) <= 200_000

  cfg = DataConfig(max_corpus_bytes=200_000)
  tokens = data_lib.load_tokens(cfg)
  np.testing.assert_array_equal(tokens, data_lib.load_tokens(cfg))
  assert len(tokens) == sum(f.stat().st_size for f in small) + len(small)  # bytes + one EOD each
  assert 0 <= tokens.min() and tokens.max() < 256
  assert data_lib.vocab_size(cfg) == 256


def test_default_config_trains_and_validates():
  """No arguments at all: the embedded corpus gives training and validation batches."""
  cfg = DataConfig()
  batch = next(data_lib.train_iterator(cfg, seq_len=128, batch_size=4))
  assert batch["inputs"].shape == batch["targets"].shape == (4, 128)
  assert len(data_lib.val_batches(cfg, seq_len=128, batch_size=4, max_batches=3)) == 3


# ---------------------------------------------------------------------------- packing and splits


def test_packing_rows_are_shifted_corpus_windows(corpus):
  data = TextData.load(corpus)
  seq_len, batch_size = 16, 4
  n_windows = (len(data.train) - 1) // seq_len
  batches = _take(data_lib.train_iterator(data, seq_len=seq_len, batch_size=batch_size), n_windows // batch_size)
  seen = []
  for b in batches:
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert b["inputs"].shape == (batch_size, seq_len)
    for x, y in zip(b["inputs"], b["targets"]):
      k = _window_index(data.train, x, seq_len)
      assert k is not None  # the row is a packed window of the training stream...
      np.testing.assert_array_equal(y, data.train[k * seq_len + 1 : k * seq_len + seq_len + 1])
      seen.append(k)
  # ...and the first epoch visits each window once.
  assert len(set(seen)) == len(seen) == n_windows // batch_size * batch_size


def test_train_and_val_are_disjoint_positional_split(corpus):
  data = TextData.load(corpus)
  tokens = data_lib.load_tokens(corpus)
  assert data.train.dtype == np.uint16  # held compactly; batches are int32
  assert len(data.val) == 100
  np.testing.assert_array_equal(np.concatenate([data.train, data.val]), tokens)
  val = data_lib.val_batches(data, seq_len=16, batch_size=2)
  assert len(val) == (100 - 1) // 16 // 2 == 3  # finite, full batches only
  for i, b in enumerate(val):  # in order, from the tail of the stream
    for r in range(2):
      start = len(data.train) + (i * 2 + r) * 16
      np.testing.assert_array_equal(b["inputs"][r], tokens[start : start + 16])
      np.testing.assert_array_equal(b["targets"][r], tokens[start + 1 : start + 17])
  _assert_batches_equal(val, data_lib.val_batches(corpus, seq_len=16, batch_size=2))
  assert len(data_lib.val_batches(data, seq_len=16, batch_size=2, max_batches=1)) == 1
  no_val = DataConfig(paths=corpus.paths, val_fraction=0.0)
  assert data_lib.val_batches(no_val, seq_len=16, batch_size=2) == []


# ---------------------------------------------------------------------------- shuffling and resume


def test_seeded_shuffle(corpus):
  def first(seed, n=8):
    cfg = DataConfig(paths=corpus.paths, seed=seed)
    return _take(data_lib.train_iterator(cfg, seq_len=32, batch_size=4), n)

  _assert_batches_equal(first(0), first(0))
  a, b = first(0), first(1)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_new_shuffle_each_epoch(tmp_path):
  (tmp_path / "a.txt").write_bytes(bytes(range(1, 129)) * 2)  # 257 tokens with the EOD
  cfg = DataConfig(paths=[str(tmp_path / "a.txt")], val_fraction=0.0)
  data = TextData.load(cfg)
  windows = sorted(tuple(data.train[k * 8 : k * 8 + 8]) for k in range(32))  # seq_len 8: 32 windows
  it = data_lib.train_iterator(cfg, seq_len=8, batch_size=8)  # an epoch is 4 batches
  rows = [tuple(r) for b in _take(it, 12) for r in b["inputs"]]
  epochs = [rows[i : i + 32] for i in (0, 32, 64)]
  for e in epochs:
    assert sorted(e) == windows  # every epoch is a permutation of all windows...
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # ...in a new order


def test_exact_resume_through_json(corpus):
  kw = dict(seq_len=16, batch_size=4)
  # 29 batches per epoch: stop mid-epoch and read past the epoch boundary.
  reference = _take(data_lib.train_iterator(corpus, **kw), 40)

  it = data_lib.train_iterator(corpus, **kw)
  _assert_batches_equal(_take(it, 25), reference[:25])
  saved = json.dumps(it.get_state())
  assert json.loads(saved) == {"next_index": 25}

  fresh = data_lib.train_iterator(DataConfig(paths=list(corpus.paths)), **kw)
  fresh.set_state(json.loads(saved))
  _assert_batches_equal(_take(fresh, 15), reference[25:])


# ---------------------------------------------------------------------------- multi-process


def test_process_shards_stack_to_global_batch(corpus):
  data = TextData.load(corpus)
  kw = dict(seq_len=16, batch_size=4)
  whole = _take(data_lib.train_iterator(data, **kw), 35)
  parts = [_take(data_lib.train_iterator(data, process_index=p, process_count=2, **kw), 35) for p in range(2)]
  for g, p0, p1 in zip(whole, *parts):
    assert p0["inputs"].shape == (2, 16)
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), g[k])

  val = data_lib.val_batches(data, seq_len=16, batch_size=2)
  val_parts = [data_lib.val_batches(data, seq_len=16, batch_size=2, process_index=p, process_count=2) for p in range(2)]
  for g, p0, p1 in zip(val, *val_parts, strict=True):
    np.testing.assert_array_equal(np.concatenate([p0["inputs"], p1["inputs"]]), g["inputs"])


@settings(max_examples=15, deadline=None)
@given(seq_len=st.integers(1, 40), local=st.integers(1, 3), procs=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_sharding_property(seq_len, local, procs, seed):
  rng = np.random.default_rng(seed)
  data = TextData(train=rng.integers(0, 256, 300, dtype=np.int32), val=np.zeros(0, np.int32), vocab_size=256, seed=seed)
  kw = dict(seq_len=seq_len, batch_size=local * procs)
  whole = _take(data_lib.train_iterator(data, **kw), 3)
  parts = [_take(data_lib.train_iterator(data, process_index=p, process_count=procs, **kw), 3) for p in range(procs)]
  for step, g in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([p[step]["inputs"] for p in parts]), g["inputs"])
    np.testing.assert_array_equal(g["inputs"][:, 1:], g["targets"][:, :-1])


def test_shakespeare_smoke(shakespeare_path):
  cfg = DataConfig(paths=[str(shakespeare_path)])
  batch = next(data_lib.train_iterator(cfg, seq_len=64, batch_size=2))
  text = shakespeare_path.read_text()
  assert data_lib.ByteTokenizer().decode(batch["inputs"][0]) in text


# ---------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "short.txt").write_text("tiny")
  (tmp_path / "sub").mkdir()
  _write_corpus(tmp_path / "sub", n_docs=1, doc_len=300)
  # case -> (DataConfig kwargs, what the message must say, the path it must name)
  return {
    "missing path": (dict(paths=[str(tmp_path / "nope.txt")]), "not found", "nope.txt"),
    "glob matches nothing": (dict(paths=[str(tmp_path / "*.md")]), "matches no files", "*.md"),
    "directory": (dict(paths=[str(tmp_path / "sub")]), "is a directory", "sub"),
    "empty file": (dict(paths=[str(tmp_path / "empty.txt")]), "empty corpus", "empty.txt"),
    "too short": (dict(paths=[str(tmp_path / "short.txt")]), "corpus too short: the train split has 4 tokens", ""),
    "missing tokenizer": (
      dict(paths=[str(tmp_path / "short.txt")], tokenizer=str(tmp_path / "tok.json")),
      "tokenizer file not found",
      "tok.json",
    ),
  }


@pytest.mark.parametrize(
  "case", ["missing path", "glob matches nothing", "directory", "empty file", "too short", "missing tokenizer"]
)
def test_bad_input_raises_data_error(tmp_path, case):
  kwargs, message, names = _bad_inputs(tmp_path)[case]
  with pytest.raises(DataError, match=message) as err:
    data_lib.train_iterator(DataConfig(**kwargs), seq_len=32, batch_size=2)
  assert isinstance(err.value, ValueError)  # what the training CLI catches
  assert names in str(err.value)


def test_bad_settings_raise_data_error(tmp_path):
  _write_corpus(tmp_path, n_docs=1, doc_len=300)
  cfg = DataConfig(paths=[str(tmp_path / "doc0.txt")], val_fraction=0.05)  # 15 val tokens
  with pytest.raises(DataError, match="validation split too short"):
    data_lib.val_batches(cfg, seq_len=8, batch_size=4)
  with pytest.raises(DataError, match="validation split has 15 tokens"):
    data_lib.val_batches(cfg, seq_len=32, batch_size=1)
  with pytest.raises(DataError, match="not divisible by process_count=3"):
    data_lib.train_iterator(cfg, seq_len=8, batch_size=4, process_count=3)
  with pytest.raises(DataError, match="val_fraction"):
    DataConfig(val_fraction=1.0)
  with pytest.raises(DataError, match="tokenizer file not found"):
    data_lib.vocab_size(DataConfig(tokenizer=str(tmp_path / "missing.json")))


# ---------------------------------------------------------------------------- prepared datasets


def _bpe(tmp_path):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  return str(tmp_path / "tokenizer.json")


def _mixed_corpus(tmp_path):
  """The same 6 documents as 2 text files, a jsonl file and a parquet file (in that order)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  docs = [f"doc {i}: the quick brown fox {'jumps ' * i}over the lazy dog\n" for i in range(6)]
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.txt").write_text(docs[0])
  (src / "b.txt").write_text(docs[1])
  (src / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[2:4])))
  pq.write_table(pa.table({"text": docs[4:]}), src / "d.parquet", row_group_size=1)
  return docs, [str(src / "*")]


@pytest.mark.parametrize("tokenizer", [None, "bpe"])
def test_prepare_text_jsonl_parquet_matches_in_memory_tokens(tmp_path, tokenizer):
  docs, inputs = _mixed_corpus(tmp_path)
  tok_path = _bpe(tmp_path) if tokenizer else None
  index = data_lib.prepare(inputs, tmp_path / "out", tokenizer=tok_path, workers=1, progress=False)
  tok = data_lib.get_tokenizer(tok_path)
  expected = tok.encode_documents([d.encode() for d in docs])  # one stream, EOD after each document
  on_disk = data_lib.TokenFile(tmp_path / "out")
  np.testing.assert_array_equal(on_disk[:], expected)
  assert index["num_tokens"] == len(expected) and index["num_documents"] == 6
  assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
  starts = np.fromfile(tmp_path / "out" / "documents.bin", "<i8")
  ends = np.append(starts[1:], len(expected))
  assert all(expected[e - 1] == tok.eod_id for e in ends)  # each document ends at its EOD
  # Training from `paths` reads the same documents from the same file types.
  cfg = DataConfig(paths=inputs, tokenizer=tok_path)
  np.testing.assert_array_equal(data_lib.load_tokens(cfg), expected)


def test_prepare_in_parallel_equals_serial_and_splits_jsonl(tmp_path, monkeypatch):
  from jaxeff.data import prepared as prepared_lib

  rng = np.random.default_rng(0)
  lines = [json.dumps({"text": "".join(rng.choice(list("abcdefgh \n"), rng.integers(1, 300)))}) for _ in range(200)]
  (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
  (tmp_path / "small.txt").write_text("a text file")
  monkeypatch.setattr(prepared_lib, "CHUNK_BYTES", 4096)  # many jsonl pieces, cut mid-line
  inputs = [str(tmp_path / "big.jsonl"), str(tmp_path / "small.txt")]
  serial = data_lib.prepare(inputs, tmp_path / "serial", workers=1, progress=False)
  parallel = data_lib.prepare(inputs, tmp_path / "parallel", workers=2, progress=False)
  assert serial == parallel and serial["num_documents"] == 201
  for name in ("tokens.bin", "documents.bin"):
    assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


def test_dataset_batches_equal_in_memory_batches_and_resume_exactly(tmp_path, corpus):
  data_lib.prepare(corpus.paths, tmp_path / "prepared", workers=1, progress=False)
  disk = TextData.load(DataConfig(dataset=str(tmp_path / "prepared"), val_fraction=0.05))
  memory = TextData.load(corpus)
  assert isinstance(disk.train, data_lib.TokenFile) and len(disk.train) == len(memory.train)
  kw = dict(seq_len=16, batch_size=4)
  reference = _take(data_lib.train_iterator(memory, **kw), 40)
  it = data_lib.train_iterator(disk, **kw)
  _assert_batches_equal(_take(it, 25), reference[:25])
  state = json.loads(json.dumps(it.get_state()))
  fresh = data_lib.train_iterator(TextData.load(DataConfig(dataset=str(tmp_path / "prepared"))), **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 15), reference[25:])
  _assert_batches_equal(
    data_lib.val_batches(disk, seq_len=16, batch_size=2), data_lib.val_batches(memory, seq_len=16, batch_size=2)
  )


def test_each_process_reads_only_its_rows(tmp_path, corpus, monkeypatch):
  data_lib.prepare(corpus.paths, tmp_path / "prepared", workers=1, progress=False)
  data = TextData.load(DataConfig(dataset=str(tmp_path / "prepared")))
  read = []
  original = data_lib.TokenFile._read
  monkeypatch.setattr(
    data_lib.TokenFile, "_read", lambda self, offset, count: (read.append(count), original(self, offset, count))[1]
  )
  _take(data_lib.train_iterator(data, seq_len=16, batch_size=8, process_index=1, process_count=4), 10)
  assert sum(read) == 10 * (8 // 4) * 17  # 10 batches x 2 local rows x (seq_len + 1) tokens


def test_memory_stays_flat_on_a_corpus_many_times_the_batch(tmp_path):
  psutil = pytest.importorskip("psutil")
  from jaxeff.data import prepared as prepared_lib

  # A prepared directory written directly (prepare's own output is tested above): 128 MB of tokens.
  out = tmp_path / "prepared"
  out.mkdir()
  rng = np.random.default_rng(0)
  with open(out / "tokens.bin", "wb") as f:
    for _ in range(8):
      f.write(rng.integers(1, 256, 8 << 20, dtype=np.uint16).tobytes())
  num_tokens = 8 * (8 << 20)
  np.zeros(1, "<i8").tofile(out / "documents.bin")
  (out / "index.json").write_text(
    json.dumps(
      {
        "format": prepared_lib.FORMAT,
        "dtype": "uint16",
        "num_tokens": num_tokens,
        "num_documents": 1,
        "vocab_size": 256,
        "eod_id": 0,
        "tokenizer_sha256": None,
        "inputs": [],
      }
    )
  )
  before = psutil.Process().memory_info().rss
  data = TextData.load(DataConfig(dataset=str(out)))
  batches = _take(data_lib.train_iterator(data, seq_len=128, batch_size=8), 2000)  # ~2M tokens, random places
  grown = psutil.Process().memory_info().rss - before
  batch_bytes = sum(b["inputs"].nbytes + b["targets"].nbytes for b in batches)
  assert 2 * num_tokens > 10_000 * batches[0]["inputs"].nbytes  # the corpus is many times the batch
  # Neither the corpus (a memory-mapped reader would keep every touched page) nor a copy of it.
  assert grown < batch_bytes + (16 << 20), (grown, batch_bytes)


def test_prepare_cli_and_its_errors(tmp_path, capsys):
  from jaxeff.data.__main__ import main

  (tmp_path / "a.txt").write_text("hello world")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
  assert main(["prepare", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"), "--quiet"]) == 0
  assert "12 tokens" in capsys.readouterr().out
  assert data_lib.TokenFile(tmp_path / "out")[:].tolist() == [*b"hello world", 0]
  cases = [
    (["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out")], "never overwrites"),
    (["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o2")], "has no string field 'text'"),
    (["--input", str(tmp_path / "*.md"), "--output", str(tmp_path / "o3")], "matches no files"),
    (
      ["--input", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "t.json"), "--output", str(tmp_path / "o4")],
      "tokenizer file not found",
    ),
    (["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "o5"), "--workers", "0"], "--workers must be"),
  ]
  for args, message in cases:
    code = main(["prepare", "--quiet", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  # Nothing half-written: no output directories, no temporary ones left behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "bad.jsonl", "out"]


def test_dataset_errors(tmp_path):
  (tmp_path / "a.txt").write_text("some text " * 50)
  data_lib.prepare([str(tmp_path / "a.txt")], tmp_path / "prepared", workers=1, progress=False)
  with pytest.raises(DataError, match="not both"):
    DataConfig(paths=[str(tmp_path / "a.txt")], dataset=str(tmp_path / "prepared"))
  with pytest.raises(DataError, match="no index.json"):
    TextData.load(DataConfig(dataset=str(tmp_path)))
  tok = _bpe(tmp_path)
  with pytest.raises(DataError, match="prepared with bytes, but data.tokenizer is"):
    TextData.load(DataConfig(dataset=str(tmp_path / "prepared"), tokenizer=tok))
  with open(tmp_path / "prepared" / "tokens.bin", "r+b") as f:
    f.truncate(10)
  with pytest.raises(DataError, match="tokens.bin is missing or not"):
    TextData.load(DataConfig(dataset=str(tmp_path / "prepared")))
