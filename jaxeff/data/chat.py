"""Chat data for fine-tuning: JSONL conversations -> token rows with a loss mask on assistant tokens.

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` (the
OpenAI shape) or `{"prompt": "...", "completion": "..."}` (one user turn and its answer). Tool use
is OpenAI's fine-tuning shape: a `"tools"` list beside the messages, assistant messages with
`tool_calls` (content may be null) and `"tool"` messages with the results; such a record is rendered
as a served request is (`jaxeff.data.tools.render_messages`: the template's tools section, or the
default `<tool_call>` format), and the calls are trained on as the assistant's reply. It is
rendered with the model's own chat template (the tokenizer's, from the tokenizer directory's
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

`ChatData.build` makes the rows from conversations read here (`read_conversations`) or from a
prepared directory (`jaxeff.data.prepared.read_chat`); `jaxeff.data.load_data` picks the source.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re

import numpy as np

from jaxeff.data.sources import resolve_paths
from jaxeff.data.tokenizer import Tokenizer
from jaxeff.data.tools import render_messages
from jaxeff.errors import DataError, GenerationError

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")
TOOL_KEYS = ("tool_calls", "tool_call_id")  # kept from a message beside role and content


class BadRecord(ValueError):
  """A record that cannot be used; its message is the reason (counted, never raised to the user)."""


def messages_of(record) -> list[dict]:
  """The record's conversation as a list of {"role", "content"} (and `tool_calls` / `tool_call_id`
  where a message has them); BadRecord with the reason otherwise."""
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
    if not isinstance(m, dict):
      raise BadRecord("a message without text content")
    calls = m.get("role") == "assistant" and m.get("tool_calls")
    if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
      raise BadRecord("a message without text content")
    if m.get("role") not in ROLES:
      raise BadRecord("unknown role")
  if not any(m["role"] == "assistant" for m in messages):
    raise BadRecord("no assistant turn")
  return [{k: m[k] for k in ("role", "content", *TOOL_KEYS) if k in m} for m in messages]


def uses_tools(messages: list[dict], tools) -> bool:
  """Whether a conversation needs the tool-aware rendering (tools given, calls or results in it)."""
  return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def check_chat_template(tokenizer: Tokenizer, where) -> None:
  """DataError unless `tokenizer` has a chat template (`where`: the tokenizer's directory, for the message)."""
  if not tokenizer.chat_template:
    raise DataError(f"data.format=chat needs a chat template; {where} has none (tokenizer_config.json)")


def encode_chat(messages: list[dict], tokenizer: Tokenizer, tools: list | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, loss mask) of a conversation, rendered with the tokenizer's chat template: the
  mask is True on assistant replies' tokens (tool calls included). No special tokens are added (the
  template writes them). With `tools`, or tool calls or results in the conversation, it is rendered
  as the server renders a request (`jaxeff.data.tools.render_messages`)."""
  if uses_tools(messages, tools):

    def render(upto: int, add_generation_prompt: bool) -> str:
      try:
        return render_messages(tokenizer, messages[:upto], tools, None, add_generation_prompt)
      except GenerationError as e:
        where = re.sub(r"\[\d+\]", "", getattr(e, "param", "messages"))  # one reason per field, any index
        raise BadRecord(f"bad tools or tool calls ({where})") from None
  else:

    def render(upto: int, add_generation_prompt: bool) -> str:
      return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=add_generation_prompt)

  pieces: list[tuple[str, bool]] = []
  done = ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt, full = render(i, True), render(i + 1, False)
    if not prompt.startswith(done) or not full.startswith(prompt):
      raise BadRecord("the chat template does not render this conversation incrementally")
    pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
    done = full
  whole = render(len(messages), False)
  if not whole.startswith(done):
    raise BadRecord("the chat template does not render this conversation incrementally")
  pieces.append((whole[len(done) :], False))
  ids, mask = [], []
  for text, trained in pieces:
    if text:
      piece = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int32)
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


def encode_record(line: str | bytes, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, loss mask) of one JSONL line; BadRecord with the reason when it cannot be used."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    raise BadRecord("not JSON") from None
  return encode_chat(messages_of(record), tokenizer, record.get("tools"))


def skipped_summary(skipped: collections.Counter, total: int) -> str:
  """'N of TOTAL chat records skipped (n1 reason1, n2 reason2, ...)', most frequent reason first."""
  why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
  return f"{sum(skipped.values())} of {total} chat records skipped ({why})"


def read_conversations(paths, tokenizer: Tokenizer) -> tuple[list, collections.Counter, int]:
  """([(ids, mask)] of every usable record in `paths`' JSONL files, skipped reasons, records read)."""
  conversations, skipped, total = [], collections.Counter(), 0
  for path in resolve_paths(paths):
    with open(path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        total += 1
        try:
          conversations.append(encode_record(line, tokenizer))
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
  def build(
    cls, conversations: list, skipped: collections.Counter, total: int, vocab_size: int, cfg, seq_len: int
  ) -> ChatData:
    """Rows of `seq_len + 1` tokens from conversations [(ids, mask)] as read (`read_conversations`,
    or a prepared directory's `read_chat`), `total` records of which `skipped` counts the unusable
    ones; `cfg`: the DataConfig (truncate, val_fraction, pack, seed). Logs one line for skipped records."""
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
    return cls(train, val, vocab_size, cfg.seed, dict(skipped))
