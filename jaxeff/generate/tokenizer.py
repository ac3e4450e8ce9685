"""Text in and out for generation: one small interface over the tokenizers a jaxeff model comes with.

  tok = load_tokenizer("path/to/hf_dir_or.gguf")         # tokenizer.json + tokenizer_config.json (chat template)
  ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
  text = tok.decode(new_ids); tok.stop_tokens               # end-of-sequence ids to stop generation on

A Hugging Face directory (and a `.gguf`, through its cached conversion, `jaxeff.gguf`) gives a
`tokenizers.Tokenizer` with its special tokens and chat template; a `jaxeff.train` checkpoint gives
the tokenizer it trained with (bytes, or its tokenizer.json), which has no chat template.
`StreamDecoder` turns a growing list of ids into the text to print next, holding back an incomplete
UTF-8 character.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

from jaxeff.errors import HFError


class TextTokenizer:
  """encode/decode, stop tokens, and the chat template (if the model has one).

  Args:
    encode_fn: (text, add_special_tokens) -> token ids (specials such as BOS added when asked, as the
      tokenizer's own config says).
    decode_fn: ids -> text (special tokens skipped).
    stop_tokens: ids that end generation (end of sequence / end of turn).
    chat_template: a Jinja template in Hugging Face's chat-template format, or None.
    special_tokens: names the template may use (bos_token, eos_token, ...).
  """

  def __init__(
    self,
    encode_fn,
    decode_fn,
    *,
    stop_tokens: Sequence[int] = (),
    chat_template: str | None = None,
    special_tokens: dict | None = None,
  ):
    self._encode, self._decode = encode_fn, decode_fn
    self.stop_tokens = tuple(dict.fromkeys(int(t) for t in stop_tokens))
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return [int(i) for i in self._encode(text, add_special_tokens)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._decode([int(i) for i in ids])

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the model expects it (Hugging Face chat-template semantics)."""
    if not self.chat_template:
      raise HFError("this model has no chat template (tokenizer_config.json 'chat_template')")
    from jaxeff.data.chat import render_template

    return render_template(self.chat_template, messages, add_generation_prompt, self.special_tokens)


def _token_content(value) -> str | None:
  return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def from_hf_dir(path: str | os.PathLike) -> TextTokenizer:
  """A Hugging Face checkpoint directory's tokenizer.json, tokenizer_config.json and eos ids."""
  from tokenizers import Tokenizer

  path = pathlib.Path(path)
  if not (path / "tokenizer.json").is_file():
    raise HFError(f"{path} has no tokenizer.json")
  tok = Tokenizer.from_file(str(path / "tokenizer.json"))
  config = {}
  if (path / "tokenizer_config.json").is_file():
    config = json.loads((path / "tokenizer_config.json").read_text())
  if (path / "chat_template.jinja").is_file():  # newer transformers save it beside the config
    config.setdefault("chat_template", (path / "chat_template.jinja").read_text())
  specials = {name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
  stops = []
  if specials["eos_token"] is not None and tok.token_to_id(specials["eos_token"]) is not None:
    stops.append(tok.token_to_id(specials["eos_token"]))
  for name in ("config.json", "generation_config.json"):
    if (path / name).is_file():
      stops += _ids(json.loads((path / name).read_text()).get("eos_token_id"))
  template = config.get("chat_template")
  if isinstance(template, list):  # several named templates: take the default one
    template = next((t["template"] for t in template if t.get("name") == "default"), None)
  return TextTokenizer(
    lambda text, specials: tok.encode(text, add_special_tokens=specials).ids,
    lambda ids: tok.decode(ids, skip_special_tokens=True),
    stop_tokens=stops,
    chat_template=template,
    special_tokens=specials,
  )


def from_data_tokenizer(tok) -> TextTokenizer:
  """The tokenizer a `jaxeff.train` run used (`jaxeff.data.ByteTokenizer` or `HFTokenizer`)."""
  eod = getattr(tok, "eod_id", None)
  return TextTokenizer(lambda text, specials: tok.encode(text).tolist(), tok.decode, stop_tokens=_ids(eod))


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
  """The tokenizer of a Hugging Face directory or a `.gguf` file (the one `jaxeff.hf.load` reads)."""
  path = pathlib.Path(path)
  if path.suffix == ".gguf":
    from jaxeff import gguf

    path = gguf.converted_checkpoint(path)
  return from_hf_dir(path)


class StreamDecoder:
  """Incremental detokenization: `push(id)` returns the new text to print (maybe ''), `finish()` the
  rest once the ids end; together they print exactly `tokenizer.decode(ids)`.

  Constant work per id (the read-offset technique of vLLM's incremental detokenizer and the
  `tokenizers` DecodeStream): each push decodes a short window, the ids of the last printed piece
  (context: a tokenizer may decode an id differently at the start of a text, as SentencePiece drops
  a leading space) and those not printed yet, and prints what the new ids add. Text ending in U+FFFD
  may be a UTF-8 character whose other bytes are still to come: it waits. When that lasts
  `MAX_PENDING` ids (invalid bytes, not a character arriving), the decoder prints up to the newest id
  once decoding from that id alone continues the text exactly: then no earlier byte can change (a
  UTF-8 decoder that replaces each maximal invalid subsequence, as byte-level BPE's does).
  """

  MAX_PENDING = 4  # a UTF-8 character has at most 4 bytes

  def __init__(self, tokenizer: TextTokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self._start = 0  # the window's first id: the last printed piece begins here
    self._read = 0  # ids before this one are printed

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    decode = self.tokenizer.decode
    printed = decode(self.ids[self._start : self._read])
    text = decode(self.ids[self._start :])
    if len(text) > len(printed) and text.startswith(printed) and not text.endswith("\ufffd"):
      self._start, self._read = self._read, len(self.ids)
      return text[len(printed) :]
    if len(self.ids) - self._read < self.MAX_PENDING:
      return ""
    head, last = decode(self.ids[self._start : -1]), decode(self.ids[-1:])
    if not last or head + last != text or not head.startswith(printed):
      return ""
    self._start = self._read = len(self.ids) - 1
    return head[len(printed) :]

  def finish(self) -> str:
    """The text not printed yet (an incomplete character at the end decodes as U+FFFD)."""
    printed = self.tokenizer.decode(self.ids[self._start : self._read])
    text = self.tokenizer.decode(self.ids[self._start :])
    self._start = self._read = len(self.ids)
    return text[len(printed) :]
