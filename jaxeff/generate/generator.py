"""Generator: static-batch generation, a thin driver of the inference core's model runner.

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

What it does with the runner (`jaxeff.inference.ModelRunner`, which owns the weights, the cache and
every compiled program):
- Prefill: the prompts of a batch, right-padded to a power-of-two bucket (so a new prompt length
  rarely compiles), in one chunk, or in chunks of the cache policy's `max_chunk` (a bounded cache:
  StreamingLLM's window, H2O's budget; SnapKV's and KIVI's `prefill_chunk`). Each row samples its
  first token from its own last position.
- Decode: `generate` runs the decode loop on the device (`lax.while_loop` over up to max_new_tokens
  steps, stopping early when every row has hit a stop token): one dispatch per batch. `stream` runs
  a host loop over the one-token step, yielding each token as it comes (the next step is dispatched
  before the previous token is read, so the device does not wait for Python). `python -m
  jaxeff.bench decode` measures both.
- Speculation (`speculator=`): per step the runner's draft, then its verification; each row gains
  what it accepts, with the same greedy tokens (and, sampling, the same distribution).
- Ragged batches: each row has its own length and positions and the cache masks by position, so a
  row in a batch gets what it would get alone (same seed, same sampled tokens: each row draws from
  its own key, folded with the position of the token being sampled).

Stop tokens end a row; the stop token itself is not returned. On a mesh, pass `mesh=`: the model's
weights are placed by their logical axes (if they are not already) and the cache is created in its
sharding (batch over data/fsdp, kv heads over tensor).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from jaxeff.errors import GenerationError
from jaxeff.inference.runner import MAX_STOP_TOKENS, ModelRunner, RowArrays, RowSettings, pow2_at_least, row_arrays
from jaxeff.inference.sampling import SamplingParams, SamplingShape

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
  return min(max(min_bucket, pow2_at_least(length)), max_seq_len)


@dataclasses.dataclass
class _Batch:
  """One batch of prompts after prefill: what decoding continues from."""

  first: jax.Array  # [max_batch] each row's first new token
  stopped: jax.Array  # [max_batch] whether it is a stop id
  lengths: np.ndarray  # [max_batch] prompt lengths (unused rows: 1)
  rows: RowArrays
  shape: SamplingShape
  n: int  # rows in use


class Generator:
  """Batched generation with a static KV cache; compiled programs and the cache are reused.

  Args:
    model: a `jaxeff.models.Llama` (float, bf16, or `jaxeff.quantize`d). Its weights are used as
      they are at construction (the arrays are shared, not copied).
    max_batch: rows decoded together; `generate` serves more prompts in chunks of this size.
    max_seq_len: cache length per row: prompt plus new tokens must fit (what a policy makes of it:
      its `room`).
    mesh: optional device mesh; weights are placed by their logical axes and the cache is created
      sharded (see `jaxeff.sharding`).
    min_prefill_bucket: smallest padded prompt length (buckets are powers of two from here).
    loop: "device" (default for `generate`: an on-device `lax.while_loop`) or "host" (a Python loop
      over the compiled one-token step, as `stream` always uses).
    kv_cache: a cache policy from `jaxeff.inference.cache` (default `Dense()`: one slot per
      position). A bounded one (`StreamingLLM`) keeps a fixed-size buffer, so prompt plus new tokens
      may run past max_seq_len; `H2O` and `SnapKV` keep absolute positions (bounded by the model's
      trained context), SnapKV compresses the prompt so min(prompt, budget) plus new tokens must fit.
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
    if loop not in LOOPS:
      raise GenerationError(f"loop must be one of {LOOPS}, got {loop!r}")
    self.runner = ModelRunner(
      model, max_batch=max_batch, max_seq_len=max_seq_len, kv_cache=kv_cache, speculator=speculator, mesh=mesh
    )
    self.cfg = model.cfg
    self.max_batch, self.max_seq_len, self.mesh, self.loop = max_batch, max_seq_len, mesh, loop
    self.min_prefill_bucket = min_prefill_bucket
    self.kv_cache, self.speculator = self.runner.policy, speculator
    self.cache_bytes = self.runner.cache_bytes
    self.stats = GenerationStats(cache_bytes=self.cache_bytes)

  @property
  def traces(self) -> collections.Counter:
    """How often each runner program was traced (each trace is one compilation)."""
    return self.runner.traces

  @property
  def weight_bytes(self) -> int:
    return self.runner.weight_bytes

  def use_weights(self, state) -> None:
    """Serves these weights from now on (same graph, shapes and dtypes); nothing recompiles."""
    self.runner.use_weights(state)

  # ------------------------------------------------------------------ requests

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
      room = self.runner.room(ids.size)
      if room is not None and max_new_tokens > room:
        spec = f" and the speculator's lookahead of {self.runner.lookahead}" if self.runner.lookahead else ""
        raise GenerationError(
          f"prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens}{spec} it needs more than "
          f"the cache holds (max_seq_len={self.max_seq_len}, {self.kv_cache.describe(1, self.max_seq_len)}): at "
          f"most {max(room, 0)} new tokens fit"
        )
      out.append(ids.astype(np.int32))
    return out

  def _seeds(self, seed, n: int) -> np.ndarray:
    seeds = np.broadcast_to(np.asarray(seed), (n,)) if np.ndim(seed) == 0 else np.asarray(seed)
    if seeds.shape != (n,):
      raise GenerationError(f"seed must be one integer or one per prompt ({n}), got {len(seeds)}")
    return seeds

  def _start(self, prompts: list[np.ndarray], sampling: SamplingParams, seeds, stop_tokens) -> _Batch:
    """Prefills one batch (<= max_batch prompts); unused rows get a 1-token dummy prompt."""
    n = len(prompts)
    stops = tuple(int(s) for s in stop_tokens)
    settings = [RowSettings(sampling, int(s), stops) for s in seeds] + [None] * (self.max_batch - n)
    rows = row_arrays(settings)
    lengths = np.ones(self.max_batch, np.int32)
    lengths[:n] = [len(p) for p in prompts]
    longest = int(lengths.max())
    chunk = min(prefill_bucket(longest, 1 << 30, self.min_prefill_bucket), self.runner.max_chunk())
    padded = np.zeros((self.max_batch, -(-longest // chunk) * chunk), np.int32)
    for i, p in enumerate(prompts):
      padded[i, : len(p)] = p
    t0 = time.perf_counter()
    first = None
    for start in range(0, padded.shape[1], chunk):
      first, stopped = self.runner.prefill(
        padded[:, start : start + chunk],
        starts=np.full(self.max_batch, start, np.int32),
        lengths=lengths,
        rows=rows,
        first=first,
        shape=sampling.static,
      )
    jax.block_until_ready(first)
    self.stats.prefill_seconds += time.perf_counter() - t0
    self.stats.prompt_tokens += int(lengths[:n].sum())
    return _Batch(first, stopped, lengths, rows, sampling.static, n)

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
    seeds = self._seeds(seed, len(prompts))
    self.stats = GenerationStats(cache_bytes=self.cache_bytes)
    results = []
    for c in range(0, len(prompts), self.max_batch):
      chunk, chunk_seeds = prompts[c : c + self.max_batch], seeds[c : c + self.max_batch]
      if self.speculator is not None:
        rows = [[] for _ in chunk]
        for step, _ in self._speculate(chunk, max_new_tokens, sampling, chunk_seeds, stop_tokens):
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
    seeds = self._seeds(seed, len(prompts))
    self.stats = GenerationStats(cache_bytes=self.cache_bytes)
    if self.speculator is None:
      yield from self._host_loop(prompts, max_new_tokens, sampling, seeds, stop_tokens)
      return
    # A verification gives each row several tokens: queue them and yield one per row per step, as
    # plain decoding does (None once a row has stopped and its queue is empty).
    queues = [collections.deque() for _ in prompts]
    finished = [False] * len(prompts)
    steps = self._speculate(prompts, max_new_tokens, sampling, seeds, stop_tokens)
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

  def _host_loop(self, prompts, max_new_tokens, sampling, seeds, stop_tokens):
    batch = self._start(prompts, sampling, seeds, stop_tokens)
    n = batch.n
    done = np.arange(self.max_batch) >= n
    decode_start = self.stats.decode_seconds
    t0 = time.perf_counter()
    tok, stopped = batch.first, batch.stopped
    for t in range(max_new_tokens):
      pending, pending_stopped = tok, stopped
      if t + 1 < max_new_tokens:  # dispatch the next step before reading this one's tokens
        tok, stopped = self.runner.decode(tok, positions=batch.lengths + t, rows=batch.rows, shape=batch.shape)
        self.stats.decode_steps += 1
        self.stats.target_forwards += 1
      ids, is_stop = np.asarray(pending), np.asarray(pending_stopped)
      step = []
      for i in range(n):
        if done[i] or is_stop[i]:
          done[i] = True
          step.append(None)
        else:
          step.append(int(ids[i]))
          self.stats.new_tokens += 1
          self.stats.decode_tokens += t > 0
      # Time spent by the consumer of `stream` between steps counts too: it is a host loop.
      self.stats.decode_seconds = decode_start + time.perf_counter() - t0
      if all(done[:n]):
        return
      yield step

  def _device_loop(self, prompts, max_new_tokens, sampling, seeds, stop_tokens) -> list[list[int]]:
    batch = self._start(prompts, sampling, seeds, stop_tokens)
    t0 = time.perf_counter()
    out, steps = self.runner.decode_loop(
      batch.first,
      positions=self.runner.committed(batch.lengths),
      rows=batch.rows,
      num_tokens=max_new_tokens,
      done=np.arange(self.max_batch) >= batch.n,
      out_len=self.max_seq_len if self.kv_cache.spans else pow2_at_least(max_new_tokens),
      shape=batch.shape,
    )
    out = np.asarray(out)
    self.stats.decode_seconds += time.perf_counter() - t0
    self.stats.decode_steps += int(steps)
    self.stats.target_forwards += int(steps)
    rows = []
    for row in out[: batch.n, :max_new_tokens]:
      stop_at = np.flatnonzero(row < 0)
      rows.append(row[: stop_at[0] if stop_at.size else max_new_tokens].tolist())
    self.stats.new_tokens += sum(len(r) for r in rows)
    self.stats.decode_tokens += sum(max(0, len(r) - 1) for r in rows)
    return rows

  def _speculate(self, prompts, max_new_tokens, sampling, seeds, stop_tokens):
    """Yields, per target forward, (each row's new tokens: a list per prompt, possibly empty,
    whether each row has finished)."""
    batch = self._start(prompts, sampling, seeds, stop_tokens)
    n, stats = batch.n, self.stats
    first, stopped = np.asarray(batch.first), np.asarray(batch.stopped)
    count = np.where(stopped, 0, 1)
    done = stopped | (count >= max_new_tokens)
    done[n:] = True
    out = [[int(first[i])] if count[i] else [] for i in range(n)]
    stats.new_tokens += sum(len(r) for r in out)
    yield out, done[:n].tolist()
    decode_start = stats.decode_seconds
    t0 = time.perf_counter()
    while not done[:n].all():
      t_draft = time.perf_counter()
      live = ~done
      draft, q = self.runner.draft(rows=batch.rows, live=live, shape=batch.shape)
      jax.block_until_ready(draft)
      stats.draft_seconds += time.perf_counter() - t_draft
      emitted, accepted, finished = self.runner.verify(
        draft, q, remaining=max_new_tokens - count, rows=batch.rows, live=live, shape=batch.shape
      )
      emitted, accepted, finished = np.asarray(emitted), np.asarray(accepted), np.asarray(finished)
      stats.target_forwards += 1
      stats.decode_steps += 1
      rows = []
      for i in range(n):
        if accepted[i] >= 0:
          stats.accepted_histogram[int(accepted[i])] += 1
        row = [int(t) for t in emitted[i] if t >= 0]
        rows.append(row)
        stats.new_tokens += len(row)
        stats.decode_tokens += len(row)
      count += (emitted >= 0).sum(axis=1)
      done = done | finished
      stats.decode_seconds = decode_start + time.perf_counter() - t0
      yield rows, done[:n].tolist()


# One-call `generate`: [(model graph, rest of the key, Generator)], newest last. Each Generator
# holds its compiled programs and one KV cache, so only a few are kept. A list compared with ==:
# a graph holds its ModelConfig, a mutable (unhashable) dataclass.
_GENERATORS: list = []
MAX_CACHED_GENERATORS = 4


def generator_for(model, *, max_batch: int, max_seq_len: int, **options) -> Generator:
  """A `Generator` for `model` with at least `max_batch` rows of `max_seq_len` positions (both
  rounded up to powers of two), reused across calls: a model with an equal graph and the same
  weight shapes, dtypes and shardings gets the same compiled programs, serving its own current
  weights. `options` are `Generator`'s (mesh, loop, min_prefill_bucket)."""
  graphdef, state = nnx.split(model)
  layout = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(state))
  key = (layout, pow2_at_least(max_batch), pow2_at_least(max_seq_len), tuple(sorted(options.items())))
  for i, (g, k, gen) in enumerate(_GENERATORS):
    if k == key and g == graphdef:
      del _GENERATORS[i]
      gen.use_weights(state)
      break
  else:
    gen = Generator(model, max_batch=pow2_at_least(max_batch), max_seq_len=pow2_at_least(max_seq_len), **options)
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
