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
  """Incremental detokenization: `push(id)` returns the new text to print (maybe '')."""

  def __init__(self, tokenizer: TextTokenizer):
    self.tokenizer = tokenizer
    self.ids: list[int] = []
    self.printed = 0

  def push(self, token: int) -> str:
    self.ids.append(int(token))
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
      return ""
    new, self.printed = text[self.printed :], len(text)
    return new
