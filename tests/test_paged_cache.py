"""The paged KV cache: the block manager's bookkeeping (reference counts, LRU eviction, prefix
hashes, copy-on-write) against its rules, and the policy against the dense cache (an independent
path: one slot per position) on random block tables, ragged steps and speculation."""

import jax.numpy as jnp
import numpy as np
import pytest
from serving import tiny_model

from jaxeff.errors import ConfigError, GenerationError
from jaxeff.generate import Generator
from jaxeff.generate.speculative import spec as speculate_spec
from jaxeff.inference import ModelRunner, row_arrays
from jaxeff.inference.blocks import BlockManager
from jaxeff.inference.cache import Dense, PackedLayout, Paged, RaggedLayout, parse
from jaxeff.inference.sampling import SamplingShape

# ---------------------------------------------------------------------- the block manager


def test_blocks_are_counted_and_the_last_block_of_a_freed_sequence_is_evicted_first():
  m = BlockManager(num_blocks=6, block_size=2)
  a = m.allocate(3)
  assert a == [0, 1, 2] and m.num_free == 3 and list(m.refs[:3]) == [1, 1, 1]
  tokens = [5, 6, 7, 8, 9, 10]
  m.register(a, m.hashes(tokens))
  assert m.allocate(4) is None  # only 3 free: nothing handed out
  m.release(a)
  assert m.num_free == 6 and m.num_cached == 3
  # Unkeyed blocks first, then the released sequence's last block before its first ones.
  order = m.allocate(6)
  assert order[:3] == [3, 4, 5] and order[3:] == [2, 1, 0]
  assert m.num_cached == 0  # reused blocks lose their keys
  with pytest.raises(GenerationError, match="released more often"):
    m.release([0, 0])


def test_prefix_hashes_chain_and_a_match_keeps_the_last_token_to_compute():
  m = BlockManager(num_blocks=8, block_size=4)
  h = m.hashes(list(range(12)))
  assert len(h) == 3 and len(set(h)) == 3
  # A block's key depends on everything before it, not only on its own tokens.
  assert m.hashes([9, 9, 9, 9, 4, 5, 6, 7])[1] != h[1]
  # Incremental hashing equals hashing the whole text.
  assert m.hashes(list(range(12)), start=2, parent=h[1]) == h[2:]
  blocks = m.allocate(3)
  m.register(blocks, h)
  m.release(blocks)
  assert m.match(h, 13) == blocks  # 13 tokens: 3 whole blocks, the 13th runs
  assert m.match(h, 12) == blocks[:2]  # exactly 12: the last block is recomputed for the logits
  assert m.match(m.hashes([1] * 12), 12) == []
  assert m.queried_tokens == 37 and m.hit_tokens == 20
  off = BlockManager(num_blocks=8, block_size=4, prefix_caching=False)
  off.register(off.allocate(3), h)
  assert off.match(h, 13) == [] and off.num_cached == 0


def test_a_fork_shares_blocks_and_copies_the_shared_block_it_writes():
  m = BlockManager(num_blocks=4, block_size=4)
  first = m.allocate(2)
  second = m.fork(first)
  assert list(m.refs[first]) == [2, 2]
  copy = m.writable(second, 1)
  assert copy == (first[1], second[1]) and second[1] not in first
  assert list(m.refs[first]) == [2, 1] and m.refs[second[1]] == 1
  assert m.writable(second, 1) is None  # now its own
  m.allocate(1)
  with pytest.raises(GenerationError, match="no free block"):
    m.writable(second, 0)


# ---------------------------------------------------------------------- the policy


@pytest.fixture(scope="module")
def model():
  return tiny_model(dtype="float32")


def test_parse_and_bad_settings():
  assert parse("paged") == Paged() and parse("paged:32") == Paged(block_size=32)
  with pytest.raises(GenerationError, match="block_size"):
    Paged(block_size=0)
  with pytest.raises(GenerationError, match="paged:BLOCK_SIZE"):
    parse("paged:a")


def test_scattered_block_tables_give_the_dense_cache_logits(model):
  """Prefill and decode through shuffled, non-contiguous block tables equal the dense cache."""
  cfg = model.cfg
  rng = np.random.default_rng(0)
  policy = Paged(block_size=4, num_blocks=40)
  paged = policy.init(cfg, batch_size=2, length=32)
  tables = rng.permutation(40)[:16].reshape(2, 8).astype(np.int32)
  paged = policy.with_tables(paged, tables)
  dense = Dense().init(cfg, batch_size=2, length=32)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 11)), jnp.int32)
  positions = jnp.asarray(np.stack([np.arange(11), np.arange(11) + 3]), jnp.int32)  # row 1 starts at 3
  outs = []
  for cache in (dense, paged):
    x, cache = model.forward_with_cache(tokens, positions, cache)
    y, cache = model.forward_with_cache(tokens[:, :1], positions[:, -1:] + 1, cache)
    outs.append((x, y))
  paged = cache
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=1e-5)
  np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)
  # The keys landed in the rows' own blocks: position 13 of row 1 is block tables[1, 3], offset 1.
  keys = paged.layer(0)[0] if not cfg.scan_layers else paged.layers[0][0]
  assert float(jnp.abs(keys[tables[1, 3], :, 1]).sum()) > 0
  untouched = sorted(set(range(40)) - set(tables.reshape(-1).tolist()))
  assert float(jnp.abs(keys[np.asarray(untouched)]).sum()) == 0


def test_a_ragged_step_equals_its_rows_run_apart(model):
  """Decode rows and prefill chunks packed in one token row: the same tokens as running them as
  separate batches (the runner's step against its prefill and decode programs)."""
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 256, n) for n in (9, 21, 5)]
  policy = Paged(block_size=4)

  def setup():
    runner = ModelRunner(model, max_batch=3, max_seq_len=40, kv_cache=policy)
    rows = row_arrays([None] * 3)
    return runner, rows

  # Apart: rows 0 and 1 prefilled, then one decode step; row 2 prefilled later.
  runner, rows = setup()
  first = []
  for i in (0, 1):
    p = prompts[i]
    tok, _ = runner.prefill(p[None], starts=[0], lengths=[p.size], rows=row_arrays([None]), row0=i)
    first.append(int(tok[0]))
  nxt, _ = runner.decode(np.array(first + [0], np.int32), positions=np.array([9, 21, 0], np.int32), rows=rows,
                         live=np.array([True, True, False]), protect=True)  # fmt: skip
  p = prompts[2]
  last, _ = runner.prefill(p[None], starts=[0], lengths=[p.size], rows=row_arrays([None]), row0=2)
  apart = [int(nxt[0]), int(nxt[1]), int(last[0])]
  # Together: the same prefills first, then one ragged step with both decodes and row 2's prompt.
  runner, rows = setup()
  for i in (0, 1):
    p = prompts[i]
    runner.prefill(p[None], starts=[0], lengths=[p.size], rows=row_arrays([None]), row0=i)
  layout = RaggedLayout(decode=2, prefill=1, chunk=8)
  tokens = np.concatenate([first, prompts[2], np.zeros(3)]).astype(np.int32)
  positions = np.concatenate([[9, 21], np.arange(5), -np.ones(3)]).astype(np.int32)
  out, stopped = runner.step(
    tokens, positions=positions, seq_rows=np.array([0, 1, 2]), lengths=np.array([10, 22, 5]),
    rows=rows, layout=layout, shape=SamplingShape.any(),
  )  # fmt: skip
  assert [int(t) for t in out] == apart and not np.asarray(stopped).any()
  assert runner.traces[("step", layout, None, SamplingShape.any())] == 1
  # Packed: the same step unpadded, sequences listed out of row order, a padding sequence between
  # them and padding tokens at the end; a second mix of the same size reuses the program (it
  # rewrites the same keys at the same positions).
  runner, rows = setup()
  for i in (0, 1):
    p = prompts[i]
    runner.prefill(p[None], starts=[0], lengths=[p.size], rows=row_arrays([None]), row0=i)
  for seqs, pad in (([2, 0, -1, 1], 4), ([1, -1, 2, 0], 4)):
    parts = {0: ([first[0]], [9], 10), 1: ([first[1]], [21], 22), 2: (prompts[2], range(5), 5)}
    toks, pos, q_lens, lengths = [], [], [], []
    for i in seqs:
      t, q, n = parts[i] if i >= 0 else ([], [], 0)
      toks += list(t)
      pos += list(q)
      q_lens.append(len(t))
      lengths.append(n)
    tokens = np.array(toks + [0] * pad, np.int32)
    positions = np.array(pos + [-1] * pad, np.int32)
    out, stopped = runner.packed_step(
      tokens, positions=positions, seq_rows=np.array(seqs), cu_q_lens=np.cumsum([0] + q_lens),
      lengths=np.array(lengths), rows=row_arrays([None] * 4), shape=SamplingShape.any(), max_prefills=1,
    )  # fmt: skip
    got = {i: int(t) for i, t in zip(seqs, np.asarray(out)) if i >= 0}
    assert got == dict(enumerate(apart)) and np.asarray(out)[seqs.index(-1)] == -1
  assert runner.traces[("packed", 11, 4, SamplingShape.any())] == 1  # 7 tokens + 4 padding
  with pytest.raises(GenerationError, match="1 multi-token sequences, over max_prefills=0"):
    runner.packed_step(
      tokens, positions=positions, seq_rows=np.array(seqs), cu_q_lens=np.cumsum([0] + q_lens),
      lengths=np.array(lengths), rows=row_arrays([None] * 4), max_prefills=0,
    )  # fmt: skip
  dense = Dense().init(model.cfg, batch_size=1, length=8)
  with pytest.raises(ConfigError, match="ragged step needs a cache"):
    model.forward_with_cache(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), dense, layout=layout)
  gather = Paged(block_size=4, kernel="gather").init(model.cfg, batch_size=1, length=8)
  with pytest.raises(GenerationError, match="packed step runs the ragged"):
    packed = PackedLayout(jnp.array([0, 2], jnp.int32))
    model.forward_with_cache(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), gather, layout=packed)


@pytest.mark.parametrize("spec", ["lookup", "self:1"])
def test_generator_and_speculation_on_the_paged_cache_equal_dense(model, spec):
  """`Generator` on a paged cache (static tables) and speculative decoding through it (rejected
  draft tokens written into blocks and overwritten later) give the dense cache's tokens."""
  rng = np.random.default_rng(2)
  prompts = [list(rng.integers(0, 6, n)) for n in (7, 19)]  # repetitive: lookup drafts get accepted
  want = Generator(model, max_batch=2, max_seq_len=64).generate(prompts, max_new_tokens=16)
  got = Generator(model, max_batch=2, max_seq_len=64, kv_cache=Paged(block_size=8)).generate(prompts, max_new_tokens=16)
  assert got == want
  speculator = speculate_spec.from_spec(spec, model, num_draft=3)
  gen = Generator(model, max_batch=2, max_seq_len=64, kv_cache=Paged(block_size=8), speculator=speculator)
  assert gen.generate(prompts, max_new_tokens=16) == want


def test_copy_on_write_copies_a_block_in_every_layer(model):
  """The device side of `BlockManager.writable`: `ModelRunner.copy_blocks` copies whole blocks."""
  runner = ModelRunner(model, max_batch=2, max_seq_len=16, kv_cache=Paged(block_size=4))
  p = np.random.default_rng(3).integers(0, 256, 12)
  runner.prefill(p[None], starts=[0], lengths=[12], rows=row_arrays([None]), row0=0)  # blocks 0-2
  before = [np.asarray(x) for layer in range(model.cfg.num_layers) for x in runner.cache.layer(layer)]
  runner.copy_blocks([1, 2], [5, 7])
  after = [np.asarray(x) for layer in range(model.cfg.num_layers) for x in runner.cache.layer(layer)]
  for b, a in zip(before, after):
    assert np.abs(b[1]).sum() > 0
    np.testing.assert_array_equal(a[[5, 7]], b[[1, 2]])
    np.testing.assert_array_equal(np.delete(a, [5, 7], axis=0), np.delete(b, [5, 7], axis=0))


@pytest.mark.parametrize("window", [None, 6])
def test_the_ragged_kernel_equals_the_gather_path(window):
  """The ragged paged-attention op (its TPU kernel, in the interpreter) reading the block tables
  itself, against the gather path: a [rows, chunk] prefill, then a ragged step (two decode rows,
  a padding row, two padded prompt chunks) through shuffled tables, with and without the model's
  sliding window."""
  model = tiny_model(dtype="float32", sliding_window=window)
  rng = np.random.default_rng(4)
  tables = rng.permutation(48)[:15].reshape(5, 3).astype(np.int32)
  layout = RaggedLayout(decode=3, prefill=2, chunk=8)
  positions = np.concatenate([[13, 5, -1], np.arange(8) + 9, [0, 1, 2, 3, 4, -1, -1, -1]]).astype(np.int32)
  tokens = jnp.asarray(rng.integers(0, 256, layout.tokens)[None], jnp.int32)
  hidden, first = {}, {}
  for kernel in ("gather", "ragged"):
    policy = Paged(block_size=8, num_blocks=48, kernel=kernel, interpret=True)  # TPU tiles: 8 rows of f32
    cache = policy.with_tables(policy.init(model.cfg, batch_size=5, length=24), tables)
    # Earlier tokens of every row first (a plain chunk), then the ragged step.
    past = jnp.asarray(rng.integers(0, 256, (5, 16)), jnp.int32) if kernel == "gather" else past  # noqa: F821
    first[kernel], cache = model.forward_with_cache(past, jnp.asarray(np.tile(np.arange(16), (5, 1)), jnp.int32), cache)
    hidden[kernel], _ = model.forward_with_cache(tokens, jnp.asarray(positions[None]), cache, layout=layout)
  real = positions >= 0
  np.testing.assert_allclose(np.asarray(hidden["ragged"])[0, real], np.asarray(hidden["gather"])[0, real], atol=2e-5)
  np.testing.assert_allclose(np.asarray(first["ragged"]), np.asarray(first["gather"]), atol=2e-5)


def test_the_kernel_refuses_what_it_does_not_compute():
  model = tiny_model(dtype="float32", attention_sinks=2, sliding_window=8)
  cache = Paged(block_size=4, kernel="ragged").init(model.cfg, batch_size=1, length=8)
  with pytest.raises(ConfigError, match="without sinks or token trees"):
    model.forward_with_cache(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), cache)
  with pytest.raises(GenerationError, match="kernel must be one of auto, ragged, gather"):
    Paged(kernel="cuda")
