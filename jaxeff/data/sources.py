"""What to read: `DataConfig`, the corpus files, and the documents inside them.

Documents by file type: a `.jsonl` file holds one JSON object per line with a `text` field; a
`.parquet` file a `text` column (read with pyarrow, one row group at a time); any other file is
one document of text. The default corpus (`paths=None`) is the running interpreter's
standard-library `*.py` source (test packages and site-packages left out, sorted by path, whole
files up to `max_corpus_bytes`), so training works on a fresh machine without downloading.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator, Sequence

from jaxeff.errors import DataError

# Standard-library directories that are not ordinary library source.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass
class DataConfig:
  """Which text to train on and how to split it.

  Give at most one of `paths` (files tokenized in memory at start: fine for corpora of some
  hundred MB) and `dataset` (a directory made by `python -m jaxeff.data prepare`: read from disk,
  any size); with neither, the embedded corpus.
  """

  paths: list[str] | None = None  # files or globs; None -> the embedded stdlib corpus
  dataset: str | None = None  # a prepared token directory (python -m jaxeff.data prepare)
  tokenizer: str | None = None  # path to a tokenizer.json; None -> bytes (vocab 256)
  val_fraction: float = 0.05  # tail of the token stream held out for validation
  max_corpus_bytes: int = 16_000_000  # cap on the default corpus (keeps startup fast)
  seed: int = 0  # shuffle seed, 0 <= seed < 2**32
  format: str = "text"  # "text": documents packed into windows; "chat": JSONL conversations (jaxeff.data.chat)
  truncate: bool = False  # chat: cut records longer than seq_len + 1 tokens (else they are skipped and counted)
  pack: bool = True  # chat: several conversations per row, masked from each other; false: one padded row each

  def __post_init__(self):
    if isinstance(self.paths, (str, os.PathLike)):
      self.paths = [self.paths]
    if self.paths is not None:
      self.paths = [os.fspath(p) for p in self.paths]
      if not self.paths:
        raise DataError("data.paths is an empty list; give files or globs, or null for the default corpus")
    if self.paths is not None and self.dataset is not None:
      raise DataError("give data.paths (text files) or data.dataset (a prepared directory), not both")
    if not 0.0 <= self.val_fraction < 1.0:
      raise DataError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
    if self.max_corpus_bytes <= 0:
      raise DataError(f"data.max_corpus_bytes must be positive, got {self.max_corpus_bytes}")
    if self.format not in ("text", "chat"):
      raise DataError(f"data.format must be text or chat, got {self.format!r}")
    if not 0 <= self.seed < 2**32:
      raise DataError(f"data.seed must be in [0, 2**32), got {self.seed}")


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
    raise DataError(
      f"no standard-library source found under {root} within max_corpus_bytes={max_bytes}; pass data.paths"
    )
  return files


def resolve_paths(paths: Sequence[str]) -> list[pathlib.Path]:
  """Files named by `paths` (files or globs), in order, each glob sorted, without repeats."""
  files = {}  # A dict keeps first-seen order while dropping files named twice.
  for pattern in paths:
    if any(c in pattern for c in "*?["):  # a glob, not a file name
      matches = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(m))
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


# ---------------------------------------------------------------------------- documents


def jsonl_lines(path: pathlib.Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
  """(byte offset, line) of the non-blank lines that begin in bytes [start, stop) of a file."""
  with open(path, "rb") as f:
    if start:
      f.seek(start - 1)
      f.readline()  # the line holding byte start-1 belongs to the previous range
    while stop is None or f.tell() < stop:
      offset = f.tell()
      line = f.readline()
      if not line:
        break
      if line.strip():
        yield offset, line


def _jsonl_documents(path: pathlib.Path, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
  """`text` fields of the lines that begin in bytes [start, stop) of a JSON-lines file."""
  for offset, line in jsonl_lines(path, start, stop):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: a line near byte {offset} is not valid JSON ({e.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
      raise DataError(f"{path}: the line at byte {offset} has no string field 'text'")
    yield text.encode("utf-8")


def _parquet_file(path: pathlib.Path):
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
  try:
    f = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid and OSError variants
    raise DataError(f"cannot read parquet file {path}: {e}") from None
  if "text" not in f.schema_arrow.names:
    raise DataError(f"{path} has no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
  return f


def _parquet_documents(path: pathlib.Path, row_group: int | None = None) -> Iterator[bytes]:
  f = _parquet_file(path)
  groups = range(f.num_row_groups) if row_group is None else [row_group]
  for g in groups:
    for text in f.read_row_group(g, columns=["text"]).column("text").to_pylist():
      if text:
        yield text.encode("utf-8")


def iter_documents(path: pathlib.Path) -> Iterator[bytes]:
  """The documents of one file (see the module docstring), as UTF-8 bytes, empty ones skipped."""
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    yield from (d for d in _jsonl_documents(path) if d)
  elif suffix == ".parquet":
    yield from _parquet_documents(path)
  else:
    data = path.read_bytes()
    if data:
      yield data


def work_units(path: pathlib.Path, chunk_bytes: int) -> list[tuple]:
  """Independent pieces of a file for parallel tokenization, in document order:
  ("file", path) | ("jsonl", path, start, stop) | ("parquet", path, row_group)."""
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    size = path.stat().st_size
    return [("jsonl", path, s, min(s + chunk_bytes, size)) for s in range(0, max(size, 1), chunk_bytes)]
  if suffix == ".parquet":
    return [("parquet", path, g) for g in range(_parquet_file(path).num_row_groups)]
  return [("file", path)]


def unit_documents(unit: tuple) -> Iterator[bytes]:
  """The documents of one work unit."""
  kind, path = unit[0], unit[1]
  if kind == "jsonl":
    yield from (d for d in _jsonl_documents(path, unit[2], unit[3]) if d)
  elif kind == "parquet":
    yield from _parquet_documents(path, unit[2])
  else:
    yield from iter_documents(path)
