"""Tokenizers: UTF-8 bytes (vocab 256, the default) or a local Hugging Face `tokenizer.json`."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxeff.data.sources import DataError

BYTE_VOCAB_SIZE = 256
BYTE_EOD_ID = 0  # NUL: never appears in text files, so it is free to mark document ends.
# End-of-text tokens of common tokenizers (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma).
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class ByteTokenizer:
  """UTF-8 bytes as tokens; documents end with byte 0."""

  vocab_size = BYTE_VOCAB_SIZE
  eod_id = BYTE_EOD_ID
  fingerprint = None  # nothing to identify: bytes are bytes

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return np.asarray(ids, np.uint8).tobytes().decode("utf-8", errors="replace")

  def encode_each(self, docs: Sequence[bytes]) -> list[np.ndarray]:
    """Each document's tokens followed by `eod_id`."""
    sep = bytes([self.eod_id])
    return [self.encode(d + sep) for d in docs]

  def encode_documents(self, docs: Sequence[bytes]) -> np.ndarray:
    """All documents as one int32 stream, each followed by `eod_id`."""
    sep = bytes([self.eod_id])
    return self.encode(sep.join(docs) + sep) if docs else np.zeros(0, np.int32)


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
    # Identifies the tokenizer a prepared dataset was made with, wherever the file now lives.
    self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def encode_each(self, docs: Sequence[bytes]) -> list[np.ndarray]:
    """Each document's tokens followed by `eod_id` (when the tokenizer has one), batched."""
    texts = [d.decode("utf-8", errors="replace") for d in docs]
    encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets
    tail = [] if self.eod_id is None else [self.eod_id]
    return [np.asarray(e.ids + tail, np.int32) for e in encode(texts, add_special_tokens=False)]

  def encode_documents(self, docs: Sequence[bytes]) -> np.ndarray:
    """All documents as one int32 stream, each followed by `eod_id` (when the tokenizer has one)."""
    parts = self.encode_each(docs)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def get_tokenizer(path: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
  """Bytes for `None`, else the tokenizer.json at `path`."""
  return ByteTokenizer() if path is None else HFTokenizer(path)
