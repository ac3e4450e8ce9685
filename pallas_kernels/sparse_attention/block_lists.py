"""Mask semantics, block sizes and the block lists the kernels walk, all in jnp (jit-safe).

The mask (one definition, used by the reference, the XLA path and both kernels):

  visible(q, k) = key_valid(k) AND causal_ok AND pattern_ok
    causal_ok  = kv_pos <= q_pos                               (causal=True; else always true)
    pattern_ok = any of the restrictions that are given, or always true when none is:
                 window:   q_pos - kv_pos < window              (causal=False: |q_pos - kv_pos| < window)
                 sinks:    kv_pos < sinks                        (StreamingLLM's first tokens)
                 selected: the key's block (index // block_kv) is in
                           block_indices[b, kv_head, q_index // block_q, :]   (NSA's top-k)

Positions are per token (default 0..n-1); a KV cache passes its own (an empty slot gets a position
larger than any query, so causality hides it).

Block lists. For each (batch, kv head, query block) the kernels visit only the key blocks that hold
a visible pair, in increasing order: `ids[..., i, :count]`, padded to a static length by
repeating the last id (a TPU pipeline then skips the DMA for padding steps). Each entry carries two
flags: *selected* (the pattern allows the whole block, so only causality is checked per token) and
*full* (every pair in the block is visible: no per-token mask at all). The backward for dk/dv walks
the transposed lists: the (key block, query block) pairs sorted by key block, flattened into one
list with first/last markers (TPU) and per-key-block start/count (GPU).

The static length of a list is a bound that holds when positions grow by one per index (the
default, a KV cache in slot order): window ceil((bq + W - 2) / bk) + 1 blocks, sinks ceil(S / bk),
plus top-k. With explicit positions the bound is checked at run time and the op falls back to
lists of every block (exact, slower) when it does not hold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# A large finite value, not -inf: masked scores stay finite, so no inf - inf = NaN anywhere.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# log-sum-exp stored for a row with nothing visible: exp(s - DEAD_LSE) == 0 for every score s.
DEAD_LSE = 0.7 * float(np.finfo(np.float32).max)

# Entry flags packed into the low bits of a list entry (block id << FLAG_BITS).
FULL, SELECTED, FLAG_BITS = 1, 2, 2
# Transposed-entry flags (query block << T_FLAG_BITS).
T_VALID, T_FIRST, T_LAST, T_FULL, T_SELECTED, T_FLAG_BITS = 1, 2, 4, 8, 16, 5


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. `block_q` query positions and `block_kv` keys per block; `block_kv` is also the
  granularity of `block_indices` (NSA's selection block).

  GPU only: num_warps / num_stages for the Triton kernels; block_q_dkv, the rows of a query block
  the dk/dv kernel processes at a time, and num_stages_dkv, its pipelining depth (both keep its
  dk and dv accumulators in registers without spilling; None: block_q / num_stages). Defaults per
  backend live next to each kernel (tpu.py, gpu.py, cpu.py).
  """

  block_q: int = 128
  block_kv: int = 128
  num_warps: int = 4
  num_stages: int = 2
  block_q_dkv: int | None = None
  num_stages_dkv: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv", "num_warps", "num_stages", "block_q_dkv", "num_stages_dkv"):
      value = getattr(self, name)
      if not (value is None and name.endswith("_dkv")) and (not isinstance(value, int) or value < 1):
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Mask:
  """The static part of the mask (see the module docstring)."""

  causal: bool = True
  window: int | None = None
  sinks: int = 0
  selection: bool = False  # block_indices given

  @property
  def restricted(self) -> bool:
    return self.window is not None or self.sinks > 0 or self.selection


def token_visible(mask: Mask, q_pos, kv_pos, selected):
  """Per-token visibility from broadcastable q_pos, kv_pos and a block-selected flag.

  Pure jnp elementwise ops, so the reference, the XLA path and both kernels share it.
  """
  ok = None
  if mask.causal:
    ok = kv_pos <= q_pos
  if mask.restricted:
    pattern = selected
    if mask.window is not None:
      in_window = q_pos - kv_pos < mask.window
      if not mask.causal:
        in_window = jnp.logical_and(in_window, kv_pos - q_pos < mask.window)
      pattern = jnp.logical_or(pattern, in_window)
    if mask.sinks:
      pattern = jnp.logical_or(pattern, kv_pos < mask.sinks)
    ok = pattern if ok is None else jnp.logical_and(ok, pattern)
  if ok is None:
    ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_pos), jnp.shape(kv_pos)), bool)
  return jnp.broadcast_to(ok, jnp.broadcast_shapes(jnp.shape(ok), jnp.shape(q_pos), jnp.shape(kv_pos)))


def max_blocks(mask: Mask, *, num_kv_blocks: int, block_q: int, block_kv: int, topk: int) -> int:
  """Static list length: enough key blocks per query block when positions grow by one per index."""
  if not mask.restricted:
    return num_kv_blocks
  n = 0
  if mask.window is not None:
    span = block_q + mask.window - 1 if mask.causal else block_q + 2 * mask.window - 2
    n += math.ceil((span - 1) / block_kv) + 1
  if mask.sinks:
    n += math.ceil(mask.sinks / block_kv)
  if mask.selection:
    n += topk
  return max(1, min(n, num_kv_blocks))


class BlockLists(NamedTuple):
  """Lists for one set of shapes; leading dims [Bl, Gl] are 1 when shared by all batches/heads."""

  ids: jax.Array  # [Bl, Gl, nq, maxb] int32: key block << FLAG_BITS | flags
  counts: jax.Array  # [Bl, Gl, nq] int32: valid entries of ids
  t_kv: jax.Array  # [Bl, Gl, P] int32: key block of each transposed entry, nondecreasing
  t_info: jax.Array  # [Bl, Gl, P] int32: query block << T_FLAG_BITS | T_* flags
  t_start: jax.Array  # [Bl, Gl, nk] int32: first entry of each key block
  t_count: jax.Array  # [Bl, Gl, nk] int32: valid entries of each key block (0: write zeros)
  fits: jax.Array  # [] bool: no row was cut off at maxb


def list_offset(lb: int, lg: int, *dims: int):
  """offset(b, g, *rest) into a list flattened from [lb, lg, *dims] (kernels read lists as 1-D);
  batch / head index 0 when the list is shared (lb or lg == 1)."""

  def offset(b, g, *rest):
    off = (b if lb > 1 else 0) * lg + (g if lg > 1 else 0)
    for r, n in zip(rest, dims):
      off = off * n + r
    return off

  return offset


def _compact(flags, size: int):
  """Indices of the True entries of each row (in order) in `size` slots, and their count.

  Slots past the count repeat the last index (0 for an empty row).
  """
  n = flags.shape[-1]
  iota = jnp.arange(n, dtype=jnp.int32)
  # top_k of (n - index) over the True entries lists them in increasing index order.
  _, out = jax.lax.top_k(jnp.where(flags, n - iota, -1), min(size, n))
  if size > n:
    out = jnp.concatenate([out, jnp.zeros((*out.shape[:-1], size - n), out.dtype)], axis=-1)
  count = jnp.minimum(jnp.sum(flags, axis=-1, dtype=jnp.int32), size)
  last = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  out = jnp.where(jnp.arange(size) < count[..., None], out, jnp.where(count[..., None] > 0, last, 0))
  return out.astype(jnp.int32), count


def _block_bounds(pos, valid_len: int, block: int):
  """min / max position of each block, over the valid (unpadded) tokens only."""
  b, n = pos.shape
  nblocks = pl_cdiv(n, block)
  pos = pos[:, :valid_len]
  pos = jnp.pad(pos, ((0, 0), (0, nblocks * block - valid_len)), mode="edge")
  pos = pos.reshape(b, nblocks, block)
  return pos.min(-1), pos.max(-1)


def pl_cdiv(a: int, b: int) -> int:
  return -(-a // b)


def block_masks(mask: Mask, q_pos, kv_pos, block_indices, *, seq_q: int, seq_kv: int, block_q: int, block_kv: int):
  """(need, full, selected): [Bl, Gl, nq, nk] bools at block granularity.

  need: the block holds a visible pair (conservative for unusual positions, exact for
  positions that grow by one per index); full: every pair in it is visible; selected: the pattern
  allows the whole block (top-k selected, or no restriction at all).
  q_pos [Bq, S'] and kv_pos [Bk, T'] may be padded past seq_q / seq_kv (padding is ignored).
  """
  qmin, qmax = _block_bounds(q_pos, seq_q, block_q)  # [Bq, nq]
  kmin, kmax = _block_bounds(kv_pos, seq_kv, block_kv)  # [Bk, nk]
  nq, nk = qmin.shape[1], kmin.shape[1]
  qmin, qmax = qmin[:, :, None], qmax[:, :, None]
  kmin, kmax = kmin[:, None, :], kmax[:, None, :]
  need = full = jnp.ones((1, 1, 1), bool)
  if mask.causal:
    need = kmin <= qmax
    full = kmax <= qmin
  key_whole = (jnp.arange(nk) + 1) * block_kv <= seq_kv  # the last block may be partly padding
  full = full & key_whole
  if block_indices is not None:
    # [B, KVH, nq, k] -> [B, KVH, nq, nk]; entries < 0 or >= nk match no block (padding).
    selected = (block_indices.astype(jnp.int32)[..., None] == jnp.arange(nk)).any(-2)
  else:
    selected = jnp.zeros((1, 1, 1, 1), bool)
  if mask.restricted:
    pattern = pattern_full = selected
    if mask.window is not None:
      w = mask.window
      reach, whole = kmax > qmin - w, kmin > qmax - w
      if not mask.causal:
        reach, whole = reach & (kmin < qmax + w), whole & (kmax < qmin + w)
      pattern, pattern_full = pattern | reach[:, None], pattern_full | whole[:, None]
    if mask.sinks:
      pattern, pattern_full = pattern | (kmin < mask.sinks)[:, None], pattern_full | (kmax < mask.sinks)[:, None]
    need, full = need[:, None] & pattern, full[:, None] & pattern_full
  else:
    selected = jnp.ones((1, 1, 1, 1), bool)
    need, full = need[:, None], full[:, None]
  shape = jnp.broadcast_shapes(need.shape, full.shape, selected.shape, (1, 1, nq, nk))
  return tuple(jnp.broadcast_to(x, shape) for x in (need, full, selected))


def build_block_lists(need, full, selected, *, max_blocks: int) -> BlockLists:
  """Forward and transposed lists from the block masks of `block_masks`."""
  bl, gl, nq, nk = need.shape
  full, selected = full & need, selected & need
  ids, counts = _compact(need, max_blocks)
  fits = jnp.all(jnp.sum(need, axis=-1) <= max_blocks)
  flags = (
    jnp.take_along_axis(full, ids, axis=-1) * FULL + jnp.take_along_axis(selected, ids, axis=-1) * SELECTED
  ).astype(jnp.int32)
  ids_packed = (ids << FLAG_BITS) | flags

  # Transposed: pairs sorted by key block; a key block no query block sees gets one invalid entry,
  # so every key block has a run and its dk/dv are written (as zeros).
  # Only the pairs the forward lists keep (the first max_blocks of each row).
  kept = need & (jnp.cumsum(need, axis=-1, dtype=jnp.int32) <= max_blocks)
  kept_t = jnp.swapaxes(kept, -1, -2)  # [.., nk, nq]
  per_kv = jnp.sum(kept_t, axis=-1, dtype=jnp.int32)  # [.., nk]
  aug = jnp.concatenate([kept_t, (per_kv == 0)[..., None]], axis=-1).reshape(bl, gl, nk * (nq + 1))
  size = nq * max_blocks + nk
  entries, total = _compact(aug, size)
  t_kv, t_q = entries // (nq + 1), entries % (nq + 1)
  p = jnp.arange(size)
  valid = (t_q < nq) & (p < total[..., None])
  t_q = jnp.minimum(t_q, nq - 1)
  first = jnp.concatenate([jnp.ones_like(t_kv[..., :1], bool), t_kv[..., 1:] != t_kv[..., :-1]], -1)
  last = jnp.concatenate([t_kv[..., 1:] != t_kv[..., :-1], jnp.ones_like(t_kv[..., :1], bool)], -1)
  pair = t_q * nk + t_kv
  t_full = jnp.take_along_axis(full.reshape(bl, gl, -1), pair, axis=-1)
  t_sel = jnp.take_along_axis(selected.reshape(bl, gl, -1), pair, axis=-1)
  t_info = (
    (t_q << T_FLAG_BITS) | valid * T_VALID | first * T_FIRST | last * T_LAST | t_full * T_FULL | t_sel * T_SELECTED
  ).astype(jnp.int32)
  runs = jnp.maximum(per_kv, 1)
  t_start = jnp.cumsum(runs, axis=-1, dtype=jnp.int32) - runs
  return BlockLists(
    ids_packed.astype(jnp.int32),
    counts.astype(jnp.int32),
    t_kv.astype(jnp.int32),
    t_info,
    t_start.astype(jnp.int32),
    per_kv,
    fits,
  )


def topk_block_indices(block_scores, k: int, *, block_q: int, block_kv: int, causal: bool = True, q_offset: int = 0):
  """Top-k key blocks per (batch, kv head, query block) from block scores; jit-safe.

  Args:
    block_scores: [B, KVH, nq, nk] scores (e.g. NSA's compressed-attention scores, summed over the
      query heads of a group so the selection is shared by them).
    k: blocks to select (static). Fewer candidates than k (early query blocks under causality)
      leave -1 entries, which the op ignores.
    block_q, block_kv: the block sizes the op will run with.
    causal: only blocks whose first key is at or before the query block's last position are
      candidates (positions 0..n-1, queries starting at `q_offset`).
  Returns:
    [B, KVH, nq, k] int32 block ids, best first; -1 where fewer than k candidates exist.
  """
  nq, nk = block_scores.shape[-2:]
  scores = block_scores.astype(jnp.float32)
  if causal:
    last_q = q_offset + (jnp.arange(nq) + 1) * block_q - 1
    first_k = jnp.arange(nk) * block_kv
    scores = jnp.where(first_k[None, :] <= last_q[:, None], scores, -jnp.inf)
  k_eff = min(k, nk)
  values, idx = jax.lax.top_k(scores, k_eff)
  idx = jnp.where(jnp.isneginf(values), -1, idx).astype(jnp.int32)
  if k_eff < k:
    idx = jnp.concatenate([idx, jnp.full((*idx.shape[:-1], k - k_eff), -1, jnp.int32)], axis=-1)
  return idx


@dataclasses.dataclass(frozen=True)
class Problem:
  """Everything static about one call, handed to a kernel's forward/backward."""

  mask: Mask
  seq_q: int  # valid query positions (arrays are padded to a multiple of block_q)
  seq_kv: int  # valid keys (padded to a multiple of block_kv)
  block_q: int
  block_kv: int
  groups: int  # query heads per kv head
  num_warps: int = 4
  num_stages: int = 2
  block_q_dkv: int | None = None
  num_stages_dkv: int | None = None
  interpret: object = False
