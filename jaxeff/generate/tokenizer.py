"""Text in and out for generation: the model's tokenizer and `StreamDecoder`.

  model, tok = jaxeff.load("path/to/hf_dir_or.gguf_or_run")   # or load_tokenizer(path) alone
  ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
  text = tok.decode(new_ids); tok.stop_tokens                  # end-of-sequence ids to stop generation on

The tokenizer is `jaxeff.data.tokenizer.Tokenizer`, the one type data, training, generation and
the server share: a Hugging Face directory's (or a `.gguf`'s, through its cached conversion)
tokenizer.json with its special tokens and chat template, or the tokenizer a `jaxeff.train` run
trained with (bytes, or its tokenizer.json). `StreamDecoder` turns a growing list of ids into the
text to print next, holding back an incomplete UTF-8 character.
"""

from __future__ import annotations

from jaxeff.data.tokenizer import Tokenizer
from jaxeff.loader import load_tokenizer

TextTokenizer = Tokenizer  # the name StreamDecoder and the server annotate with

__all__ = ["StreamDecoder", "TextTokenizer", "Tokenizer", "load_tokenizer"]


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
