"""The paged cache's block manager (host side): which block of the pool holds what, and the prefix cache.

>>> from jaxeff.inference.blocks import BlockManager
>>> blocks = BlockManager(num_blocks=8, block_size=4)
>>> prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
>>> hashes = blocks.hashes(prompt)                  # one per full block: 2
>>> first = blocks.allocate(3)                       # a new sequence's blocks
>>> blocks.register(first[:2], hashes)               # its full blocks, once their keys are written
>>> blocks.release(first)                            # it ends: the blocks stay cached until reused
>>> blocks.match(hashes, len(prompt))                # the next request with this prompt reuses them
[0, 1]

vLLM's design (../shared/notes/serving.md, "Paged KV cache" and "Automatic prefix caching"): every
block has a reference count; free blocks wait in an LRU queue (an ordered dict: the head is the
block evicted next); a block that becomes full is keyed by a hash of its tokens chained with the
hash of everything before it (`hashes`), so equal keys mean equal prefixes. A new sequence takes
(`acquire`) the longest chain of cached blocks of its prompt (`match`: whole blocks, and never the
whole prompt, since its last token must run to give the first new token's logits), and allocates
the rest (`allocate`): a block taken from the free queue loses its old key. When a sequence ends
(`release`) its blocks go back to the queue's tail, its last block first (evicted before its
earlier blocks, which more prompts share), still keyed: a later request with the same prefix finds
them until they are reused. Blocks are only shared when full and never written again, so sharing
needs no copy; `fork` (parallel samples of one prompt) shares a partly filled last block too, and
`writable` gives a sequence its own copy of such a block before it writes (copy-on-write).

The root hash is fixed (not per process), so keys are stable across runs; SHA-256 keeps collisions
out of reach when prompts come from many clients.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from jaxeff.errors import GenerationError

ROOT = hashlib.sha256(b"jaxeff prefix cache").digest()


class BlockManager:
  """Reference counts, the free queue and the prefix cache of a pool of `num_blocks` blocks.

  Args:
    num_blocks: blocks in the pool.
    block_size: tokens per block.
    prefix_caching: keep full blocks keyed by their prefix and reuse them (`match` finds nothing
      when off, and `register` keeps nothing).
  """

  def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
    if num_blocks < 1 or block_size < 1:
      raise GenerationError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
    self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
    self.refs = np.zeros(num_blocks, np.int32)
    self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
    self._key: dict[int, bytes] = {}  # block -> its prefix hash (full blocks only)
    self._cached: dict[bytes, int] = {}  # prefix hash -> block
    self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
    self.hit_tokens = 0  # of those, found

  @property
  def num_free(self) -> int:
    """Blocks no sequence holds (cached or empty): what `allocate` can hand out."""
    return len(self._free)

  @property
  def num_cached(self) -> int:
    """Blocks keyed in the prefix cache (held by a sequence or waiting in the free queue)."""
    return len(self._cached)

  def blocks_for(self, tokens: int) -> int:
    return -(-tokens // self.block_size)

  def hashes(self, tokens: Sequence[int], start: int = 0, parent: bytes | None = None) -> list[bytes]:
    """Prefix hashes of the full blocks of `tokens` from block `start` on (`parent`: block start-1's
    hash; ROOT for the first)."""
    out, bs = [], self.block_size
    parent = ROOT if parent is None else parent
    arr = np.asarray(tokens, np.int64)
    for j in range(start, len(arr) // bs):
      parent = hashlib.sha256(parent + arr[j * bs : (j + 1) * bs].tobytes()).digest()
      out.append(parent)
    return out

  def match(self, hashes: Sequence[bytes], prompt_tokens: int, *, count: bool = True) -> list[int]:
    """The cached blocks of the longest cached prefix of a prompt of `prompt_tokens` tokens whose
    full blocks hash to `hashes` (at most `prompt_tokens - 1` tokens: the last one must run).
    Counts the lookup in `queried_tokens` / `hit_tokens` (`count`; or later with `count`);
    `acquire` the blocks to keep them."""
    found = []
    if self.prefix_caching:
      for h in hashes[: (prompt_tokens - 1) // self.block_size]:
        block = self._cached.get(h)
        if block is None:
          break
        found.append(block)
    if count:
      self.count(prompt_tokens, len(found))
    return found

  def count(self, prompt_tokens: int, hit_blocks: int) -> None:
    """Records a lookup of `prompt_tokens` tokens that found `hit_blocks` blocks."""
    self.queried_tokens += prompt_tokens
    self.hit_tokens += hit_blocks * self.block_size

  def acquire(self, blocks: Sequence[int]) -> None:
    """One more holder of each of `blocks` (a cache hit, or a fork): out of the free queue."""
    for b in blocks:
      if self.refs[b] == 0:
        del self._free[b]
      self.refs[b] += 1

  def allocate(self, n: int) -> list[int] | None:
    """`n` fresh blocks (their old keys dropped), or None when fewer than `n` are free."""
    if n > len(self._free):
      return None
    out = []
    for _ in range(n):
      block, _ = self._free.popitem(last=False)  # least recently freed first
      key = self._key.pop(block, None)
      if key is not None and self._cached.get(key) == block:
        del self._cached[key]
      self.refs[block] = 1
      out.append(block)
    return out

  def release(self, blocks: Sequence[int]) -> None:
    """A sequence gives its blocks back (in table order); unheld ones join the free queue's tail,
    the sequence's last block first so that it is evicted before the prefix others share."""
    for b in reversed(blocks):
      if self.refs[b] <= 0:
        raise GenerationError(f"block {b} released more often than it was taken")
      self.refs[b] -= 1
      if self.refs[b] == 0:
        self._free[b] = None
        if b not in self._key:  # an unkeyed block has nothing to offer: reuse it first
          self._free.move_to_end(b, last=False)

  def register(self, blocks: Sequence[int], hashes: Sequence[bytes]) -> None:
    """Keys full blocks (their keys and values written) by their prefix hashes, so later prompts
    find them. A prefix already cached in another block keeps that block."""
    if not self.prefix_caching:
      return
    for b, h in zip(blocks, hashes):
      if b in self._key or h in self._cached:
        continue
      self._key[b], self._cached[h] = h, b

  def fork(self, blocks: Sequence[int]) -> list[int]:
    """A second sequence sharing all of `blocks` (parallel samples of one prompt): its table."""
    self.acquire(blocks)
    return list(blocks)

  def writable(self, table: list[int], index: int) -> tuple[int, int] | None:
    """Makes `table[index]` the sequence's own before it writes there: when the block is shared,
    a fresh block replaces it in `table` and (source, copy) is returned for the device copy
    (`Paged.copy_blocks`); None when it was already its own. Raises when no block is free."""
    block = table[index]
    if self.refs[block] <= 1:
      return None
    fresh = self.allocate(1)
    if fresh is None:
      raise GenerationError("no free block for a copy-on-write")
    self.release([block])
    table[index] = fresh[0]
    return block, fresh[0]

  @property
  def hit_rate(self) -> float:
    return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
