"""Data pipeline: text files -> token stream -> packed, shuffled, sharded batches.

Usage::

  cfg = DataConfig(paths=["corpus/*.txt"])        # or DataConfig() for the built-in corpus
  it = train_iterator(cfg, seq_len=256, batch_size=32,
                      process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)              # {"inputs": int32[32 / P, 256], "targets": int32[32 / P, 256]}
  state = it.get_state()        # {"next_index": k}: JSON-serialisable, save it with the model
  it.set_state(state)           # exact resume, on a freshly built iterator too
  val = val_batches(cfg, seq_len=256, batch_size=32, max_batches=8)   # a fixed list of batches

Public API:

  `DataConfig`                  what to read and how to split it (fields below).
  `DataError(ValueError)`       bad input: missing file, glob matching nothing, empty or too-short
                                corpus, missing tokenizer.json, impossible batch layout.
  `get_tokenizer(cfg)`          `ByteTokenizer` or `HFTokenizer`: `encode`, `decode`, `vocab_size`,
                                `eod_id`.
  `vocab_size(cfg)`             size of the token vocabulary (256 for bytes).
  `load_tokens(cfg)`            the whole corpus as one int32 token stream.
  `TextData.load(cfg)`          the stream split into `train` / `val` arrays; every function below
                                also accepts a `TextData`, so the corpus is tokenized only once.
  `train_iterator(...)`         infinite, seeded, checkpointable iterator of process-local batches.
  `val_batches(...)`            finite list of process-local validation batches, in corpus order.

Corpus. `paths` lists files and/or globs (`**` recurses), read in the given order, each glob's
matches sorted. With `paths=None` the corpus is the running interpreter's standard-library `*.py`
source (test packages and site-packages left out, sorted by path, whole files up to
`max_corpus_bytes`), so training works on a fresh machine without downloading anything.

Tokens. Without a tokenizer, tokens are the raw UTF-8 bytes (vocab 256) and documents end with
byte 0 (NUL), which text files do not contain. With `tokenizer="path/tokenizer.json"` (a Hugging
Face `tokenizers` file, read locally) documents end with the tokenizer's end-of-text token
(`<|endoftext|>`, `<|end_of_text|>`, `</s>` or `<eos>`, the first one it has); a tokenizer with
none of these concatenates documents without a separator.

Split. By position in the token stream: the last `val_fraction` of the tokens is validation, the
rest training, so the two never share a token (with the default corpus, validation is the
alphabetically last stdlib modules).

Packing. A split of n tokens is cut into (n - 1) // seq_len windows of seq_len + 1 tokens that
overlap by one token; window k gives inputs = tokens[k*L : k*L + L] and targets shifted by one.
Training shuffles the windows with `seed` (grain's `MapDataset.shuffle`) and repeats forever with
a new permutation each epoch; batches may straddle an epoch boundary.

Multi-process layout. Global batch b holds rows b*B ... b*B + B - 1 of the window stream
(B = `batch_size`). With P processes, process p gets the contiguous block of rows
[p*B/P, (p+1)*B/P) of every global batch, so stacking the processes' batches in process order
gives the global batch. That is the layout `jax.make_array_from_process_local_data` expects for a
batch axis sharded over a mesh whose devices are grouped by process (`jax.make_mesh` does this).
Each process reads and tokenizes the whole corpus (fine for the corpus sizes this is meant for).

State. The training iterator is a grain `DatasetIterator`; `get_state()` returns
`{"next_index": <global batches consumed>}`. Save it as JSON (orbax `ocp.args.JsonSave`, or
`grain.checkpoint.CheckpointSave(it)`), rebuild the iterator with the same config, and
`set_state` it to continue bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import pathlib
import sysconfig
from collections.abc import Sequence

import grain
import numpy as np

BYTE_VOCAB_SIZE = 256
BYTE_EOD_ID = 0  # NUL: never appears in text files, so it is free to mark document ends.
# End-of-text tokens of common tokenizers (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma).
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
# Standard-library directories that are not ordinary library source.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                               "__pycache__"})
# The data lives in memory: grain recommends no reader threads, and batches are cheap to gather.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class DataError(ValueError):
  """The data cannot be read or does not fit the requested batches; the message says why."""


@dataclasses.dataclass
class DataConfig:
  """Which text to train on and how to split it."""

  paths: list[str] | None = None  # files or globs; None -> the embedded stdlib corpus
  tokenizer: str | None = None  # path to a tokenizer.json; None -> bytes (vocab 256)
  val_fraction: float = 0.05  # tail of the token stream held out for validation
  max_corpus_bytes: int = 16_000_000  # cap on the default corpus (keeps startup fast)
  seed: int = 0  # shuffle seed, 0 <= seed < 2**32

  def __post_init__(self):
    if isinstance(self.paths, (str, os.PathLike)):
      self.paths = [self.paths]
    if self.paths is not None:
      self.paths = [os.fspath(p) for p in self.paths]
      if not self.paths:
        raise DataError("data.paths is an empty list; give files or globs, or null for the default corpus")
    if not 0.0 <= self.val_fraction < 1.0:
      raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
    if self.max_corpus_bytes <= 0:
      raise DataError(f"data.max_corpus_bytes must be positive, got {self.max_corpus_bytes}")
    if not 0 <= self.seed < 2**32:
      raise DataError(f"data.seed must be in [0, 2**32), got {self.seed}")


# ---------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
  """UTF-8 bytes as tokens; documents end with byte 0."""

  vocab_size = BYTE_VOCAB_SIZE
  eod_id = BYTE_EOD_ID

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return np.asarray(ids, np.uint8).tobytes().decode("utf-8", errors="replace")

  def encode_documents(self, docs: Sequence[bytes]) -> np.ndarray:
    """All documents as one stream, each followed by `eod_id`."""
    sep = bytes([self.eod_id])
    return self.encode(sep.join(docs) + sep)


class HFTokenizer:
  """A local Hugging Face `tokenizer.json`, through the `tokenizers` library."""

  def __init__(self, path: str | os.PathLike):
    import tokenizers  # Imported here: byte-level runs do not need it.

    path = pathlib.Path(path)
    if not path.is_file():
      raise DataError(f"tokenizer file not found: {path}")
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # The Rust parser raises a bare Exception.
      raise DataError(f"cannot read tokenizer {path}: {e}") from None
    self.path = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = (self._tok.token_to_id(t) for t in EOD_TOKENS)
    self.eod_id = next((i for i in ids if i is not None), None)

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def encode_documents(self, docs: Sequence[bytes]) -> np.ndarray:
    """All documents as one stream, each followed by `eod_id` (when the tokenizer has one)."""
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets
    tail = [] if self.eod_id is None else [self.eod_id]
    parts = [np.asarray(e.ids + tail, np.int32) for e in encode(texts, add_special_tokens=False)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def get_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
  """The tokenizer `cfg` names: bytes by default, else its tokenizer.json."""
  return ByteTokenizer() if cfg.tokenizer is None else HFTokenizer(cfg.tokenizer)


def vocab_size(cfg: DataConfig | TextData) -> int:
  """Number of token ids (256 for bytes, the tokenizer's size with added tokens otherwise)."""
  if isinstance(cfg, TextData):
    return cfg.vocab_size
  return get_tokenizer(cfg).vocab_size


# ---------------------------------------------------------------------------- corpus


def default_corpus_files(max_bytes: int) -> list[pathlib.Path]:
  """The interpreter's stdlib `*.py` files, sorted by path, whole files up to `max_bytes`."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune the walk
    found += [pathlib.Path(dirpath, f) for f in filenames if f.endswith(".py")]
  found.sort(key=lambda p: p.relative_to(root).as_posix())  # os.walk order is filesystem-dependent
  files, total = [], 0
  for path in found:
    size = path.stat().st_size
    if total + size > max_bytes:
      break
    files.append(path)
    total += size
  if not files:
    raise DataError(f"no standard-library source found under {root} within "
                    f"max_corpus_bytes={max_bytes}; pass data.paths")
  return files


def resolve_paths(paths: Sequence[str]) -> list[pathlib.Path]:
  """Files named by `paths` (files or globs), in order, each glob sorted, without repeats."""
  files = {}  # A dict keeps first-seen order while dropping files named twice.
  for pattern in paths:
    if any(c in pattern for c in "*?["):  # a glob, not a file name
      matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                       if os.path.isfile(m))
      if not matches:
        raise DataError(f"data path glob {pattern!r} matches no files")
    else:
      path = pathlib.Path(pattern).expanduser()
      if path.is_dir():
        raise DataError(f"data path {pattern} is a directory; use a glob such as '{pattern}/**/*.txt'")
      if not path.is_file():
        raise DataError(f"data path not found: {pattern}")
      matches = [str(path)]
    files.update(dict.fromkeys(pathlib.Path(m) for m in matches))
  return list(files)


def corpus_files(cfg: DataConfig) -> list[pathlib.Path]:
  """The files `cfg` reads: its `paths`, or the default stdlib corpus."""
  return default_corpus_files(cfg.max_corpus_bytes) if cfg.paths is None else resolve_paths(cfg.paths)


def load_tokens(cfg: DataConfig) -> np.ndarray:
  """The whole corpus as one int32 token stream, each document followed by the end-of-document id."""
  tokenizer = get_tokenizer(cfg)  # First: a missing tokenizer.json fails before any reading.
  files = corpus_files(cfg)
  # File sizes and mtimes are part of the key so an edited file is read again.
  key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
  tok_key = None if cfg.tokenizer is None else (str(tokenizer.path.resolve()), tokenizer.path.stat().st_mtime_ns)
  return _load_tokens_cached(key, tok_key)


@functools.lru_cache(maxsize=2)
def _load_tokens_cached(files: tuple, tok_key: tuple | None) -> np.ndarray:
  """Reads and tokenizes; cached so `train_iterator` and `val_batches` tokenize once."""
  tokenizer = ByteTokenizer() if tok_key is None else HFTokenizer(tok_key[0])
  docs = [d for d in (pathlib.Path(name).read_bytes() for name, _, _ in files) if d]
  if not docs:
    names = ", ".join(pathlib.Path(f[0]).name for f in files[:3]) + (", ..." if len(files) > 3 else "")
    raise DataError(f"empty corpus: the data files ({names}) hold no text")
  tokens = tokenizer.encode_documents(docs)
  tokens.flags.writeable = False  # Shared by every caller of the cache.
  return tokens


# ---------------------------------------------------------------------------- splits and batches


@dataclasses.dataclass
class TextData:
  """A tokenized corpus split by position: `train` is the head, `val` the tail."""

  train: np.ndarray  # int32 tokens
  val: np.ndarray  # int32 tokens
  vocab_size: int
  seed: int = 0

  @classmethod
  def load(cls, cfg: DataConfig) -> TextData:
    tokens = load_tokens(cfg)
    num_val = round(len(tokens) * cfg.val_fraction)
    if cfg.val_fraction > 0:
      num_val = max(num_val, 1)  # too small a split should fail loudly in val_batches, not vanish
    split = len(tokens) - num_val
    return cls(train=tokens[:split], val=tokens[split:], vocab_size=vocab_size(cfg), seed=cfg.seed)


def _as_data(data: DataConfig | TextData) -> TextData:
  return data if isinstance(data, TextData) else TextData.load(data)


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of each global batch that process `process_index` owns."""
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _num_windows(tokens: np.ndarray, seq_len: int, split: str) -> int:
  """How many packed sequences a split holds; a DataError if not even one."""
  if seq_len <= 0:
    raise DataError(f"seq_len must be positive, got {seq_len}")
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise DataError(f"corpus too short: the {split} split has {len(tokens)} tokens, fewer than "
                    f"seq_len + 1 = {seq_len + 1} needed for one sequence")
  return n


def _windows(tokens: np.ndarray, ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Packed sequences `ids` as a batch: inputs and the targets one token later."""
  rows = tokens[ids[:, None] * seq_len + np.arange(seq_len + 1)]  # one vectorized gather
  return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


def train_dataset(data: DataConfig | TextData, *, seq_len: int, batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The infinite training stream as a grain `MapDataset` of process-local batches."""
  data = _as_data(data)
  rows = _local_rows(batch_size, process_index, process_count)
  tokens = data.train
  ds = grain.MapDataset.range(_num_windows(tokens, seq_len, "train"))
  ds = ds.shuffle(seed=data.seed).repeat()  # `repeat` reseeds the shuffle every epoch.
  ds = ds.batch(batch_size, drop_remainder=True)  # global batches of window ids
  return ds.map(lambda ids: _windows(tokens, ids[rows], seq_len))


def train_iterator(data: DataConfig | TextData, *, seq_len: int, batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this process's rows of each global batch; has get_state/set_state."""
  ds = train_dataset(data, seq_len=seq_len, batch_size=batch_size,
                     process_index=process_index, process_count=process_count)
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


def val_batches(data: DataConfig | TextData, *, seq_len: int, batch_size: int,
                max_batches: int | None = None, process_index: int = 0,
                process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Validation batches in corpus order (same every call); [] when `val_fraction` is 0."""
  data = _as_data(data)
  rows = _local_rows(batch_size, process_index, process_count)
  tokens = data.val
  if len(tokens) == 0:
    return []
  ds = grain.MapDataset.range(_num_windows(tokens, seq_len, "validation"))
  ds = ds.batch(batch_size, drop_remainder=True)  # equal shapes: one compiled eval step
  if len(ds) == 0:
    raise DataError(f"validation split too short: {len(tokens)} tokens make fewer than "
                    f"batch_size={batch_size} sequences of {seq_len}; raise data.val_fraction "
                    f"or lower batch_size/seq_len")
  ds = ds.map(lambda ids: _windows(tokens, ids[rows], seq_len))
  count = len(ds) if max_batches is None else min(len(ds), max_batches)
  return [ds[i] for i in range(count)]
