"""Token streams -> packed, shuffled, process-sharded batches (grain).

Split. By position in the token stream: the last `val_fraction` of the tokens is validation, the
rest training, so the two never share a token.

Packing. A split of n tokens is cut into (n - 1) // seq_len windows of seq_len + 1 tokens that
overlap by one token; window k gives inputs = tokens[k*L : k*L + L] and targets shifted by one.
Training shuffles the window ids with `seed` (grain's `MapDataset.shuffle`: an index permutation,
O(1) memory) and repeats forever with a new permutation each epoch; batches may straddle an epoch
boundary.

Multi-process layout. Global batch b holds rows b*B ... b*B + B - 1 of the window stream
(B = `batch_size`). With P processes, process p gets the contiguous block of rows
[p*B/P, (p+1)*B/P) of every global batch, and reads only those windows. Stacking the processes'
batches in process order gives the global batch: the layout
`jax.make_array_from_process_local_data` expects for a batch axis sharded over a mesh whose
devices are grouped by process (`jax.make_mesh` does this).

State. The training iterator is a grain `DatasetIterator`; `get_state()` returns
`{"next_index": <global batches consumed>}`; `set_state` on a freshly built iterator with the
same config continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING

import numpy as np

from jaxeff.data.chat import ChatData, check_chat_template, read_conversations
from jaxeff.data.prepared import TokenFile, check_tokenizer, read_chat, read_index, token_dtype
from jaxeff.data.sources import DataConfig, DataError, corpus_files, iter_documents
from jaxeff.data.tokenizer import Tokenizer, get_tokenizer

if TYPE_CHECKING:  # annotations only: grain is imported where batches are built
  import grain


def _grain():
  # Imported where batches are built, so `import jaxeff.data` (configs, tokenizers) needs no grain.
  import grain

  return grain


def load_tokens(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> np.ndarray:
  """The corpus of `cfg.paths` (or the default corpus) as one int32 stream, each document
  followed by the end-of-document id. Tokenizes in memory: for large corpora use `prepare`."""
  tokenizer = tokenizer or get_tokenizer(cfg.tokenizer)  # first: a missing tokenizer.json fails early
  files = corpus_files(cfg)
  docs = [d for f in files for d in iter_documents(f)]
  if not docs:
    names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
    raise DataError(f"empty corpus: the data files ({names}) hold no text")
  return tokenizer.encode_documents(docs)


@dataclasses.dataclass
class TextData:
  """A token stream split by position: `train` is the head, `val` the tail.

  `train` / `val` are token arrays (corpora tokenized in memory, uint16 or uint32) or `TokenFile`
  ranges (a prepared directory, read on demand); batches are int32 either way. Build it once per
  run (`TextData.load`): the tokenizer is built once.
  """

  train: np.ndarray | TokenFile
  val: np.ndarray | TokenFile
  vocab_size: int
  seed: int = 0

  @classmethod
  def load(cls, cfg: DataConfig) -> TextData:
    """Reads (or, for `cfg.dataset`, opens) the corpus `cfg` names and splits it."""
    tokenizer = get_tokenizer(cfg.tokenizer)
    if cfg.dataset is not None:
      directory = pathlib.Path(cfg.dataset)
      index = read_index(directory)
      if index.get("kind", "text") != "text":
        raise DataError(f"data.dataset {directory} holds chat conversations; set data.format=chat")
      if cfg.tokenizer is not None:
        check_tokenizer(index, tokenizer, directory)
      tokens, vocab = TokenFile(directory), index["vocab_size"]
    else:
      # Held as the smallest dtype that fits (uint16 for most vocabularies): half of int32's RAM.
      vocab = tokenizer.vocab_size
      tokens = load_tokens(cfg, tokenizer).astype(token_dtype(vocab))
    num_val = round(len(tokens) * cfg.val_fraction)
    if cfg.val_fraction > 0:
      num_val = max(num_val, 1)  # too small a split should fail loudly in val_batches, not vanish
    split = len(tokens) - num_val
    if isinstance(tokens, TokenFile):
      return cls(train=tokens.view(0, split), val=tokens.view(split, len(tokens)), vocab_size=vocab, seed=cfg.seed)
    return cls(train=tokens[:split], val=tokens[split:], vocab_size=vocab, seed=cfg.seed)


def load_chat(cfg: DataConfig, seq_len: int, tokenizer: Tokenizer | None = None) -> ChatData:
  """`ChatData` rows of `seq_len + 1` tokens from the JSONL files of `cfg.paths` (rendered with
  the chat template of `tokenizer`, default `cfg.tokenizer`'s), or from the prepared chat directory
  `cfg.dataset`."""
  if cfg.dataset is not None:
    conversations, skipped, total, vocab = read_chat(pathlib.Path(cfg.dataset), cfg.tokenizer)
  else:
    if not cfg.paths:
      raise DataError("data.format=chat reads JSONL files (data.paths) or a prepared chat data.dataset")
    if cfg.tokenizer is None:
      raise DataError("data.format=chat needs the model's tokenizer and chat template (data.tokenizer, or init_from)")
    tokenizer = tokenizer or get_tokenizer(cfg.tokenizer)
    check_chat_template(tokenizer, pathlib.Path(cfg.tokenizer).parent)
    conversations, skipped, total = read_conversations(cfg.paths, tokenizer)
    vocab = tokenizer.vocab_size
  return ChatData.build(conversations, skipped, total, vocab, cfg, seq_len)


def load_data(cfg: DataConfig, seq_len: int) -> TextData | ChatData:
  """The run's data: `TextData` (data.format=text) or `ChatData` rows of `seq_len + 1` (chat)."""
  return load_chat(cfg, seq_len) if cfg.format == "chat" else TextData.load(cfg)


def vocab_size(data: DataConfig | TextData | ChatData) -> int:
  """Number of token ids (256 for bytes, the tokenizer's size with added tokens otherwise)."""
  if isinstance(data, (TextData, ChatData)):
    return data.vocab_size
  if data.dataset is not None:
    return read_index(pathlib.Path(data.dataset))["vocab_size"]
  return get_tokenizer(data.tokenizer).vocab_size


def _as_data(data: DataConfig | TextData | ChatData) -> TextData | ChatData:
  return data if isinstance(data, (TextData, ChatData)) else TextData.load(data)


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


def _num_windows(tokens, seq_len: int, split: str) -> int:
  """How many packed sequences a split holds; a DataError if not even one."""
  if seq_len <= 0:
    raise DataError(f"seq_len must be positive, got {seq_len}")
  n = (len(tokens) - 1) // seq_len
  if n < 1:
    raise DataError(
      f"corpus too short: the {split} split has {len(tokens)} tokens, fewer than "
      f"seq_len + 1 = {seq_len + 1} needed for one sequence"
    )
  return n


def _windows(tokens, ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """Packed sequences `ids` as a batch: inputs and the targets one token later."""
  if isinstance(tokens, TokenFile):
    rows = tokens.rows(ids * seq_len, seq_len + 1)
  else:
    rows = tokens[ids[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int32)  # one gather
  return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


def train_dataset(
  data: DataConfig | TextData, *, seq_len: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """The infinite training stream as a grain `MapDataset` of process-local batches.

  Args:
    data: a `TextData` (preferred: load it once per run) or the `DataConfig` to load.
    seq_len: tokens per row (each window reads seq_len + 1).
    batch_size: rows per global batch, across all processes.
    process_index, process_count: which rows of each global batch this process gets.
  """
  data = _as_data(data)
  rows = _local_rows(batch_size, process_index, process_count)
  if isinstance(data, ChatData):  # rows of conversations, shuffled and repeated like windows
    chat = data.train
    ds = _grain().MapDataset.range(len(chat)).shuffle(seed=data.seed).repeat()
    return ds.batch(batch_size, drop_remainder=True).map(lambda ids: chat.batch(ids[rows]))
  tokens = data.train
  ds = _grain().MapDataset.range(_num_windows(tokens, seq_len, "train"))
  ds = ds.shuffle(seed=data.seed).repeat()  # `repeat` reseeds the shuffle every epoch.
  ds = ds.batch(batch_size, drop_remainder=True)  # global batches of window ids
  return ds.map(lambda ids: _windows(tokens, ids[rows], seq_len))


def train_iterator(
  data: DataConfig | TextData, *, seq_len: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
  """Infinite iterator of this process's rows of each global batch; has get_state/set_state.

  Arguments as `train_dataset`. Batches are {"inputs", "targets"}: int32 [batch_size / P, seq_len].
  """
  ds = train_dataset(
    data, seq_len=seq_len, batch_size=batch_size, process_index=process_index, process_count=process_count
  )
  # Windows are cheap to gather (memory or one pread each): grain recommends no reader threads here.
  return iter(ds.to_iter_dataset(_grain().ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def val_batches(
  data: DataConfig | TextData,
  *,
  seq_len: int,
  batch_size: int,
  max_batches: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """Validation batches in corpus order (same every call); [] when `val_fraction` is 0.

  Args:
    max_batches: at most this many (None: every full batch of the split); others as `train_dataset`.
  """
  data = _as_data(data)
  rows = _local_rows(batch_size, process_index, process_count)
  if isinstance(data, ChatData):
    chat = data.val
    count = len(chat) // batch_size if max_batches is None else min(len(chat) // batch_size, max_batches)
    if len(chat) and not count:
      raise DataError(
        f"validation split too short: {len(chat)} rows of chat records, fewer than batch_size={batch_size}; "
        f"raise data.val_fraction or lower batch_size"
      )
    return [chat.batch(np.arange(i * batch_size, (i + 1) * batch_size)[rows]) for i in range(count)]
  tokens = data.val
  if len(tokens) == 0:
    return []
  ds = _grain().MapDataset.range(_num_windows(tokens, seq_len, "validation"))
  ds = ds.batch(batch_size, drop_remainder=True)  # equal shapes: one compiled eval step
  if len(ds) == 0:
    raise DataError(
      f"validation split too short: {len(tokens)} tokens make fewer than "
      f"batch_size={batch_size} sequences of {seq_len}; raise data.val_fraction "
      f"or lower batch_size/seq_len"
    )
  ds = ds.map(lambda ids: _windows(tokens, ids[rows], seq_len))
  count = len(ds) if max_batches is None else min(len(ds), max_batches)
  return [ds[i] for i in range(count)]
