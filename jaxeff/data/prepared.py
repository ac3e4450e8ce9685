"""Pre-tokenized corpora on disk: `prepare` writes one, `TokenFile` reads it by random access.

  python -m jaxeff.data prepare --input 'corpus/**/*.jsonl' --tokenizer tokenizer.json --output data/c4
  python -m jaxeff.train --config configs/1b.yaml data.dataset=data/c4

A prepared directory (nanoGPT's idea: a flat token array on disk, plus an index):

  tokens.bin     every document's tokens followed by the end-of-document id, concatenated in input
                 order; little-endian uint16 when the vocabulary fits, else uint32
  documents.bin  int64 start offset (in tokens) of every document
  index.json     format, dtype, token and document counts, vocab size, end-of-document id, the
                 tokenizer's SHA-256 (null for bytes) and the input files

Tokenization runs once, in parallel worker processes (one tokenizer each), over independent
pieces of the input: a text file, a 64 MB byte range of a JSON-lines file, a parquet row group.
Each piece is written to its own part file, then the parts are joined in input order, so the
result does not depend on the number of workers. Everything is written to a temporary directory
and renamed into place at the end: an interrupted run leaves no half-written dataset.

Reading: `TokenFile` never maps or loads the file; each window is one `os.pread`, so memory
stays flat whatever the corpus size, and each process reads only the rows it feeds.

Chat data (`prepare(..., format="chat")`, JSON-lines conversations as `jaxeff.data.chat` reads
them, rendered with the chat template beside the tokenizer.json): the same files, one document
per conversation (no end-of-document id: the template closes each turn), plus `loss_mask.bin`
(uint8 per token, 1 on assistant tokens); the index says `"kind": "chat"` and counts the records
read and skipped by reason. Lengths are checked against seq_len when training loads it
(`read_chat`), since one prepared set serves any seq_len.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np

from jaxeff.data.chat import BadRecord, check_chat_template, encode_record, skipped_summary
from jaxeff.data.sources import DataError, jsonl_lines, resolve_paths, unit_documents, work_units
from jaxeff.data.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

FORMAT = "jaxeff.tokens/1"
CHUNK_BYTES = 64 << 20  # text per JSON-lines work unit
_DOCS_PER_ENCODE = 1024  # documents tokenized per call (bounds a worker's memory)


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned dtype that holds every token id."""
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


# ---------------------------------------------------------------------------- writing

_worker_tokenizer = None


def _init_worker(tokenizer_path):
  global _worker_tokenizer
  _worker_tokenizer = get_tokenizer(tokenizer_path)


def _tokenize_chat_unit(job) -> tuple[str, list[int], dict, int]:
  """Tokenizes the conversations of one JSON-lines byte range into its part files (tokens and
  loss mask); returns (part path, conversation lengths, skipped reasons, records read)."""
  unit, part_path, dtype = job
  _, path, start, stop = unit
  lengths, skipped, total = [], collections.Counter(), 0
  with open(part_path, "wb") as out, open(part_path + ".mask", "wb") as out_mask:
    for _, line in jsonl_lines(path, start, stop):
      total += 1
      try:
        ids, mask = encode_record(line, _worker_tokenizer)
      except BadRecord as e:
        skipped[str(e)] += 1
        continue
      lengths.append(len(ids))
      out.write(ids.astype(dtype).tobytes())
      out_mask.write(mask.astype(np.uint8).tobytes())
  return part_path, lengths, dict(skipped), total


def _tokenize_unit(job) -> tuple[str, list[int]]:
  """Tokenizes one work unit into its part file; returns (part path, document lengths)."""
  unit, part_path, dtype = job
  lengths, batch = [], []
  with open(part_path, "wb") as out:

    def flush():
      for ids in _worker_tokenizer.encode_each(batch):
        lengths.append(len(ids))
        out.write(ids.astype(dtype).tobytes())
      batch.clear()

    for doc in unit_documents(unit):
      batch.append(doc)
      if len(batch) >= _DOCS_PER_ENCODE:
        flush()
    flush()
  return part_path, lengths


def prepare(
  inputs: Sequence[str],
  output: str | os.PathLike,
  tokenizer: str | None = None,
  workers: int | None = None,
  progress: bool = True,
  format: str = "text",
) -> dict:
  """Tokenizes `inputs` once into a prepared directory `output` (see the module docstring).

  Args:
    inputs: files or globs (`**` recurses): text, `.jsonl` (a `text` field per line), `.parquet`
      (a `text` column); for `format="chat"`, `.jsonl` conversations only.
    output: the directory to create; an existing non-empty one is an error (never overwritten).
    tokenizer: a tokenizer.json; None: UTF-8 bytes (vocab 256), as in training. Chat data needs
      the model's, with its chat template beside it (tokenizer_config.json).
    workers: tokenizer processes (default: the CPU count).
    progress: log one line per finished piece (logger jaxeff.data.prepared, level INFO).
    format: "text" (documents) or "chat" (conversations with a loss mask; bad records are
      counted in the index and reported in one log line).

  Returns:
    The index (also written to `output/index.json`).

  Raises:
    DataError: missing inputs or tokenizer, unreadable or malformed files, an empty corpus,
      an existing output.
  """
  output = pathlib.Path(output)
  if format not in ("text", "chat"):
    raise DataError(f"format must be text or chat, got {format!r}")
  chat = format == "chat"
  if output.exists() and (not output.is_dir() or any(output.iterdir())):
    raise DataError(f"output {output} already exists; prepare never overwrites (choose a new directory)")
  if chat and tokenizer is None:
    raise DataError("chat data needs the model's tokenizer.json (--tokenizer), with its chat template beside it")
  tok = get_tokenizer(tokenizer)  # here first: a bad tokenizer fails before any work
  if chat:
    check_chat_template(tok, pathlib.Path(tokenizer).parent)  # a missing template fails here too
  files = resolve_paths(list(inputs))
  if chat and any(f.suffix.lower() != ".jsonl" for f in files):
    odd = next(f for f in files if f.suffix.lower() != ".jsonl")
    raise DataError(f"chat data is read from .jsonl files (one conversation per line), not {odd}")
  units = [u for f in files for u in work_units(f, CHUNK_BYTES)]
  dtype = token_dtype(tok.vocab_size)
  output.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
  try:
    jobs = [(u, str(tmp / f"part-{i:06d}.bin"), dtype) for i, u in enumerate(units)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    results = []
    work = _tokenize_chat_unit if chat else _tokenize_unit
    if workers == 1:
      _init_worker(tokenizer)
      done = map(work, jobs)
    else:
      # "spawn": forking a process that may already run jax's threads can deadlock.
      pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(tokenizer,)
      )
      done = pool.map(work, jobs)  # map keeps input order
    try:
      for i, result in enumerate(done):
        results.append(result)
        if progress:
          log.info("prepare: %d/%d pieces tokenized (%s)", i + 1, len(jobs), jobs[i][0][1].name)
    finally:
      if workers > 1:
        pool.shutdown(cancel_futures=True)
    lengths = np.asarray([n for r in results for n in r[1]], np.int64)
    skipped, records = collections.Counter(), 0
    for r in results if chat else ():
      skipped.update(r[2])
      records += r[3]
    if skipped:
      log.warning("prepare: %s", skipped_summary(skipped, records))
    if lengths.sum() == 0:
      raise DataError(
        f"empty corpus: the input files ({', '.join(f.name for f in files[:3])}"
        f"{', ...' if len(files) > 3 else ''}) hold no {'usable conversation' if chat else 'text'}"
      )
    for name, suffix in (("tokens.bin", ""), ("loss_mask.bin", ".mask")) if chat else (("tokens.bin", ""),):
      with open(tmp / name, "wb") as out:
        for r in results:
          with open(r[0] + suffix, "rb") as f:
            shutil.copyfileobj(f, out, 16 << 20)
          os.remove(r[0] + suffix)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<i8")
    starts.tofile(tmp / "documents.bin")
    index = {
      "format": FORMAT,
      "dtype": dtype.name,
      "num_tokens": int(lengths.sum()),
      "num_documents": len(lengths),
      "vocab_size": tok.vocab_size,
      "eod_id": tok.eod_id,
      "tokenizer_sha256": tok.fingerprint,
      "inputs": [str(f) for f in files],
      "kind": format,
    }
    if chat:
      index.update(records=records, skipped=dict(skipped))
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    if output.exists():
      output.rmdir()  # empty (checked above)
    tmp.rename(output)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return index


# ---------------------------------------------------------------------------- reading


class TokenFile:
  """Tokens [start, stop) of a prepared directory's `tokens.bin`, read on demand.

  Picklable (the file is reopened lazily), so grain worker processes can hold one.
  """

  def __init__(self, directory: str | os.PathLike, start: int = 0, stop: int | None = None):
    self.directory = pathlib.Path(directory)
    self.index = read_index(self.directory)
    self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
    n = self.index["num_tokens"]
    self.start, self.stop = start, n if stop is None else stop
    if not 0 <= self.start <= self.stop <= n:
      raise ValueError(f"token range [{start}, {stop}) outside [0, {n}]")
    self._fd = None

  def __len__(self) -> int:
    return self.stop - self.start

  def view(self, start: int, stop: int) -> TokenFile:
    """Tokens [start, stop) of this range, still on disk."""
    out = TokenFile.__new__(TokenFile)
    out.__dict__.update(self.__dict__, start=self.start + start, stop=self.start + stop, _fd=None)
    return out

  def _read(self, offset: int, count: int) -> np.ndarray:
    if self._fd is None:
      self._fd = os.open(self.directory / "tokens.bin", os.O_RDONLY)
    size = self.dtype.itemsize
    raw = os.pread(self._fd, count * size, (self.start + offset) * size)
    if len(raw) != count * size:
      raise DataError(f"{self.directory / 'tokens.bin'} is shorter than its index says (truncated?)")
    return np.frombuffer(raw, self.dtype)

  def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
    """int32 [len(starts), length]: the tokens from each start."""
    out = np.empty((len(starts), length), np.int32)
    for i, s in enumerate(np.asarray(starts)):
      out[i] = self._read(int(s), length)
    return out

  def __getitem__(self, item: slice) -> np.ndarray:
    start, stop, step = item.indices(len(self))
    return self._read(start, max(stop - start, 0))[::step].astype(np.int32)

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)


def read_index(directory: pathlib.Path) -> dict:
  """A prepared directory's index.json, checked; DataError naming what is wrong otherwise."""
  path = directory / "index.json"
  if not directory.is_dir():
    raise DataError(f"data.dataset {directory} is not a directory (make one with python -m jaxeff.data prepare)")
  if not path.is_file():
    raise DataError(f"data.dataset {directory} has no index.json (not made by python -m jaxeff.data prepare)")
  try:
    index = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path} is not valid JSON: {e}") from None
  if index.get("format") != FORMAT:
    raise DataError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}")
  expected = index["num_tokens"] * np.dtype(index["dtype"]).itemsize
  tokens = directory / "tokens.bin"
  if not tokens.is_file() or tokens.stat().st_size != expected:
    raise DataError(f"{tokens} is missing or not {expected} bytes as index.json says")
  return index


def check_tokenizer(index: dict, tokenizer: Tokenizer, directory: pathlib.Path) -> None:
  """DataError unless `tokenizer` is the one `directory` was prepared with."""
  if index["tokenizer_sha256"] != tokenizer.fingerprint:
    made = "bytes" if index["tokenizer_sha256"] is None else "a tokenizer.json"
    given = "bytes" if tokenizer.fingerprint is None else str(getattr(tokenizer, "path", "a tokenizer.json"))
    raise DataError(
      f"data.dataset {directory} was prepared with {made}, but data.tokenizer is {given}; "
      f"drop data.tokenizer or prepare the dataset again"
    )


def read_chat(directory: pathlib.Path, tokenizer: str | None) -> tuple[list, collections.Counter, int, int]:
  """A prepared chat directory's conversations: ([(ids int32, mask bool)], skipped reasons counted
  at prepare, records read, vocab size). `tokenizer` (data.tokenizer), when given, must be the one
  it was prepared with."""
  index = read_index(directory)
  if index.get("kind", "text") != "chat":
    raise DataError(f"data.dataset {directory} holds text documents, not chat conversations; set data.format=text")
  if tokenizer is not None:
    check_tokenizer(index, get_tokenizer(tokenizer), directory)
  tokens = np.fromfile(directory / "tokens.bin", np.dtype(index["dtype"]).newbyteorder("<")).astype(np.int32)
  mask = np.fromfile(directory / "loss_mask.bin", np.uint8).astype(bool)
  if len(mask) != len(tokens):
    raise DataError(f"{directory / 'loss_mask.bin'} does not hold one byte per token (truncated?)")
  starts = np.fromfile(directory / "documents.bin", "<i8")
  bounds = np.append(starts, len(tokens))
  conversations = [(tokens[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
  return (
    conversations,
    collections.Counter(index.get("skipped", {})),
    index.get("records", len(conversations)),
    index["vocab_size"],
  )
