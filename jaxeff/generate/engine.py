"""Generator: static-KV-cache text generation, compiled once, cache buffers donated.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> model = Llama(cfg, rngs=nnx.Rngs(0))
>>> from jaxeff.generate import Generator
>>> gen = Generator(model, max_batch=2, max_seq_len=32)
>>> new_ids = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=4)           # greedy: 4 ids per prompt
>>> [len(ids) for ids in new_ids]
[4, 4]
>>> sampled = gen.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.7, top_p=0.9, seed=1)
>>> steps = list(gen.stream([[1, 2, 3], [4]], max_new_tokens=3))           # per step, an id per row
>>> len(steps), len(steps[0])                                              # (None once a row stops)
(3, 2)

The gpt-fast / MaxText pattern on top of `model.forward_with_cache(tokens, positions, cache)`:
- Prefill runs the prompts, right-padded to a power-of-two length bucket (so a new prompt length
  rarely compiles), writes their keys/values into the cache and samples each row's first token from
  its own last position.
- Decode runs one token per row at that row's own position. Sampling happens inside the compiled
  step, so only token ids ever leave the device. The cache is donated to every call, so XLA updates
  it in place; the Generator keeps the one cache and reuses it for every request.
- `generate` runs the decode loop on the device (`lax.while_loop` over up to max_new_tokens
  steps, stopping early when every row has hit a stop token): one dispatch per request. `stream`
  runs a host loop over the compiled step, yielding each token as it comes (the next step is
  dispatched before the previous token is read, so the device does not wait for Python).
  `python -m jaxeff.bench decode` measures both; BENCHMARKS.md has the numbers.
- Ragged batches: each row has its own length and positions and the cache masks by position, so a
  row in a batch gets what it would get alone (same seed, same sampled tokens: each row draws from
  its own key, folded with the position of the token being sampled).

Stop tokens end a row; the stop token itself is not returned. On a mesh, pass `mesh=`: the model's
weights are placed by their logical axes (if they are not already) and the cache is created in its
sharding (batch over data/fsdp, kv heads over tensor).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.generate import kv_cache as kv_cache_lib
from jaxeff.generate.sampling import SamplingParams, sample
from jaxeff.generate.speculative.decode import SpeculativeDecoder
from jaxeff.models.attention import index_positions

MAX_STOP_TOKENS = 16  # stop ids travel as a fixed-size array, so their number never recompiles
LOOPS = ("device", "host")


@dataclasses.dataclass
class GenerationStats:
  """Timing of the last `generate`/`stream` call (all chunks of it)."""

  prompt_tokens: int = 0
  prefill_seconds: float = 0.0
  new_tokens: int = 0  # tokens returned, over all rows
  decode_tokens: int = 0  # of those, the ones decode produced (each row's first comes from prefill)
  decode_steps: int = 0  # decode steps run (one token per row each)
  decode_seconds: float = 0.0
  cache_bytes: int = 0
  target_forwards: int = 0  # forwards of the target after prefill (decode steps, or verifications)
  draft_seconds: float = 0.0  # speculative decoding: time in the draft programs (part of decode_seconds)
  # speculative decoding: {draft tokens accepted: how many times} over live rows and verifications
  accepted_histogram: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

  @property
  def decode_tokens_per_s(self) -> float:
    """Decoded tokens per second, all rows together."""
    return self.decode_tokens / self.decode_seconds if self.decode_seconds else float("nan")

  @property
  def tokens_per_forward(self) -> float:
    """Mean tokens a row gains per target forward: 1 for plain decoding, 1 + accepted drafts when
    speculating (before stop tokens and the token budget cut a row's last step short)."""
    rows = sum(self.accepted_histogram.values())
    if not rows:
      return 1.0 if self.target_forwards else float("nan")
    return 1.0 + sum(k * v for k, v in self.accepted_histogram.items()) / rows

  @property
  def draft_share(self) -> float:
    """Fraction of decode time spent drafting (0 without a speculator)."""
    return self.draft_seconds / self.decode_seconds if self.decode_seconds else float("nan")


def prefill_bucket(length: int, max_seq_len: int, min_bucket: int = 16) -> int:
  """The padded length a prompt of `length` tokens is prefilled at: a power of two >= min_bucket, capped."""
  bucket = max(min_bucket, 1 << max(0, length - 1).bit_length())
  return min(bucket, max_seq_len)


def _fold_positions(keys: jax.Array, positions: jax.Array) -> jax.Array:
  return jax.vmap(jax.random.fold_in)(keys, positions)


class Generator:
  """Batched generation with a static KV cache; compiled programs and the cache are reused.

  Args:
    model: a `jaxeff.models.Llama` (float, bf16, or `jaxeff.quantize`d). Its weights are used as
      they are at construction (the arrays are shared, not copied).
    max_batch: rows decoded together; `generate` serves more prompts in chunks of this size.
    max_seq_len: cache length per row: prompt plus new tokens must fit.
    mesh: optional device mesh; weights are placed by their logical axes and the cache is created
      sharded (see `jaxeff.sharding`).
    min_prefill_bucket: smallest padded prompt length (buckets are powers of two from here).
    loop: "device" (default for `generate`: an on-device `lax.while_loop`) or "host" (a Python loop
      over the compiled one-token step, as `stream` always uses).
    kv_cache: a cache policy from `jaxeff.generate.kv_cache` (default `Dense()`: one slot per
      position). A bounded one (`StreamingLLM`, `H2O`) keeps a fixed-size buffer instead, so prompt
      plus new tokens may run past max_seq_len (prompts longer than its window are prefilled in
      chunks); `SnapKV` compresses the prompt, so min(prompt, budget) plus new tokens must fit.
    speculator: a `jaxeff.generate.speculative` speculator (PromptLookup, SelfDraft, DraftModel,
      Medusa): each step drafts tokens and the target verifies them in one forward, with the same
      results (greedy: token for token; sampled: the same distribution). Each row then needs the
      speculator's lookahead (its tree's draft tokens) in cache positions beyond its new tokens.
  """

  def __init__(
    self,
    model,
    *,
    max_batch: int,
    max_seq_len: int,
    mesh: jax.sharding.Mesh | None = None,
    min_prefill_bucket: int = 16,
    loop: str = "device",
    speculator=None,
    kv_cache=None,
  ):
    if max_batch < 1 or max_seq_len < 2:
      raise GenerationError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
    if loop not in LOOPS:
      raise GenerationError(f"loop must be one of {LOOPS}, got {loop!r}")
    self.cfg = model.cfg
    self.max_batch, self.max_seq_len, self.mesh, self.loop = max_batch, max_seq_len, mesh, loop
    self.min_prefill_bucket = min_prefill_bucket
    self._graphdef, state = nnx.split(model)
    self.use_weights(state)
    # How often each program was traced; each trace is one compilation (tests assert on it).
    self.traces: collections.Counter = collections.Counter()
    self._prefill = jax.jit(self._prefill_fn, static_argnames="sampling", donate_argnames="cache")
    self._decode = jax.jit(self._decode_fn, static_argnames="sampling", donate_argnames="cache")
    self._loop = jax.jit(self._loop_fn, static_argnames=("sampling", "out_len"), donate_argnames="cache")
    self.kv_cache = kv_cache_lib.Dense() if kv_cache is None else kv_cache
    # Any other policy reads prompts through its own cache in chunks (padding never written) and
    # keeps no slot per position beyond what it chose.
    self.chunked_prefill = not isinstance(self.kv_cache, kv_cache_lib.Dense)
    if self.chunked_prefill and speculator is not None:
      raise GenerationError("speculative decoding runs on the dense cache; drop kv_cache or the speculator")
    self._ring_prefill = jax.jit(self._ring_prefill_fn, static_argnames="sampling", donate_argnames="cache")
    with self._mesh():
      self._cache = jax.jit(lambda: self.kv_cache.init(self.cfg, max_batch, max_seq_len))()
    if mesh is None:  # committed, as the donated cache comes back: otherwise the second call recompiles
      self._cache = jax.device_put(self._cache, jax.tree.leaves(state)[0].sharding)
    self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(self._cache))
    self.speculator = speculator
    self._speculative = None if speculator is None else SpeculativeDecoder(self, speculator)
    if self._speculative is not None:
      self.cache_bytes += self._speculative.cache_bytes
    self.stats = GenerationStats(cache_bytes=self.cache_bytes)

  def use_weights(self, state) -> None:
    """Serves these weights from now on: an `nnx.state` of a model with this Generator's graph
    and the same shapes and dtypes (e.g. after more training); nothing recompiles."""
    if self.mesh is not None:
      state = jax.device_put(state, sharding.state_shardings(state, self.mesh))
    self._state = state

  @property
  def weight_bytes(self) -> int:
    """Bytes of the served weights (quantized ones as stored): what a decode step reads at least once."""
    return sum(x.nbytes for x in jax.tree.leaves(self._state) if hasattr(x, "nbytes"))

  # ------------------------------------------------------------------ compiled programs

  def _model(self, state):
    return nnx.merge(self._graphdef, state)

  def _prefill_fn(self, state, cache, tokens, lengths, keys, values, *, sampling):
    """Prompts [B, L] (right-padded; `lengths` [B]) -> (first new token [B], cache)."""
    self.traces["prefill", tokens.shape[1], sampling] += 1
    model = self._model(state)
    positions = index_positions(*tokens.shape)
    x, cache = model.forward_with_cache(tokens, positions, cache)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)
    return sample(logits, _fold_positions(keys, lengths), sampling, values), cache

  def _ring_prefill_fn(self, state, cache, tokens, start, lengths, keys, values, first, *, sampling):
    """One chunk of the prompts [B, C] at positions start.. through a policy's cache: rows whose
    last prompt token is in this chunk sample their first new token here (else keep `first`)."""
    self.traces["ring_prefill", tokens.shape[1], sampling] += 1
    model = self._model(state)
    # A new request (start 0) forgets the previous one's tokens.
    cache = jax.tree.map(lambda empty, old: jnp.where(start == 0, empty, old), self.kv_cache.reset(cache), cache)
    positions = start + index_positions(*tokens.shape)
    positions = jnp.where(positions < lengths[:, None], positions, -1)  # padding: not written
    x, cache = model.forward_with_cache(tokens, positions, cache)
    offset = jnp.clip(lengths - 1 - start, 0, tokens.shape[1] - 1)
    logits = model.logits(jnp.take_along_axis(x, offset[:, None, None], axis=1)[:, 0])
    here = (lengths - 1 >= start) & (lengths - 1 < start + tokens.shape[1])
    return jnp.where(here, sample(logits, _fold_positions(keys, lengths), sampling, values), first), cache

  def _decode_fn(self, state, cache, tokens, positions, keys, values, *, sampling):
    """One token per row at its own position -> (next token [B], next positions [B], cache)."""
    self.traces["decode", sampling] += 1
    model = self._model(state)
    x, cache = model.forward_with_cache(tokens[:, None], positions[:, None], cache)
    next_positions = positions + 1
    return sample(model.logits(x[:, 0]), _fold_positions(keys, next_positions), sampling, values), next_positions, cache

  def _loop_fn(self, state, cache, first, positions, keys, done, stop_tokens, num_tokens, values, *, sampling, out_len):
    """Up to `num_tokens` tokens per row on the device: [B, out_len] ids, -1 after a row stops."""
    self.traces["loop", sampling] += 1
    out = jnp.full((first.shape[0], out_len), -1, jnp.int32)

    def record(out, t, tok, done):
      stopped = done | jnp.isin(tok, stop_tokens)
      return jax.lax.dynamic_update_slice(out, jnp.where(stopped, -1, tok)[:, None], (0, t)), stopped

    out, done = record(out, 0, first, done)

    # The weights ride in the carry (unchanged): nnx modules must live at the loop body's trace
    # level for the nnx.scan over layers inside.
    def cond(carry):
      _, _, _, _, t, done, _ = carry
      return (t < num_tokens) & ~jnp.all(done)

    def body(carry):
      state, cache, tok, pos, t, done, out = carry
      model = self._model(state)
      x, cache = model.forward_with_cache(tok[:, None], pos[:, None], cache)
      tok = sample(model.logits(x[:, 0]), _fold_positions(keys, pos + 1), sampling, values)
      out, done = record(out, t, tok, done)
      return state, cache, tok, pos + 1, t + 1, done, out

    init = (state, cache, first, positions, jnp.int32(1), done, out)
    _, cache, _, _, steps, _, out = jax.lax.while_loop(cond, body, init)
    return out, steps - 1, cache

  # ------------------------------------------------------------------ requests

  def _mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _check(self, prompts, max_new_tokens: int, stop_tokens) -> list[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
      prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
      raise GenerationError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if len(stop_tokens) > MAX_STOP_TOKENS:
      raise GenerationError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stop_tokens)}")
    out = []
    vocab = self.cfg.vocab_size
    for i, p in enumerate(prompts):
      if isinstance(p, (int, np.integer)) or isinstance(p, str):
        raise GenerationError(f"prompt {i} must be a list of token ids (a batch is a list of such lists)")
      ids = np.asarray(p, np.int64).reshape(-1)
      if ids.size == 0:
        raise GenerationError(f"prompt {i} is empty (it needs at least one token, e.g. BOS)")
      if ids.min() < 0 or ids.max() >= vocab:
        raise GenerationError(f"prompt {i} has token ids outside [0, {vocab})")
      lookahead = 0 if self._speculative is None else self._speculative.lookahead
      need = self.kv_cache.slots_needed(ids.size, max_new_tokens) + lookahead
      if need > self.max_seq_len:
        spec = f" and the speculator's lookahead of {lookahead}" if lookahead else ""
        raise GenerationError(
          f"prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens}{spec} it needs "
          f"{need} cache positions, more than max_seq_len={self.max_seq_len}"
        )
      out.append(ids.astype(np.int32))
    return out

  @staticmethod
  def _stop_array(stop_tokens) -> np.ndarray:
    """Stop ids as the fixed-size array the compiled programs take (-1: none)."""
    stops = np.full(MAX_STOP_TOKENS, -1, np.int32)
    stops[: len(stop_tokens)] = list(stop_tokens)
    return stops

  def _pad_prompts(self, prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [max_batch, bucket] right-padded, lengths [max_batch]); unused rows a 1-token dummy."""
    lengths = np.ones(self.max_batch, np.int32)
    lengths[: len(prompts)] = [len(p) for p in prompts]
    if self.chunked_prefill:  # prefilled in chunks by `_ring_prefill_chunks`
      return None, lengths
    bucket = prefill_bucket(int(lengths.max()), self.max_seq_len, self.min_prefill_bucket)
    tokens = np.zeros((self.max_batch, bucket), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
    return tokens, lengths

  def _start(self, prompts: list[np.ndarray], sampling: SamplingParams, seed, stop_tokens):
    """Prefills one chunk (<= max_batch prompts): (first tokens, positions, keys, done0, values)."""
    n = len(prompts)
    seeds = np.broadcast_to(np.asarray(seed, np.uint32), (n,)) if np.ndim(seed) == 0 else np.asarray(seed, np.uint32)
    if seeds.shape != (n,):
      raise GenerationError(f"seed must be one integer or one per prompt ({n}), got {len(seeds)}")
    tokens, lengths = self._pad_prompts(prompts)
    all_seeds = np.zeros(self.max_batch, np.uint32)
    all_seeds[:n] = seeds
    keys = jax.vmap(jax.random.key)(jnp.asarray(all_seeds))
    values = sampling.values()
    done = np.arange(self.max_batch) >= n
    t0 = time.perf_counter()
    with self._mesh():
      if self.chunked_prefill:
        first = self._ring_prefill_chunks(prompts, lengths, keys, values, sampling)
      else:
        first, self._cache = self._prefill(
          self._state, self._cache, tokens, lengths, keys, values, sampling=sampling.static
        )
      first.block_until_ready()
    self.stats.prefill_seconds += time.perf_counter() - t0
    self.stats.prompt_tokens += int(lengths[:n].sum())
    # Committed like the positions each decode step returns, so step 2 reuses step 1's program.
    return first, jax.device_put(lengths, first.sharding), keys, done, values

  def _ring_prefill_chunks(self, prompts, lengths, keys, values, sampling):
    """Prefill through a policy's cache, in chunks of at most its `max_chunk` (power-of-two buckets)."""
    longest = int(lengths.max())
    chunk = min(prefill_bucket(longest, 1 << 30, self.min_prefill_bucket), self.kv_cache.max_chunk(longest))
    padded = np.zeros((self.max_batch, -(-longest // chunk) * chunk), np.int32)
    for i, p in enumerate(prompts):
      padded[i, : len(p)] = p
    first = np.zeros(self.max_batch, np.int32)
    if self.mesh is None:  # committed like the chunks' outputs: one program for every chunk
      first = jax.device_put(first, jax.tree.leaves(self._state)[0].sharding)
    for start in range(0, padded.shape[1], chunk):
      first, self._cache = self._ring_prefill(
        self._state,
        self._cache,
        padded[:, start : start + chunk],
        np.int32(start),
        lengths,
        keys,
        values,
        first,
        sampling=sampling.static,
      )
    return first

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | Sequence[int] = 0,
    stop_tokens: Sequence[int] = (),
  ) -> list[list[int]]:
    """New token ids for each prompt (stop token excluded).

    Args:
      prompts: token-id lists, of different lengths if you like.
      max_new_tokens: at most this many new tokens per prompt.
      temperature, top_k, top_p, min_p: sampling (`SamplingParams`); temperature 0 is greedy.
      seed: one integer for every prompt, or one per prompt. Same seed, same tokens.
      stop_tokens: ids that end a row (e.g. the tokenizer's end-of-sequence id).
    """
    sampling = SamplingParams(temperature, top_k, top_p, min_p)
    prompts = self._check(prompts, max_new_tokens, stop_tokens)
    seeds = np.broadcast_to(np.asarray(seed), (len(prompts),)) if np.ndim(seed) == 0 else np.asarray(seed)
    if seeds.shape != (len(prompts),):
      raise GenerationError(f"seed must be one integer or one per prompt ({len(prompts)}), got {len(seeds)}")
    self.stats = GenerationStats(cache_bytes=self.cache_bytes)
    results = []
    for c in range(0, len(prompts), self.max_batch):
      chunk, chunk_seeds = prompts[c : c + self.max_batch], seeds[c : c + self.max_batch]
      if self._speculative is not None:
        rows = [[] for _ in chunk]
        for step, _ in self._speculative.run(chunk, max_new_tokens, sampling, chunk_seeds, stop_tokens):
          for row, new in zip(rows, step):
            row += new
        results += rows
      elif self.loop == "host":
        rows = [[] for _ in chunk]
        for step in self._host_loop(chunk, max_new_tokens, sampling, chunk_seeds, stop_tokens):
          for row, tok in zip(rows, step):
            if tok is not None:
              row.append(tok)
        results += rows
      else:
        results += self._device_loop(chunk, max_new_tokens, sampling, chunk_seeds, stop_tokens)
    return results

  def stream(
    self,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | Sequence[int] = 0,
    stop_tokens: Sequence[int] = (),
  ) -> Iterator[list[int | None]]:
    """Yields, per step, one new token id per prompt (None for a row that has stopped).

    Same arguments as `generate`; at most `max_batch` prompts.
    """
    sampling = SamplingParams(temperature, top_k, top_p, min_p)
    prompts = self._check(prompts, max_new_tokens, stop_tokens)
    if len(prompts) > self.max_batch:
      raise GenerationError(f"stream takes at most max_batch={self.max_batch} prompts, got {len(prompts)}")
    self.stats = GenerationStats(cache_bytes=self.cache_bytes)
    if self._speculative is None:
      yield from self._host_loop(prompts, max_new_tokens, sampling, seed, stop_tokens)
      return
    seeds = np.broadcast_to(np.asarray(seed), (len(prompts),)) if np.ndim(seed) == 0 else np.asarray(seed)
    if seeds.shape != (len(prompts),):
      raise GenerationError(f"seed must be one integer or one per prompt ({len(prompts)}), got {len(seeds)}")
    # A verification gives each row several tokens: queue them and yield one per row per step, as
    # plain decoding does (None once a row has stopped and its queue is empty).
    queues = [collections.deque() for _ in prompts]
    finished = [False] * len(prompts)
    steps = self._speculative.run(prompts, max_new_tokens, sampling, seeds, stop_tokens)
    while True:
      while not all(finished[i] or queues[i] for i in range(len(prompts))):
        try:
          new, finished = next(steps)
        except StopIteration:
          finished = [True] * len(prompts)
          break
        for q, row in zip(queues, new):
          q.extend(row)
      if not any(queues):
        return
      yield [q.popleft() if q else None for q in queues]

  def _host_loop(self, prompts, max_new_tokens, sampling, seed, stop_tokens):
    tok, positions, keys, done, values = self._start(prompts, sampling, seed, stop_tokens)
    stop = set(int(s) for s in stop_tokens)
    n = len(prompts)
    decode_start = self.stats.decode_seconds
    t0 = time.perf_counter()
    pending = tok
    for t in range(max_new_tokens):
      if t + 1 < max_new_tokens:  # dispatch the next step before reading this one's tokens
        with self._mesh():
          tok, positions, self._cache = self._decode(
            self._state, self._cache, tok, positions, keys, values, sampling=sampling.static
          )
        self.stats.decode_steps += 1
        self.stats.target_forwards += 1
      step = []
      for i, x in enumerate(np.asarray(pending)[:n].tolist()):
        if done[i] or x in stop:
          done[i] = True
          step.append(None)
        else:
          step.append(x)
          self.stats.new_tokens += 1
          self.stats.decode_tokens += t > 0
      # Time spent by the consumer of `stream` between steps counts too: it is a host loop.
      self.stats.decode_seconds = decode_start + time.perf_counter() - t0
      if all(done[:n]):
        return
      yield step
      pending = tok

  def _device_loop(self, prompts, max_new_tokens, sampling, seed, stop_tokens) -> list[list[int]]:
    first, positions, keys, done, values = self._start(prompts, sampling, seed, stop_tokens)
    stops = self._stop_array(stop_tokens)
    t0 = time.perf_counter()
    with self._mesh():
      out, steps, self._cache = self._loop(
        self._state,
        self._cache,
        first,
        positions,
        keys,
        done,
        stops,
        np.int32(max_new_tokens),
        values,
        sampling=sampling.static,
        out_len=_bucket(max_new_tokens) if self.chunked_prefill else self.max_seq_len,
      )
      out = np.asarray(out)
    self.stats.decode_seconds += time.perf_counter() - t0
    self.stats.decode_steps += int(steps)
    self.stats.target_forwards += int(steps)
    rows = []
    for row in out[: len(prompts), :max_new_tokens]:
      stop_at = np.flatnonzero(row < 0)
      rows.append(row[: stop_at[0] if stop_at.size else max_new_tokens].tolist())
    self.stats.new_tokens += sum(len(r) for r in rows)
    self.stats.decode_tokens += sum(max(0, len(r) - 1) for r in rows)
    return rows


# One-call `generate`: [(model graph, rest of the key, Generator)], newest last. Each Generator
# holds its compiled programs and one KV cache, so only a few are kept. A list compared with ==:
# a graph holds its ModelConfig, a mutable (unhashable) dataclass.
_GENERATORS: list = []
MAX_CACHED_GENERATORS = 4


def _bucket(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def generator_for(model, *, max_batch: int, max_seq_len: int, **options) -> Generator:
  """A `Generator` for `model` with at least `max_batch` rows of `max_seq_len` positions (both
  rounded up to powers of two), reused across calls: a model with an equal graph and the same
  weight shapes, dtypes and shardings gets the same compiled programs, serving its own current
  weights. `options` are `Generator`'s (mesh, loop, min_prefill_bucket)."""
  graphdef, state = nnx.split(model)
  layout = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(state))
  key = (layout, _bucket(max_batch), _bucket(max_seq_len), tuple(sorted(options.items())))
  for i, (g, k, gen) in enumerate(_GENERATORS):
    if k == key and g == graphdef:
      del _GENERATORS[i]
      gen.use_weights(state)
      break
  else:
    gen = Generator(model, max_batch=_bucket(max_batch), max_seq_len=_bucket(max_seq_len), **options)
  _GENERATORS.append((graphdef, key, gen))
  del _GENERATORS[:-MAX_CACHED_GENERATORS]
  return gen


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
  """One call: each prompt's new token ids, from a `Generator` sized for these prompts.

  Calls with the same model graph (its current weights are used) and prompts that fit the same
  power-of-two batch and length buckets reuse one Generator and its compiled programs
  (`generator_for`), so only the first call compiles. `kwargs` go to `Generator.generate`
  (temperature, top_k, top_p, min_p, seed, stop_tokens) or to `Generator` (mesh, loop,
  min_prefill_bucket).
  """
  gen_keys = {"mesh", "loop", "min_prefill_bucket"}
  gen_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in gen_keys}
  if not prompts:
    raise GenerationError("prompts must be a non-empty list of token-id lists")
  longest = max(len(p) for p in prompts)
  gen = generator_for(model, max_batch=len(prompts), max_seq_len=longest + max_new_tokens, **gen_kw)
  return gen.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
