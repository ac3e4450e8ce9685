"""Tokenizers: one type for data, training, generation and serving.

`Tokenizer` is what every part of jaxeff takes; it has two implementations, one per backing:
`ByteTokenizer` (UTF-8 bytes as ids, vocabulary 256: a training run's default) and `HFTokenizer`
(a Hugging Face tokenizer.json through the `tokenizers` library, with what lies beside it: the
chat template and special tokens of tokenizer_config.json or chat_template.jinja, the end-of-sequence
ids of config.json and generation_config.json).

>>> from jaxeff.data.tokenizer import ByteTokenizer
>>> tok = ByteTokenizer()
>>> tok.encode("hi"), tok.decode([104, 105]), tok.stop_tokens      # lists of ids for generation
([104, 105], 'hi', (0,))
>>> tok.encode_documents([b"ab", b"c"]).tolist()                     # int32 streams for training
[97, 98, 0, 99, 0]
>>> chat = ByteTokenizer(bos_id=256, eod_id=257, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
>>> chat.encode(chat.apply_chat_template([{"role": "user", "content": "hi"}])), chat.vocab_size
([256, 104, 105], 258)

`get_tokenizer(path)` gives bytes for None, else the tokenizer.json at `path` (a file or the
directory holding it). `jaxeff.load` returns a model's tokenizer with the model (a GGUF's, rebuilt
from its metadata, or a training run's).

Ids: `encode` returns a list of ints (a prompt), adding the tokenizer's special tokens (BOS, as
its own configuration says) unless `add_special_tokens=False`, which data and chat templates use
(the template writes them as text). `encode_each` / `encode_documents` give int32 arrays with
`eod_id` after every document. `decode` skips special tokens unless told otherwise.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from jaxeff.errors import DataError, HFError

BYTE_VOCAB_SIZE = 256
BYTE_EOD_ID = 0  # NUL: never appears in text files, so it is free to mark document ends.
# End-of-text tokens of common tokenizers (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma).
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def render_template(
  template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict, tools: list | None = None
) -> str:
  """A chat template rendered as transformers does: sandboxed Jinja with trim/lstrip blocks, loop
  controls, lenient undefined values (tool templates test `message.tool_calls` on every message),
  `tojson` without HTML escaping or key sorting, and `tools` always defined (None without tools)."""
  from jinja2 import sandbox

  env = sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
  )

  def raise_exception(message):
    raise DataError(f"chat template: {message}")

  def tojson(value, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = tojson
  tokens = {k: v for k, v in special_tokens.items() if v is not None}
  return env.from_string(template).render(
    messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **tokens
  )


class Tokenizer(abc.ABC):
  """Text <-> token ids for every part of jaxeff.

  Attributes:
    vocab_size: number of ids (added tokens included).
    eod_id: the id a training stream puts after each document (None: the tokenizer has none).
    stop_tokens: ids that end generation (end of sequence / end of turn).
    chat_template: a Jinja template in Hugging Face's chat-template format, or None.
    special_tokens: the names a template may use (bos_token, eos_token, ...) and their text.
    fingerprint: identifies the tokenizer a prepared dataset was made with (None: plain bytes).
  """

  vocab_size: int
  eod_id: int | None
  stop_tokens: tuple[int, ...]
  chat_template: str | None
  special_tokens: dict
  fingerprint: str | None

  @abc.abstractmethod
  def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
    """The ids of `text`, with the tokenizer's special tokens (BOS) when `add_special_tokens`."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The text of `ids`."""

  @abc.abstractmethod
  def encode_each(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
    """Each document's int32 ids (no special tokens) followed by `eod_id` when there is one."""

  def token_bytes(self, token: int) -> bytes:
    """The bytes one token stands for (a piece of a UTF-8 character stays a piece: what OpenAI's
    logprobs `bytes` carry); by default its decoded text's."""
    return self.decode([int(token)], skip_special_tokens=False).encode()

  def encode_documents(self, docs: Sequence[bytes | str]) -> np.ndarray:
    """All documents as one int32 stream, each followed by `eod_id` (when there is one)."""
    parts = self.encode_each(docs)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)

  def apply_chat_template(
    self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None
  ) -> str:
    """The conversation as the model expects it (Hugging Face chat-template semantics); `tools` reach
    templates that read them (`jaxeff.data.tools.render_messages` covers those that do not)."""
    if not self.chat_template:
      raise HFError("this model has no chat template (tokenizer_config.json 'chat_template')")
    return render_template(self.chat_template, messages, add_generation_prompt, self.special_tokens, tools)


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0-255; documents end with `eod_id` (byte 0 by default), which also stops
  generation. `bos_id` (an id past the bytes) is what `encode` prepends with special tokens;
  ids past 255 decode to nothing."""

  def __init__(
    self,
    *,
    eod_id: int = BYTE_EOD_ID,
    bos_id: int | None = None,
    chat_template: str | None = None,
    special_tokens: dict | None = None,
  ):
    if bos_id is not None and bos_id < BYTE_VOCAB_SIZE:
      raise DataError(f"a byte tokenizer's bos_id must lie past the 256 byte values, got {bos_id}")
    self.eod_id, self.bos_id = eod_id, bos_id
    self.vocab_size = max(BYTE_VOCAB_SIZE, eod_id + 1, -1 if bos_id is None else bos_id + 1)
    self.stop_tokens = (eod_id,)
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})
    default = eod_id == BYTE_EOD_ID and bos_id is None
    self.fingerprint = None if default else f"bytes(eod_id={eod_id}, bos_id={bos_id})"

  def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else text
    bos = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
    return bos + list(data)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    # Ids past the bytes (BOS, an end id) have no text either way.
    return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB_SIZE).decode("utf-8", errors="replace")

  def token_bytes(self, token: int) -> bytes:
    return bytes([int(token)]) if 0 <= int(token) < BYTE_VOCAB_SIZE else b""

  def encode_each(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
    out = []
    for d in docs:
      data = d.encode("utf-8") if isinstance(d, str) else d
      out.append(np.append(np.frombuffer(data, np.uint8).astype(np.int32), np.int32(self.eod_id)))
    return out


def _token_content(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"cannot read {path}: {e}") from None


class HFTokenizer(Tokenizer):
  """A Hugging Face tokenizer.json (`path`: the file, or the directory holding it), through the
  `tokenizers` library; the files beside it give the chat template and special tokens
  (tokenizer_config.json, chat_template.jinja) and the end-of-sequence ids (config.json,
  generation_config.json). `stop_tokens`: those ids, else `eod_id`."""

  def __init__(self, path: str | os.PathLike):
    import tokenizers  # Imported here: byte-level runs do not need it.

    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.json"
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
    self._read_config(path.parent)

  def _read_config(self, directory: pathlib.Path) -> None:
    config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():  # newer transformers save it beside the config
      template = template or (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    self.chat_template = template or None
    self.special_tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    stops = []
    eos = self.special_tokens["eos_token"]
    if eos is not None and self._tok.token_to_id(eos) is not None:
      stops.append(self._tok.token_to_id(eos))
    for name in ("config.json", "generation_config.json"):
      if (directory / name).is_file():
        stops += _ids(_read_json(directory / name).get("eos_token_id"))
    if not stops and self.eod_id is not None:
      stops.append(self.eod_id)
    self.stop_tokens = tuple(dict.fromkeys(stops))

  def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_bytes(self, token: int) -> bytes:
    piece = self._tok.id_to_token(int(token))
    if piece is None:
      return b""
    if "ByteLevel" in repr(self._tok.decoder):  # GPT-2's alphabet: one character per byte
      table = _byte_of_char()
      if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece's byte fallback
    if fallback:
      return bytes([int(fallback.group(1), 16)])
    return super().token_bytes(token)

  def encode_each(self, docs: Sequence[bytes | str]) -> list[np.ndarray]:
    texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
    encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets
    tail = [] if self.eod_id is None else [self.eod_id]
    return [np.asarray(e.ids + tail, np.int32) for e in encode(texts, add_special_tokens=False)]


@functools.cache
def _byte_of_char() -> dict[str, int]:
  """GPT-2's byte-level alphabet inverted: printable bytes stand for themselves, the other 68 for
  the characters from U+0100 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def get_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
  """Bytes for `None`, else the tokenizer.json at `path` (the file or its directory)."""
  return ByteTokenizer() if path is None else HFTokenizer(path)
