"""Chat data for fine-tuning: JSONL conversations -> token rows with a loss mask on assistant tokens.

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` (the
OpenAI shape) or `{"prompt": "...", "completion": "..."}` (one user turn and its answer). It is
rendered with the model's own chat template (`ChatTemplate`, from the tokenizer directory's
tokenizer_config.json or chat_template.jinja, Hugging Face semantics) and the loss counts the
assistant's tokens only, including the end-of-turn text that closes each reply (so the model
learns to stop). Spans come from rendering incrementally: the conversation up to a reply with the
generation prompt, then with the reply; each piece is tokenized on its own, so the mask lines up
with the tokens exactly.

Rows: each conversation is one row of `seq_len + 1` tokens, right-padded (padding counts for
nothing); inputs are the first `seq_len`, targets the last, `loss_mask` marks the targets that are
assistant tokens. Conversations are not packed together, so no example attends to another. A
record that cannot be used (no messages, an unknown role, no assistant turn, not JSON, longer than
`seq_len + 1` tokens unless `data.truncate`) is counted by reason and reported in one log line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib

import numpy as np

from jaxeff.errors import DataError

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Hugging Face chat template (Jinja) and the special tokens it may use."""

  template: str
  special_tokens: dict

  @classmethod
  def from_dir(cls, directory: str | pathlib.Path) -> ChatTemplate:
    directory = pathlib.Path(directory)
    config = {}
    if (directory / "tokenizer_config.json").is_file():
      config = json.loads((directory / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
      template = template or (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
      raise DataError(f"data.format=chat needs a chat template; {directory} has none (tokenizer_config.json)")
    specials = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
      value = config.get(name)
      specials[name] = value.get("content") if isinstance(value, dict) else value
    return cls(template, specials)

  def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
    return render_template(self.template, messages, add_generation_prompt, self.special_tokens)


def render_template(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
  """A chat template rendered as transformers does (sandboxed Jinja, trim/lstrip blocks)."""
  import jinja2
  from jinja2 import sandbox

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

  def raise_exception(message):
    raise DataError(f"chat template: {message}")

  env.globals["raise_exception"] = raise_exception
  tokens = {k: v for k, v in special_tokens.items() if v is not None}
  return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


class BadRecord(ValueError):
  """A record that cannot be used; its message is the reason (counted, never raised to the user)."""


def messages_of(record) -> list[dict]:
  """The record's conversation as a list of {"role", "content"}; BadRecord with the reason otherwise."""
  if not isinstance(record, dict):
    raise BadRecord("not a JSON object")
  if "messages" in record:
    messages = record["messages"]
  elif "prompt" in record and "completion" in record:
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
  else:
    raise BadRecord("no messages")
  if not isinstance(messages, list) or not messages:
    raise BadRecord("no messages")
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise BadRecord("a message without text content")
    if m.get("role") not in ROLES:
      raise BadRecord("unknown role")
  if not any(m["role"] == "assistant" for m in messages):
    raise BadRecord("no assistant turn")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_chat(messages: list[dict], template: ChatTemplate, encode) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, loss mask) of a conversation: the mask is True on assistant replies' tokens.

  `encode(text) -> ids` without special tokens added (the template writes them as text)."""
  pieces: list[tuple[str, bool]] = []
  done = ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt = template.render(messages[:i], add_generation_prompt=True)
    full = template.render(messages[: i + 1], add_generation_prompt=False)
    if not prompt.startswith(done) or not full.startswith(prompt):
      raise BadRecord("the chat template does not render this conversation incrementally")
    pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
    done = full
  whole = template.render(messages, add_generation_prompt=False)
  if not whole.startswith(done):
    raise BadRecord("the chat template does not render this conversation incrementally")
  pieces.append((whole[len(done) :], False))
  ids, mask = [], []
  for text, trained in pieces:
    if text:
      piece = np.asarray(encode(text), np.int32)
      ids.append(piece)
      mask.append(np.full(len(piece), trained))
  return np.concatenate(ids), np.concatenate(mask)


@dataclasses.dataclass
class ChatData:
  """Conversations as fixed rows: `tokens` int32 [N, seq_len + 1] and `loss_mask` bool [N, seq_len + 1]
  (True: an assistant token), split by record order into train (head) and val (tail)."""

  train_tokens: np.ndarray
  train_mask: np.ndarray
  val_tokens: np.ndarray
  val_mask: np.ndarray
  vocab_size: int
  seed: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)  # reason -> count

  @classmethod
  def load(cls, cfg, seq_len: int, tokenizer=None) -> ChatData:
    """Reads the JSONL files of `cfg.paths` (a DataConfig with format "chat")."""
    from jaxeff.data.sources import resolve_paths
    from jaxeff.data.tokenizer import get_tokenizer

    if not cfg.paths:
      raise DataError("data.format=chat reads JSONL files: give data.paths")
    if cfg.tokenizer is None:
      raise DataError("data.format=chat needs the model's tokenizer and chat template (data.tokenizer, or init_from)")
    tokenizer = tokenizer or get_tokenizer(cfg.tokenizer)
    template = ChatTemplate.from_dir(pathlib.Path(cfg.tokenizer).parent)
    rows, masks, skipped, total = [], [], collections.Counter(), 0
    for path in resolve_paths(cfg.paths):
      with open(path, encoding="utf-8") as f:
        for line in f:
          if not line.strip():
            continue
          total += 1
          try:
            try:
              record = json.loads(line)
            except json.JSONDecodeError:
              raise BadRecord("not JSON") from None
            ids, mask = encode_chat(messages_of(record), template, tokenizer.encode)
            if len(ids) > seq_len + 1:
              if not cfg.truncate:
                raise BadRecord(f"longer than seq_len + 1 = {seq_len + 1} tokens")
              ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not mask[1:].any():
              raise BadRecord("no assistant token within seq_len")
          except BadRecord as e:
            skipped[str(e)] += 1
            continue
          row, row_mask = np.zeros(seq_len + 1, np.int32), np.zeros(seq_len + 1, bool)
          row[: len(ids)], row_mask[: len(ids)] = ids, mask
          rows.append(row)
          masks.append(row_mask)
    if skipped:
      why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
      log.warning("data: %d of %d chat records skipped (%s)", sum(skipped.values()), total, why)
    if not rows:
      raise DataError(f"no usable chat records in data.paths ({total} read)")
    tokens, mask = np.stack(rows), np.stack(masks)
    num_val = round(len(rows) * cfg.val_fraction)
    if cfg.val_fraction > 0:
      num_val = max(num_val, 1)
    split = len(rows) - num_val
    if split < 1:
      raise DataError(f"{len(rows)} chat records leave none for training with data.val_fraction={cfg.val_fraction}")
    return cls(
      tokens[:split], mask[:split], tokens[split:], mask[split:], tokenizer.vocab_size, cfg.seed, dict(skipped)
    )


def rows_batch(tokens: np.ndarray, mask: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
  """Rows `ids` as a batch: inputs, targets one token later, and the targets' loss mask."""
  t, m = tokens[ids], mask[ids]
  return {
    "inputs": np.ascontiguousarray(t[:, :-1]),
    "targets": np.ascontiguousarray(t[:, 1:]),
    "loss_mask": np.ascontiguousarray(m[:, 1:]),
  }
