"""Continuous batching over the static KV cache: requests join and leave between decode steps.

>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.serve import Engine
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> with Engine(Llama(cfg, rngs=nnx.Rngs(0)), max_batch=2, max_seq_len=32) as engine:
...   a = engine.submit([1, 2, 3], max_tokens=4)                 # returns at once; decoding runs behind
...   b = engine.submit([4, 5], max_tokens=3, temperature=0.8, seed=1)
...   len(a.result()), len(b.result()), a.finish_reason          # or: `async for token in a` / `for token in a`
(4, 3, 'length')

The JetStream pattern (see ../shared/notes/inference.md, "Serving"): the cache has `max_batch` rows,
one per decode slot. A background thread runs the schedule:
- Admit: waiting requests (a bounded queue, `QueueFullError` beyond `max_waiting`) take free slots.
- Prefill: one chunk of one prompt per iteration (`prefill_chunk` tokens; a short prompt is padded
  to a power of two, the tail of a long one to a whole chunk), written straight into the slot's row
  of the cache. Chunks alternate with decode steps (Sarathi-Serve's chunked prefill), so a long
  prompt delays running requests by at most one chunk per token, and the first token of a new
  request waits for at most its own chunks plus one decode step per chunk.
- Decode: one step for the slots up to the highest live one (slots are taken lowest first), over
  the cache positions they have reached: both rounded up to powers of two, so a step costs what the
  live requests need and there is one compiled program per (rows, span) bucket (`warm_up` compiles
  them before traffic). A step runs on that window of the cache and writes back only its live rows,
  so free and still-prefilling rows in it compute but change nothing. Every per-row setting
  (temperature, top-k, top-p, min-p, seed, stop ids) is an array in the step, so no mix of
  requests recompiles (`traces` counts compilations).
- Finish: a row that samples a stop id or reaches its `max_tokens` frees its slot at once; a
  cancelled request (`Request.cancel()`, e.g. its client went away) frees it before the next step.

Exactness: a row's computation never reads another row, a request's prefill chunks depend only on
its own length, and its PRNG key is its seed folded with each position (as in `Generator`), so a
request gets the same tokens alone or among others, greedy or seeded. An exception while prefilling
one request fails that request alone; one in the shared decode step fails the requests in it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.generate.sampling import SamplingParams, sample_rows
from jaxeff.models.attention import index_positions
from jaxeff.models.kv_cache import KVCache, init_cache

log = logging.getLogger(__name__)

MAX_STOP_TOKENS = 16  # stop ids per row travel as a fixed-size array


class QueueFullError(GenerationError):
  """The waiting queue is full: try again later (HTTP 429)."""


class EngineStoppedError(GenerationError):
  """The engine is shutting down and takes no new requests (HTTP 503)."""


class EngineFailedError(EngineStoppedError):
  """The engine's scheduler thread died of an unexpected error (its `__cause__`): the requests it
  held fail with this, and it takes no new ones (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class RequestParams:
  """One request's settings (validated by `Engine.submit`)."""

  max_tokens: int
  temperature: float = 0.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  min_p: float = 0.0  # 0: off
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()


_DONE = object()


class Request:
  """A submitted request: iterate it (`async for`, or plain `for` outside an event loop) for its
  new token ids as they come; `result()` waits for all of them.

  After it ends: `finish_reason` is "stop" (a stop id, not included in the tokens), "length"
  (`max_tokens` reached), "cancelled" or "error" (`error` holds the exception, which iterating
  raises). Times (`time.monotonic()`): `submitted_at`, `token_times` (one per token).
  """

  def __init__(self, request_id: int, prompt: np.ndarray, params: RequestParams):
    self.id, self.prompt, self.params = request_id, prompt, params
    self.tokens: list[int] = []
    self.token_times: list[float] = []
    self.finish_reason: str | None = None
    self.error: BaseException | None = None
    self.submitted_at = time.monotonic()
    self.cancelled = False
    self._wake_engine = lambda: None
    self._finished = threading.Event()
    try:
      self._loop = asyncio.get_running_loop()
      self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue()
    except RuntimeError:  # no event loop in this thread: a plain queue
      self._loop = None
      self._events = queue.SimpleQueue()

  @property
  def done(self) -> bool:
    return self._finished.is_set()

  def cancel(self) -> None:
    """Stops the request; its slot is freed before the engine's next step."""
    self.cancelled = True
    self._wake_engine()

  # -- engine side (engine thread)
  def _put(self, item) -> None:
    if self._loop is None:
      self._events.put(item)
    else:
      self._loop.call_soon_threadsafe(self._events.put_nowait, item)

  def _emit(self, token: int, now: float) -> None:
    self.tokens.append(token)
    self.token_times.append(now)
    self._put(token)

  def _finish(self, reason: str, error: BaseException | None = None) -> None:
    if self.done:
      return
    self.finish_reason, self.error = reason, error
    self._finished.set()
    try:
      self._put(_DONE)
    except RuntimeError:  # the consumer's event loop is closed: nobody is listening
      pass

  # -- consumer side
  def __aiter__(self):
    return self._aiter()

  async def _aiter(self):
    if self._loop is None:
      raise GenerationError("this request was submitted outside an event loop: iterate it with `for`")
    while (item := await self._events.get()) is not _DONE:
      yield item
    if self.error is not None:
      raise self.error

  def __iter__(self):
    if self._loop is not None:
      raise GenerationError("this request was submitted inside an event loop: iterate it with `async for`")
    while (item := self._events.get()) is not _DONE:
      yield item
    if self.error is not None:
      raise self.error

  def result(self, timeout: float | None = None) -> list[int]:
    """Blocks until the request ends; its new token ids (raises its error, if it failed)."""
    if not self._finished.wait(timeout):
      raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
    if self.error is not None:
      raise self.error
    return list(self.tokens)


@dataclasses.dataclass
class _Slot:
  request: Request
  prefilled: int = 0  # prompt tokens already in the cache
  position: int = 0  # where the next token goes (decode phase)
  token: int = 0  # the last sampled token, fed to the next decode step

  @property
  def decoding(self) -> bool:
    return self.prefilled == self.request.prompt.size


@dataclasses.dataclass
class EngineTotals:
  """Counters since the engine started (the server's /metrics reads them)."""

  requests_finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  prompt_tokens: int = 0
  generated_tokens: int = 0
  decode_steps: int = 0
  prefill_chunks: int = 0


def _window(cache: KVCache, row: jax.Array | int, rows: int, kv_len: int) -> KVCache:
  """Rows row..row+rows-1 and positions 0..kv_len-1 of every layer: a small cache a step runs on.

  A step on the window, then `_put_window`, costs what the live requests need: the whole cache
  neither moves nor is read (slicing the full cache inside the step copied all of it, measured).
  """
  axis = 1 if cache.stacked else 0

  def take(c):
    c = jax.lax.dynamic_slice_in_dim(c, row, rows, axis=axis)
    return jax.lax.slice_in_dim(c, 0, kv_len, axis=axis + 2)

  return jax.tree.map(take, cache)


def _put_window(cache: KVCache, window: KVCache, row: jax.Array | int) -> KVCache:
  """Writes `window` back at rows row.. and positions 0.. (in place: the cache is donated)."""
  axis = 1 if cache.stacked else 0

  def put(c, w):
    start = [0] * c.ndim
    start[axis] = row
    return jax.lax.dynamic_update_slice(c, w.astype(c.dtype), start)

  return jax.tree.map(put, cache, window)


def _row_arrays(rows: int, params: dict[int, RequestParams]):
  """Per-row step arguments for `rows` rows, row i with `params[i]` (others: greedy, no stops):
  (seeds [rows], (temperature, top_k, top_p, min_p) [rows] each, stop ids [rows, MAX_STOP_TOKENS])."""
  seeds = np.zeros(rows, np.uint32)
  temperature, top_k = np.zeros(rows, np.float32), np.zeros(rows, np.int32)
  top_p, min_p = np.ones(rows, np.float32), np.zeros(rows, np.float32)
  stops = np.full((rows, MAX_STOP_TOKENS), -1, np.int32)
  for i, p in params.items():
    seeds[i], temperature[i], top_k[i], top_p[i], min_p[i] = p.seed, p.temperature, p.top_k, p.top_p, p.min_p
    stops[i, : len(p.stop_tokens)] = p.stop_tokens
  return seeds, (temperature, top_k, top_p, min_p), stops


def _is_stop(tokens: jax.Array, stops: jax.Array) -> jax.Array:
  """tokens [n] against each row's stop ids [n, MAX_STOP_TOKENS] (-1 pads): bool [n]."""
  return jnp.any(tokens[:, None] == stops, axis=-1)


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class Engine:
  """Continuous-batching generation for one model: `submit` requests at any time from any thread.

  If the scheduler thread dies of an unexpected error, `failure` holds the `EngineFailedError`
  (its cause chained): every waiting and running request fails with it, the engine takes no new
  requests, and it logs one line naming the cause. It does not restart.

  Args:
    model: a `jaxeff.models.Llama` (float, bf16, `jaxeff.quantize`d, or a GGUF served as stored).
    tokenizer: optional `jaxeff.generate.tokenizer.TextTokenizer`: its stop ids are every request's
      default, and `submit` then also takes text.
    max_batch: decode slots (rows of the KV cache).
    max_seq_len: positions per slot: a request's prompt plus its max_tokens must fit.
    prefill_chunk: prompt tokens prefilled per scheduler iteration (between two decode steps).
    max_waiting: requests that may wait for a slot (beyond those free slots take at once); more
      raise `QueueFullError`.
    mesh: optional device mesh: weights placed by their logical axes, cache rows over data/fsdp
      and kv heads over tensor, as in `Generator`.
    min_prefill_bucket: smallest padded chunk (chunks shorter than `prefill_chunk` are padded to a
      power of two from here).
    min_kv_bucket: smallest attention span (steps attend over a power of two of cache positions,
      from here up to max_seq_len, that covers every live position).
  """

  failure: EngineFailedError | None = None  # set when the scheduler thread has died

  def __init__(
    self,
    model,
    tokenizer=None,
    *,
    max_batch: int = 8,
    max_seq_len: int = 2048,
    prefill_chunk: int = 128,
    max_waiting: int = 64,
    mesh: jax.sharding.Mesh | None = None,
    min_prefill_bucket: int = 16,
    min_kv_bucket: int = 128,
  ):
    if max_batch < 1 or max_seq_len < 2:
      raise GenerationError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
    if prefill_chunk < 1 or max_waiting < 0:
      raise GenerationError(f"need prefill_chunk >= 1 and max_waiting >= 0, got {prefill_chunk}, {max_waiting}")
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.max_batch, self.max_seq_len, self.mesh = max_batch, max_seq_len, mesh
    self.prefill_chunk, self.max_waiting = prefill_chunk, max_waiting
    self.min_prefill_bucket = min(min_prefill_bucket, prefill_chunk)
    self.min_kv_bucket = min_kv_bucket
    self._graphdef, state = nnx.split(model)
    if mesh is not None:
      state = jax.device_put(state, sharding.state_shardings(state, mesh))
    self._state = state
    self.traces: collections.Counter = collections.Counter()  # compilations per program
    self._prefill = jax.jit(self._prefill_fn, donate_argnames="cache", static_argnames="kv_len")
    self._decode = jax.jit(self._decode_fn, donate_argnames="cache", static_argnames="kv_len")
    # Rows of a decode step: a multiple of the mesh's batch split, so a step partitions like the cache.
    self.min_rows = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    with self._mesh():
      self._cache = jax.jit(lambda: init_cache(self.cfg, max_batch, max_seq_len))()
    if mesh is None:  # committed, like the donated cache that comes back (no second compile)
      self._cache = jax.device_put(self._cache, jax.tree.leaves(state)[0].sharding)
    self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(self._cache))
    self.totals = EngineTotals()
    self._slots: list[_Slot | None] = [None] * max_batch
    self._waiting: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._ids = itertools.count()
    self._seeds = np.random.default_rng()
    self._accepting = True
    self._stop_requested = False
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------ compiled programs

  def _mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _prefill_fn(self, state, cache, tokens, slot, start, last, seeds, settings, stops, *, kv_len):
    """One chunk `tokens` [1, C] of the prompt in `slot`, at positions start..start+C-1 (all below
    the static `kv_len`): writes their keys/values into the slot's cache row; samples the token
    after chunk index `last` -> (token [1], whether it is a stop id [1], cache). Per-row
    arguments as `_row_arrays` makes them, for one row."""
    self.traces["prefill", tokens.shape[1], kv_len] += 1
    model = nnx.merge(self._graphdef, state)
    window = _window(cache, slot, 1, kv_len)  # the slot's row, positions 0..kv_len-1
    positions = start + index_positions(*tokens.shape)
    x, window = model.forward_with_cache(tokens, positions, window)
    cache = _put_window(cache, window, slot)
    logits = model.logits(jax.lax.dynamic_index_in_dim(x, last, axis=1, keepdims=False))
    key = jax.random.fold_in(jax.random.key(seeds[0]), start + last + 1)  # the position being sampled
    token = sample_rows(logits, key[None], *settings)
    return token, _is_stop(token, stops), cache

  def _decode_fn(self, state, cache, tokens, positions, live, seeds, settings, stops, *, kv_len):
    """One token for each of the cache's first n rows (n = len(tokens)) at its own position, all
    live ones below the static `kv_len` -> (next tokens [n], which are stop ids [n], cache). Rows
    that are not `live` compute too, but their cache rows are left as they were."""
    self.traces["decode", tokens.shape[0], kv_len] += 1
    model = nnx.merge(self._graphdef, state)
    if tokens.shape[0] == self.max_batch and kv_len == self.max_seq_len:
      # The window would be the whole cache: run on it in place. Idle rows write only the last
      # position, which a request's own decode overwrites before reading it.
      positions = jnp.where(live, positions, self.max_seq_len - 1)
      x, cache = model.forward_with_cache(tokens[:, None], positions[:, None], cache)
    else:
      window = _window(cache, 0, tokens.shape[0], kv_len)
      positions = jnp.where(live, positions, kv_len - 1)  # inside the window; not written back
      x, new = model.forward_with_cache(tokens[:, None], positions[:, None], window)
      keep = live[:, None, None, None] if not window.stacked else live[None, :, None, None, None]
      new = jax.tree.map(lambda n, w: jnp.where(keep, n, w), new, window)
      cache = _put_window(cache, new, 0)
    keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(seeds), positions + 1)
    nxt = sample_rows(model.logits(x[:, 0]), keys, *settings)
    return nxt, _is_stop(nxt, stops), cache

  # ------------------------------------------------------------------ requests

  def submit(
    self,
    prompt: Sequence[int] | str,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
  ) -> Request:
    """Queues a request and returns its handle at once.

    Args:
      prompt: token ids (or text, when the engine has a tokenizer: encoded with its specials).
      max_tokens: at most this many new tokens.
      temperature, top_k, top_p, min_p: sampling, as `jaxeff.generate.SamplingParams`; 0: greedy.
      seed: the request's PRNG seed (same seed, same tokens); None: a random one.
      stop_tokens: ids that end the request; None: the tokenizer's (none without a tokenizer).

    Raises:
      GenerationError: bad input (message names the problem); QueueFullError: too many waiting;
      EngineStoppedError: the engine is shutting down.
    """
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise GenerationError("a text prompt needs an Engine with a tokenizer; pass token ids")
      prompt = self.tokenizer.encode(prompt)
    ids = np.asarray(prompt, np.int64).reshape(-1) if len(prompt) else np.zeros(0, np.int64)
    if ids.size == 0:
      raise GenerationError("the prompt is empty (it needs at least one token)")
    if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
      raise GenerationError(f"the prompt has token ids outside [0, {self.cfg.vocab_size})")
    if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < 1:
      raise GenerationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if ids.size + max_tokens > self.max_seq_len:
      raise GenerationError(
        f"the prompt has {ids.size} tokens; with max_tokens={max_tokens} it needs {ids.size + max_tokens} "
        f"positions, more than this engine's max_seq_len={self.max_seq_len}"
      )
    sampling = SamplingParams(temperature, top_k, top_p, min_p)  # validates them
    if seed is not None and not 0 <= seed < 2**32:
      raise GenerationError(f"seed must be in [0, 2**32), got {seed}")
    stops = tuple(self.tokenizer.stop_tokens if self.tokenizer else ()) if stop_tokens is None else tuple(stop_tokens)
    if len(stops) > MAX_STOP_TOKENS:
      raise GenerationError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stops)}")
    params = RequestParams(
      max_tokens=int(max_tokens),
      temperature=float(sampling.temperature),
      top_k=int(sampling.top_k or 0),
      top_p=1.0 if sampling.top_p is None else float(sampling.top_p),
      min_p=0.0 if sampling.min_p is None else float(sampling.min_p),
      seed=int(self._seeds.integers(2**32)) if seed is None else int(seed),
      stop_tokens=tuple(int(s) for s in stops),
    )
    request = Request(next(self._ids), ids.astype(np.int32), params)
    request._wake_engine = self._wake
    with self._cv:
      if not self._accepting:
        raise EngineStoppedError("the engine is shutting down")
      # Requests that free slots will take at once do not count as waiting.
      queued = sum(not r.cancelled for r in self._waiting) - self._slots.count(None)
      if queued >= self.max_waiting:
        raise QueueFullError(f"{queued} requests are already waiting (max_waiting={self.max_waiting})")
      self._waiting.append(request)
      self._cv.notify()
    self.start()
    return request

  def generate(self, prompts: Sequence[Sequence[int]], **params) -> list[list[int]]:
    """Submits every prompt (with the same `submit` settings) and waits: their new token ids."""
    requests = [self.submit(p, **params) for p in prompts]
    return [r.result() for r in requests]

  @property
  def num_running(self) -> int:
    """Requests in a slot (prefilling or decoding)."""
    return sum(s is not None for s in self._slots)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  def warm_up(self, progress=None) -> int:
    """Compiles every program traffic can need, before serving it: the decode step for every rows x
    attention-span bucket, the first prefill chunk of every padded size, and a whole chunk at every
    span (later chunks), so no request waits for a compile. (Only the exact pieces of a prompt
    that fills the cache to its last chunk compile on first use.) Call it while no request is in
    the engine; `progress(done, total)` is called after each. Returns the number of programs."""
    if self.num_running or self.num_waiting:
      raise GenerationError("warm_up needs an idle engine (no requests submitted yet)")
    rows = sorted({self.rows_bucket(1 << k) for k in range(self.max_batch.bit_length() + 1)})
    spans = sorted({self.kv_bucket(self.min_kv_bucket << k) for k in range(self.max_seq_len.bit_length())})
    sizes, size = [], self.min_prefill_bucket
    while size < self.prefill_chunk:
      sizes.append(size)
      size *= 2
    sizes.append(self.prefill_chunk)
    prefills = {(c, self.kv_bucket(c)) for c in sizes if c <= self.max_seq_len}
    prefills |= {(self.prefill_chunk, s) for s in spans if s >= self.kv_bucket(self.prefill_chunk)}
    jobs = [("decode", r, s) for r in rows for s in spans] + [("prefill", c, s) for c, s in sorted(prefills)]
    for done, (kind, size, span) in enumerate(jobs, 1):
      with self._mesh():
        if kind == "decode":
          zeros, idle = np.zeros(size, np.int32), np.zeros(size, bool)  # idle rows: nothing written back
          out = self._decode(self._state, self._cache, zeros, zeros, idle, *_row_arrays(size, {}), kv_len=span)
        else:
          start = np.int32(max(0, min(span, self.max_seq_len) - size))
          tokens = np.zeros((1, size), np.int32)
          out = self._prefill(
            self._state,
            self._cache,
            tokens,
            np.int32(0),
            start,
            np.int32(size - 1),
            *_row_arrays(1, {}),
            kv_len=span,
          )
        self._cache = out[-1]
        jax.block_until_ready(out)
      if progress is not None:
        progress(done, len(jobs))
    return len(jobs)

  # ------------------------------------------------------------------ lifecycle

  def _wake(self) -> None:
    with self._cv:
      self._cv.notify()

  def start(self) -> None:
    """Starts the scheduler thread (`submit` does it too)."""
    with self._cv:
      if self._thread is None and not self._stop_requested:
        self._thread = threading.Thread(target=self._run, name="jaxeff-serve-engine", daemon=True)
        self._thread.start()

  def stop(self, timeout: float | None = None) -> None:
    """Takes no new requests; lets running and waiting ones finish for up to `timeout` seconds
    (None: wait for all), then cancels the rest and stops the scheduler thread."""
    with self._cv:
      self._accepting = False
      self._cv.notify()
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.num_running or self.num_waiting:
      if deadline is not None and time.monotonic() >= deadline:
        break
      if self._thread is None or not self._thread.is_alive():
        break
      time.sleep(0.01)
    with self._cv:
      for r in list(self._waiting) + [s.request for s in self._slots if s is not None]:
        r.cancel()
      self._stop_requested = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join()
    # Anything left (no thread ever ran it) ends cancelled.
    for r in list(self._waiting) + [s.request for s in self._slots if s is not None]:
      r._finish("cancelled")
    self._waiting.clear()
    self._slots = [None] * self.max_batch

  def __enter__(self) -> Engine:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  # ------------------------------------------------------------------ the scheduler

  def _run(self) -> None:
    try:
      self._schedule()
    except BaseException as e:  # a bug in the scheduler, not in one request: nothing can go on
      self._fail(e)

  def _fail(self, cause: BaseException) -> None:
    """Fails every request the engine holds and refuses new ones (the scheduler thread is ending)."""
    failure = EngineFailedError(f"the engine failed: {type(cause).__name__}: {cause}")
    failure.__cause__ = cause
    with self._cv:
      self._accepting = False
      self.failure = failure
      held = list(self._waiting) + [s.request for s in self._slots if s is not None]
      self._waiting.clear()
      self._slots = [None] * self.max_batch
    log.error("%s; it takes no more requests (%d failed with it)", failure, len(held))
    log.debug("the scheduler thread's traceback", exc_info=cause)
    for request in held:
      self.totals.requests_finished["error"] += 1
      request._finish("error", failure)

  def _schedule(self) -> None:
    while True:
      with self._cv:
        while not self._stop_requested and not self._waiting and not any(self._slots):
          self._cv.wait()  # submit, cancel and stop notify
        if self._stop_requested:
          self._free_cancelled()
          return
        self._admit()
      self._free_cancelled()
      prefilling = [i for i, s in enumerate(self._slots) if s is not None and not s.decoding]
      if prefilling:  # the request that has waited longest
        self._prefill_chunk(min(prefilling, key=lambda i: self._slots[i].request.id))
      if any(s is not None and s.decoding for s in self._slots):
        self._decode_step()

  def _admit(self) -> None:
    for i, slot in enumerate(self._slots):
      while slot is None and self._waiting:
        request = self._waiting.popleft()
        if request.cancelled:
          request._finish("cancelled")
          continue
        slot = self._slots[i] = _Slot(request)

  def _free_cancelled(self) -> None:
    with self._cv:  # a cancelled request leaves the waiting queue too (it counts toward max_waiting)
      for request in [r for r in self._waiting if r.cancelled]:
        self._waiting.remove(request)
        self.totals.requests_finished["cancelled"] += 1
        request._finish("cancelled")
    for i, slot in enumerate(self._slots):
      if slot is not None and slot.request.cancelled:
        self._release(i, "cancelled")

  def _release(self, i: int, reason: str, error: BaseException | None = None) -> None:
    request = self._slots[i].request
    self._slots[i] = None
    self.totals.requests_finished[reason] += 1
    request._finish(reason, error)

  def _chunk(self, slot: _Slot) -> tuple[int, int]:
    """(chunk length C, real tokens in it) for the slot's next prefill chunk."""
    rest = slot.request.prompt.size - slot.prefilled
    if rest >= self.prefill_chunk:
      return self.prefill_chunk, self.prefill_chunk
    # A short prompt is padded to a power of two; the tail of a long one to a whole chunk (one
    # program per attention span instead of one per span and tail size).
    size = min(self.prefill_chunk, max(self.min_prefill_bucket, _pow2_at_least(rest)))
    if slot.prefilled:
      size = self.prefill_chunk
    if slot.prefilled + size > self.max_seq_len:  # padding would run off the cache: exact pieces
      size = 1 << (rest.bit_length() - 1)
      return size, size
    return size, rest

  def _prefill_chunk(self, i: int) -> None:
    slot = self._slots[i]
    request = slot.request
    size, real = self._chunk(slot)
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :real] = request.prompt[slot.prefilled : slot.prefilled + real]
    try:
      with self._mesh():
        token, stopped, self._cache = self._prefill(
          self._state,
          self._cache,
          tokens,
          np.int32(i),
          np.int32(slot.prefilled),
          np.int32(real - 1),
          *_row_arrays(1, {0: request.params}),
          kv_len=self.kv_bucket(slot.prefilled + size),
        )
        token, stopped = int(token[0]), bool(stopped[0])
    except Exception as e:  # this request alone fails
      log.exception("request %d failed in prefill", request.id)
      self._release(i, "error", e)
      return
    slot.prefilled += real
    self.totals.prefill_chunks += 1
    if not slot.decoding:
      return
    self.totals.prompt_tokens += request.prompt.size
    slot.position, slot.token = request.prompt.size, token
    self._deliver(i, token, stopped, now=time.monotonic())

  def _deliver(self, i: int, token: int, stopped: bool, now: float) -> None:
    request = self._slots[i].request
    if stopped:
      self._release(i, "stop")
      return
    try:
      request._emit(token, now)
    except Exception as e:  # e.g. its consumer's event loop is gone
      self._release(i, "error", e)
      return
    self.totals.generated_tokens += 1
    if len(request.tokens) >= request.params.max_tokens:
      self._release(i, "length")

  def kv_bucket(self, length: int) -> int:
    """Cache positions a step attends over when its positions are below `length`: a power of two
    >= min_kv_bucket, capped at max_seq_len (one compiled program per bucket)."""
    return min(self.max_seq_len, max(self.min_kv_bucket, _pow2_at_least(length)))

  def rows_bucket(self, rows: int) -> int:
    """Rows a decode step runs when the highest live slot is `rows - 1`: a power of two (at least
    the mesh's batch split), capped at max_batch."""
    return min(self.max_batch, max(self.min_rows, _pow2_at_least(rows)))

  def _decode_step(self) -> None:
    live = [i for i, s in enumerate(self._slots) if s is not None and s.decoding]
    # Only the rows up to the highest live slot run (slots are filled lowest first), and attention
    # reads only the positions they have reached: a step costs what the live requests need.
    b = self.rows_bucket(max(live) + 1)
    kv_len = self.kv_bucket(max(self._slots[i].position for i in live) + 1)
    tokens, positions, is_live = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, bool)
    for i in live:
      tokens[i], positions[i], is_live[i] = self._slots[i].token, self._slots[i].position, True
    per_row = _row_arrays(b, {i: self._slots[i].request.params for i in live})
    try:
      with self._mesh():
        nxt, stopped, self._cache = self._decode(
          self._state, self._cache, tokens, positions, is_live, *per_row, kv_len=kv_len
        )
        nxt, stopped = np.asarray(nxt), np.asarray(stopped)
    except Exception as e:  # the shared step failed: the requests in it fail
      log.exception("decode step failed")
      for i in live:
        self._release(i, "error", e)
      return
    now = time.monotonic()
    self.totals.decode_steps += 1
    for i in live:
      slot = self._slots[i]
      if slot is None:
        continue
      slot.position += 1
      slot.token = int(nxt[i])
      self._deliver(i, slot.token, bool(stopped[i]), now)
