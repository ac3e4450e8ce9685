"""Data: text -> tokens -> packed, shuffled, process-sharded batches.

Usage::

  cfg = DataConfig(paths=["corpus/*.txt"])        # or DataConfig() for the built-in corpus
  data = TextData.load(cfg)                       # tokenizer built once; tokens split train/val
  it = train_iterator(data, seq_len=256, batch_size=32,
                      process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it)              # {"inputs": int32[32 / P, 256], "targets": int32[32 / P, 256]}
  state = it.get_state()        # {"next_index": k}: JSON-serialisable, save it with the model
  it.set_state(state)           # exact resume, on a freshly built iterator too
  val = val_batches(data, seq_len=256, batch_size=32, max_batches=8)   # a fixed list of batches

At scale, tokenize once and train from disk::

  python -m jaxeff.data prepare --input 'corpus/*.jsonl' [--tokenizer tokenizer.json] --output DIR
  DataConfig(dataset="DIR")     # or `data.dataset=DIR` on the training command line

Fine-tuning on conversations: `DataConfig(format="chat", paths=["chats.jsonl"], tokenizer=...)` and
`load_data(cfg, seq_len)` give `ChatData` (conversations packed into rows with segment ids, or one
padded row each with `pack=False`; a `loss_mask` on assistant tokens; `jaxeff.data.chat`), which
`train_iterator` and `val_batches` batch the same way. `prepare --format chat` tokenizes
conversations once for `DataConfig(format="chat", dataset="DIR")`.

Modules, lower first: `sources` (DataConfig, DataError, corpus files and the documents in text /
jsonl / parquet files), `tokenizer` (`Tokenizer`, the one type data, training and generation share:
bytes, or a tokenizer.json with its chat template), `chat` (conversations -> masked rows),
`prepared` (`prepare`, `TokenFile`: the on-disk format), `pipeline` (TextData, `load_data`, the
grain datasets; split, packing, sharding and state are described there).
"""

from jaxeff.data.chat import ChatData
from jaxeff.data.pipeline import (
  TextData,
  load_chat,
  load_data,
  load_tokens,
  train_dataset,
  train_iterator,
  val_batches,
  vocab_size,
)
from jaxeff.data.prepared import TokenFile, prepare
from jaxeff.data.sources import DataConfig, DataError, corpus_files, default_corpus_files, resolve_paths
from jaxeff.data.tokenizer import (
  BYTE_EOD_ID,
  BYTE_VOCAB_SIZE,
  EOD_TOKENS,
  ByteTokenizer,
  HFTokenizer,
  Tokenizer,
  get_tokenizer,
)

__all__ = [
  "DataConfig",
  "DataError",
  "TextData",
  "ChatData",
  "load_chat",
  "load_data",
  "TokenFile",
  "prepare",
  "load_tokens",
  "train_dataset",
  "train_iterator",
  "val_batches",
  "vocab_size",
  "corpus_files",
  "default_corpus_files",
  "resolve_paths",
  "Tokenizer",
  "ByteTokenizer",
  "HFTokenizer",
  "get_tokenizer",
  "BYTE_EOD_ID",
  "BYTE_VOCAB_SIZE",
  "EOD_TOKENS",
]
