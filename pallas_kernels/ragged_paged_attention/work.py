"""Work items: the ragged batch cut into query blocks that each lie inside one sequence.

Every implementation but the reference runs over items. An item is `block_q` consecutive query
rows of one sequence (its last item may hold fewer), described by three int32 arrays of a static
length: `seq` (the sequence), `chunk` (which block of the sequence's rows) and `rows` (how many
rows are real; 0 for the padding items past the last real one). The kernels read the sequence's
kv_lens, cu_q_lens and pages from these; the wrapper gathers each item's query rows into a dense
[KVH, items, block_q * G, D] tile (row r * G + g: token r of the block, query head g of the kv
head's group) and scatters the results back.

The batch is split into two classes so that decode rows are never padded to a prefill block:
sequences with 1 <= q_len <= decode_q ("decode") run with block_q = decode_q (1 by default: a
decode item is the G query heads of one token), the longer ones ("prefill") with the prefill
block_q. Sequences with q_len 0 and those >= num_seqs form no items, so their rows stay zero.

Static item counts: the decode class has at most S items; a prefill sequence (q_len > decode_q)
takes ceil(q_len / block_q) <= q_len / block_q + 1 items, so the class has at most
ceil(T / block_q) + min(S, T // (decode_q + 1)) items, or ceil(T / block_q) + max_prefill_seqs
when the caller bounds the number of prefill sequences (a server that prefills a few prompts per
step among many decode rows: every padding item costs as much as a real one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Items(NamedTuple):
  seq: jax.Array  # int32 [n]: the item's sequence (clamped to S - 1 for padding items)
  chunk: jax.Array  # int32 [n]: the item's first row is cu_q_lens[seq] + chunk * block_q
  rows: jax.Array  # int32 [n]: real rows (0: a padding item)
  tokens: jax.Array  # int32 [n, block_q]: the rows' indices into q; T (out of range) for unreal rows


def class_sizes(t: int, s: int, decode_q: int, block_q: int, max_prefill_seqs: int | None = None):
  """Static item counts of the (decode, prefill) classes."""
  prefills = min(s, t // (decode_q + 1), s if max_prefill_seqs is None else max_prefill_seqs)
  return min(s, t), (-(-t // block_q) + prefills if max_prefill_seqs != 0 else 0)


def make_items(cu_q_lens, num_seqs, *, t: int, lo: int, hi: int | None, block_q: int, count: int) -> Items:
  """The items of the sequences with lo < q_len <= hi (hi None: no upper bound) and index < num_seqs."""
  s = cu_q_lens.shape[0] - 1
  q_len = cu_q_lens[1:] - cu_q_lens[:-1]
  live = (jnp.arange(s) < num_seqs[0]) & (q_len > lo)
  if hi is not None:
    live &= q_len <= hi
  chunks = jnp.where(live, (q_len + block_q - 1) // block_q, 0)
  ends = jnp.cumsum(chunks)
  item = jnp.arange(count, dtype=jnp.int32)
  seq = jnp.searchsorted(ends, item, side="right").astype(jnp.int32)  # first sequence whose items end past it
  real = seq < s
  seq = jnp.minimum(seq, s - 1)
  chunk = item - (ends[seq] - chunks[seq])
  rows = jnp.where(real, jnp.clip(q_len[seq] - chunk * block_q, 0, block_q), 0)
  r = jnp.arange(block_q, dtype=jnp.int32)
  tokens = jnp.where(r[None, :] < rows[:, None], cu_q_lens[seq][:, None] + chunk[:, None] * block_q + r[None, :], t)
  return Items(seq, jnp.where(real, chunk, 0).astype(jnp.int32), rows.astype(jnp.int32), tokens.astype(jnp.int32))


def gather_queries(q, items: Items, kv_heads: int):
  """q [T, Hq, D] -> [KVH, n, block_q * G, D] (unreal rows zero)."""
  t, hq, d = q.shape
  n, bq = items.tokens.shape
  g = hq // kv_heads
  rows = jnp.take(q, items.tokens.reshape(-1), axis=0, mode="fill", fill_value=0)  # [n * bq, Hq, D]
  return rows.reshape(n, bq, kv_heads, g, d).transpose(2, 0, 1, 3, 4).reshape(kv_heads, n, bq * g, d)


def scatter_outputs(out, o_items, items: Items):
  """Write o_items [KVH, n, block_q * G, D] into the rows of out [T, Hq, D] they belong to."""
  kvh, n, _, d = o_items.shape
  bq = items.tokens.shape[1]
  rows = o_items.reshape(kvh, n, bq, -1, d).transpose(1, 2, 0, 3, 4).reshape(n * bq, -1, d)
  return out.at[items.tokens.reshape(-1)].set(rows.astype(out.dtype), mode="drop")


def query_span(kv_len, q_len, chunk, rows, block_q: int, sliding_window: int | None):
  """(position of the item's first row, first visible key, end of the visible keys (exclusive)).

  Keys in [first, end) cover every key any of the item's rows sees; end <= first means none."""
  q_first = kv_len - q_len + chunk * block_q
  end = jnp.minimum(q_first + rows, kv_len)  # causal: the last row sees up to its own position
  first = jnp.zeros_like(q_first) if sliding_window is None else jnp.maximum(q_first - sliding_window + 1, 0)
  end = jnp.where(rows > 0, end, 0)
  return q_first, first, end
