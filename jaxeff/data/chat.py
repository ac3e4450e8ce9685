"""Chat data for fine-tuning: JSONL conversations -> token rows with a loss mask on assistant tokens.

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` (the
OpenAI shape) or `{"prompt": "...", "completion": "..."}` (one user turn and its answer). It is
rendered with the model's own chat template (`ChatTemplate`, from the tokenizer directory's
tokenizer_config.json or chat_template.jinja, Hugging Face semantics) and the loss counts the
assistant's tokens only, including the end-of-turn text that closes each reply (so the model
learns to stop). Spans come from rendering incrementally: the conversation up to a reply with the
generation prompt, then with the reply; each piece is tokenized on its own, so the mask lines up
with the tokens exactly.

Rows of `seq_len + 1` tokens: inputs are the first `seq_len`, targets the last, `loss_mask` marks
the targets that are assistant tokens. With `data.pack` (the default) conversations are packed
next-fit into rows, each numbered by a segment id with its own positions from 0: the model's
attention keeps every conversation from seeing the others, and RoPE gives each the phases it has
alone, so a packed row trains exactly as its conversations would one by one (tested). With
`data.pack=false` each conversation is one right-padded row. A record that cannot be used (no
messages, an unknown role, no assistant turn, not JSON, longer than `seq_len + 1` tokens unless
`data.truncate`) is counted by reason and reported in one log line.
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
class ChatRows:
  """Rows of `seq_len + 1` tokens, each holding one conversation (padded) or several (packed).

  tokens int32, loss_mask bool (True: an assistant token), segments int32 (1, 2, ... for the
  conversations of a row, 0 for padding), positions int32 (restarting at 0 for each conversation):
  all [N, seq_len + 1]."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  segments: np.ndarray
  positions: np.ndarray
  packed: bool

  def __len__(self) -> int:
    return len(self.tokens)

  def batch(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `ids` as a batch: inputs, targets one token later, the targets' loss mask; packed rows
    add the inputs' `segment_ids` and `positions` (`next_token_loss` passes them to the model)."""
    t, m, seg = self.tokens[ids], self.loss_mask[ids], self.segments[ids]
    # A target counts when it is an assistant token of the same conversation as its input.
    batch = {
      "inputs": np.ascontiguousarray(t[:, :-1]),
      "targets": np.ascontiguousarray(t[:, 1:]),
      "loss_mask": np.ascontiguousarray(m[:, 1:] & (seg[:, 1:] == seg[:, :-1])),
    }
    if self.packed:
      batch["segment_ids"] = np.ascontiguousarray(seg[:, :-1])
      batch["positions"] = np.ascontiguousarray(self.positions[ids][:, :-1])
    return batch


def build_rows(conversations: list[tuple[np.ndarray, np.ndarray]], length: int, pack: bool) -> ChatRows:
  """Conversations (ids, mask), each at most `length` tokens, as rows of `length` tokens.

  Packing is next-fit in the given order: a conversation goes into the current row when it fits,
  else it starts a new one (rows keep the data's order, so the split and shuffle stay as they are)."""
  groups: list[list[int]] = []
  used = length  # forces a first row
  for i, (ids, _) in enumerate(conversations):
    if not pack or used + len(ids) > length:
      groups.append([])
      used = 0
    groups[-1].append(i)
    used += len(ids)
  n = len(groups)
  tokens, mask = np.zeros((n, length), np.int32), np.zeros((n, length), bool)
  segments, positions = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
  for row, members in enumerate(groups):
    at = 0
    for segment, i in enumerate(members, start=1):
      ids, m = conversations[i]
      end = at + len(ids)
      tokens[row, at:end], mask[row, at:end] = ids, m
      segments[row, at:end], positions[row, at:end] = segment, np.arange(len(ids))
      at = end
  return ChatRows(tokens, mask, segments, positions, pack)


def encode_record(line: str | bytes, template: ChatTemplate, encode) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, loss mask) of one JSONL line; BadRecord with the reason when it cannot be used."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    raise BadRecord("not JSON") from None
  return encode_chat(messages_of(record), template, encode)


def skipped_summary(skipped: collections.Counter, total: int) -> str:
  """'N of TOTAL chat records skipped (n1 reason1, n2 reason2, ...)', most frequent reason first."""
  why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
  return f"{sum(skipped.values())} of {total} chat records skipped ({why})"


def read_conversations(paths, template: ChatTemplate, encode) -> tuple[list, collections.Counter, int]:
  """([(ids, mask)] of every usable record in `paths`' JSONL files, skipped reasons, records read)."""
  from jaxeff.data.sources import resolve_paths

  conversations, skipped, total = [], collections.Counter(), 0
  for path in resolve_paths(paths):
    with open(path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        total += 1
        try:
          conversations.append(encode_record(line, template, encode))
        except BadRecord as e:
          skipped[str(e)] += 1
  return conversations, skipped, total


def fit_to_length(conversations, length: int, truncate: bool, skipped: collections.Counter) -> list:
  """The conversations that fit in `length` tokens (cut to it with `truncate`) and still train on
  an assistant token; the others counted in `skipped`."""
  kept = []
  for ids, mask in conversations:
    if len(ids) > length:
      if not truncate:
        skipped[f"longer than seq_len + 1 = {length} tokens"] += 1
        continue
      ids, mask = ids[:length], mask[:length]
    if not mask[1:].any():
      skipped["no assistant token within seq_len"] += 1
      continue
    kept.append((ids, mask))
  return kept


@dataclasses.dataclass
class ChatData:
  """Conversations as rows (`ChatRows`), split by record order into train (head) and val (tail)."""

  train: ChatRows
  val: ChatRows
  vocab_size: int
  seed: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)  # reason -> count

  @classmethod
  def load(cls, cfg, seq_len: int, tokenizer=None) -> ChatData:
    """Reads the JSONL files of `cfg.paths`, or the prepared chat directory `cfg.dataset` (a
    DataConfig with format "chat")."""
    from jaxeff.data.tokenizer import get_tokenizer

    if cfg.dataset is not None:
      from jaxeff.data.prepared import read_chat

      conversations, skipped, total, vocab = read_chat(pathlib.Path(cfg.dataset), cfg.tokenizer)
    else:
      if not cfg.paths:
        raise DataError("data.format=chat reads JSONL files (data.paths) or a prepared chat data.dataset")
      if cfg.tokenizer is None:
        raise DataError("data.format=chat needs the model's tokenizer and chat template (data.tokenizer, or init_from)")
      tokenizer = tokenizer or get_tokenizer(cfg.tokenizer)
      template = ChatTemplate.from_dir(pathlib.Path(cfg.tokenizer).parent)
      conversations, skipped, total = read_conversations(cfg.paths, template, tokenizer.encode)
      vocab = tokenizer.vocab_size
    conversations = fit_to_length(conversations, seq_len + 1, cfg.truncate, skipped)
    if skipped:
      log.warning("data: %s", skipped_summary(skipped, total))
    if not conversations:
      raise DataError(f"no usable chat records in the data ({total} read)")
    num_val = round(len(conversations) * cfg.val_fraction)
    if cfg.val_fraction > 0:
      num_val = max(num_val, 1)
    split = len(conversations) - num_val
    if split < 1:
      raise DataError(
        f"{len(conversations)} chat records leave none for training with data.val_fraction={cfg.val_fraction}"
      )
    train = build_rows(conversations[:split], seq_len + 1, cfg.pack)
    val = build_rows(conversations[split:], seq_len + 1, cfg.pack)
    if cfg.pack:
      filled = sum(len(ids) for ids, _ in conversations) / ((len(train) + len(val)) * (seq_len + 1))
      log.info(
        "data: %d conversations packed into %d rows of %d tokens (%.0f%% filled)",
        len(conversations),
        len(train) + len(val),
        seq_len + 1,
        100 * filled,
      )
    return cls(train, val, vocab, cfg.seed, dict(skipped))
