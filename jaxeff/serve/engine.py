"""Continuous batching on the inference core: requests join and leave between steps.

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

The engine is a scheduler: the model runner (`jaxeff.inference.ModelRunner`) owns the weights, the
KV cache (any policy: `kv_cache=`), the speculator (`speculator=`) and every compiled program; the
engine decides what runs, in a background thread.

With the paged cache (the default: `jaxeff.inference.cache.Paged`; vLLM's design,
../shared/notes/serving.md) the cache is a pool of blocks sized by memory (`kv_cache_memory`), not
`max_batch` rows of `max_seq_len`, and the block manager (`jaxeff.inference.blocks`) hands them out:
- Admit: waiting requests (a bounded queue, `QueueFullError` beyond `max_waiting`) take free slots
  (up to `max_batch` at once) in arrival order while the pool has blocks for their first chunk.
  A request first takes the cached blocks of its prompt's longest cached prefix (prefix caching:
  full blocks keyed by a hash of everything up to them, its generated text included, so a chat's
  next turn finds the previous reply) and prefills only the rest.
- Step: one step per iteration under a token budget (`token_budget`): every decoding request's
  next token, then prompt chunks of as many prompts as fit (up to `max_prefill_rows`), in admission
  order, so prefill never stalls decoding. Where the ragged paged-attention op computes the model's
  attention (dense or blocked softmax, no sinks: `Paged.uses_kernel`), the tokens are packed
  back to back, unpadded (`PackedLayout`): a prompt's chunk is any length up to the budget, and
  there is one compiled program per token-count bucket (powers of two up to `token_budget`;
  `warm_up` compiles them all), whatever the mix. Otherwise (the gather path) decode rows and padded
  `prefill_chunk` chunks go in a `RaggedLayout`: a program per (decode rows, prompts, chunk,
  attention span) bucket (`warm_up(full=True)` compiles every one).
- Preempt: when a decoding request needs a block and none is free, the newest request gives its
  blocks back and waits first in line; it is recomputed later (its prompt and the tokens it has sent
  so far, mostly from the prefix cache), so nothing is lost or sent twice.
With a speculator (prefix caching then off: the speculator's own per-row state needs the whole
prompt) and with the other policies the engine runs the JetStream pattern (../shared/notes/
inference.md, "Serving"), one row per slot:
- Admit: waiting requests take free slots.
- Prefill: one chunk of one prompt per iteration (`prefill_chunk` tokens, at most the policy's
  `max_chunk`; a short prompt is padded to a power of two, the tail of a long one to a whole
  chunk), written straight into the slot's row of the cache (a new request first empties it).
  Chunks alternate with decode steps (Sarathi-Serve's chunked prefill), so a long prompt delays
  running requests by at most one chunk per step.
- Decode: one step for the slots up to the highest live one (slots are taken lowest first), over
  the cache positions they have reached (for the dense and paged caches): both rounded up to powers
  of two, so a step costs what the live requests need and there is one compiled program per (rows,
  span) bucket (`warm_up` compiles them before traffic). Rows in the step that are not decoding keep
  their state. With a speculator, a step is the runner's draft and verification: each row gains
  what it accepts (1 to lookahead + 1 tokens).
In both, every per-row setting (temperature, top-k, top-p, min-p, seed, stop ids, token budget,
and without a speculator penalties, logit bias, min_tokens, a grammar's mask and whether it wants
logprobs: `jaxeff.inference.logits`, over token counts the runner keeps on the device) is an
array in the step, so no mix of requests recompiles (`traces` counts compilations), and a
request that samples a stop id or reaches its `max_tokens` frees its slot (and blocks) at once; a
cancelled request (`Request.cancel()`, e.g. its client went away) frees them before the next step.

Exactness: a row's computation never reads another row's tokens, a request's prefill chunks depend
only on its own length and on the prefix the cache already held, and its PRNG key is its seed
folded with each position (as in `Generator`), so a request gets the same tokens alone or among
others, greedy or seeded, with every cache policy and speculator. An exception in a shared step
fails the requests in it (with the one-row-per-slot pattern, one request's prefill chunk fails that
request alone).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxeff.errors import GenerationError
from jaxeff.inference.blocks import BlockManager
from jaxeff.inference.cache import Dense, Paged, RaggedLayout
from jaxeff.inference.logits import MAX_LOGPROBS, Penalties
from jaxeff.inference.runner import MAX_STOP_TOKENS, ModelRunner, RowSettings, pow2_at_least, row_arrays
from jaxeff.inference.sampling import SamplingParams, SamplingShape
from jaxeff.models import attention as attention_lib

log = logging.getLogger(__name__)


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
  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()
  penalties: Penalties | None = None
  logprobs: int | None = None  # the sampled tokens' logprobs and this many top ones (None: off)
  prompt_logprobs: bool = False  # the prompt tokens' logprobs (the prompt is then prefilled whole)
  grammar: object = None  # a compiled grammar (`jaxeff.serve.grammar`): each token masked by it

  @property
  def row(self) -> RowSettings:
    return RowSettings(self.sampling, self.seed, self.stop_tokens, self.penalties, self.logprobs is not None)


_DONE = object()


def _entry(lp, j, top: int) -> tuple[float, list[tuple[int, float]]]:
  """(the sampled token's logprob, its `top` most likely alternatives) at index j (a row, or
  (row, k) for a speculation step's k-th token) of host `Logprobs`."""
  return float(lp.token[j]), [(int(t), float(v)) for t, v in zip(lp.top_ids[j][:top], lp.top[j][:top])]


class Request:
  """A submitted request: iterate it (`async for`, or plain `for` outside an event loop) for its
  new token ids as they come; `result()` waits for all of them.

  After it ends: `finish_reason` is "stop" (a stop id, not included in the tokens), "length"
  (`max_tokens` reached), "cancelled" or "error" (`error` holds the exception, which iterating
  raises). Times (`time.monotonic()`): `submitted_at`, `token_times` (one per token). With a
  speculator: `forwards` (target forwards after prefill that gave it tokens) and `accepted` (draft
  tokens accepted), so tokens per forward is (len(tokens) - 1) / forwards.
  """

  def __init__(self, request_id: int, prompt: np.ndarray, params: RequestParams):
    self.id, self.prompt, self.params = request_id, prompt, params
    self.tokens: list[int] = []
    self.token_times: list[float] = []
    self.finish_reason: str | None = None
    self.error: BaseException | None = None
    self.submitted_at = time.monotonic()
    self.forwards = 0
    self.accepted = 0
    self.preemptions = 0  # times its blocks were taken back (paged cache) and it was recomputed
    self.passed_over = 0  # later requests admitted before it (paged cache)
    self._context = None  # (tokens to prefill, their block hashes), while it waits (paged cache)
    self.cached_tokens = 0  # prompt tokens found in the prefix cache at its (last) admission
    # With `logprobs`: per token, (its logprob, [(id, logprob)] of the most likely), as `tokens`.
    self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
    # With `prompt_logprobs`: per prompt token (the first: None), as `logprobs`.
    self.prompt_logprobs: list | None = [None] if params.prompt_logprobs else None
    self.matcher = None if params.grammar is None else params.grammar.matcher()
    self.leader: Request | None = None  # the first of `n` samples of one prompt (`submit_many`)
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
  prefilled: int = 0  # context tokens already in the cache
  position: int = 0  # where the next token goes (decode phase)
  token: int = 0  # the last sampled token, fed to the next decode step
  context: np.ndarray | None = None  # what prefill reads: the prompt (+ tokens already sent, after a preemption)
  admitted: int = 0  # admission order (the newest is preempted first)
  table: list = dataclasses.field(default_factory=list)  # paged cache: the row's blocks
  hashes: list = dataclasses.field(default_factory=list)  # prefix hashes of its full blocks so far
  registered: int = 0  # full blocks keyed in the prefix cache

  def __post_init__(self):
    if self.context is None:
      self.context = self.request.prompt

  @property
  def decoding(self) -> bool:
    return self.prefilled == self.context.size

  @property
  def cached(self) -> int:
    """Tokens of the sequence whose keys and values are in the cache."""
    return self.position if self.decoding else self.prefilled


@dataclasses.dataclass
class EngineTotals:
  """Counters since the engine started (the server's /metrics reads them)."""

  requests_finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  prompt_tokens: int = 0
  generated_tokens: int = 0
  decode_steps: int = 0
  prefill_chunks: int = 0
  draft_tokens: int = 0  # speculation: draft tokens proposed to live rows
  accepted_tokens: int = 0  # of those, accepted
  steps: int = 0  # ragged steps (paged cache)
  preemptions: int = 0  # requests whose blocks were taken back to make room (paged cache)
  running_peak: int = 0  # most requests in the engine at once
  computed_prompt_tokens: int = 0  # prompt tokens the model ran (not taken from the cache or a fork)
  masks: int = 0  # grammar masks computed
  mask_seconds: float = 0.0  # host time computing them


def sized_pool(policy: Paged, cfg, max_batch: int, max_seq_len: int, memory: int | None) -> Paged:
  """The paged policy with its pool sized: `memory` bytes (default: the dense cache's max_batch x
  max_seq_len positions) in whole blocks."""
  if policy.num_blocks is not None:
    if memory is not None:
      raise GenerationError("give the paged cache's size once: num_blocks or kv_cache_memory")
    return policy
  per_row = policy.blocks_per_row(max_seq_len)
  blocks = max_batch * per_row if memory is None else int(memory) // policy.block_bytes(cfg)
  if blocks < 1:
    raise GenerationError(
      f"kv_cache_memory={memory} bytes holds no block ({policy.block_bytes(cfg)} bytes per block of "
      f"{policy.block_size} tokens over {cfg.num_layers} layers)"
    )
  return dataclasses.replace(policy, num_blocks=blocks)


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
    max_seq_len: positions per slot (what the cache policy makes of them: its `room` decides how
      many new tokens a prompt leaves).
    prefill_chunk: prompt tokens prefilled per scheduler iteration (between two decode steps).
    max_waiting: requests that may wait for a slot (beyond those free slots take at once); more
      raise `QueueFullError`.
    mesh: optional device mesh: weights placed by their logical axes, cache rows over data/fsdp
      and kv heads over tensor, as in `Generator`.
    min_prefill_bucket: smallest padded chunk (chunks shorter than `prefill_chunk` are padded to a
      power of two from here).
    min_kv_bucket: smallest attention span (steps attend over a power of two of cache positions,
      from here up to max_seq_len, that covers every live position; the dense cache only).
    kv_cache: the cache policy (`jaxeff.inference.cache`; default `Paged()`: blocks allocated as
      requests grow, prompt prefixes shared; `Dense()`, the default on a mesh that splits the batch
      over data/fsdp: every slot a row of max_seq_len positions).
    speculator: a `jaxeff.generate.speculative` speculator; each step then drafts and verifies.
    kv_cache_memory: bytes of the paged cache's block pool (default: what the dense cache would
      take, max_batch x max_seq_len positions); with more slots than the pool holds at full length,
      requests share it and the newest is preempted (and recomputed later) when it runs out.
    prefix_caching: reuse the cached blocks of a prompt's longest cached prefix (paged cache).
    token_budget: tokens one step computes at most (paged cache): every decoding request's token,
      then prefill chunks of as many prompts as fit (vLLM's max_num_batched_tokens; at least
      max_batch). In packed steps a prompt's chunk may take all of it; `prefill_chunk` caps chunks
      in the gather path's steps.
    max_prefill_rows: prompts one step prefills at most (paged cache; default min(4, max_batch)): in
      packed steps it sizes the attention's prefill work (every possible prompt costs as much as a
      real one), in the gather path's steps each count is a compiled shape.
    max_passes: times a waiting request may be passed over by later, smaller ones that fit before
      it (paged cache); then admission waits for it (first come, first served).
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
    kv_cache=None,
    speculator=None,
    kv_cache_memory: int | None = None,
    prefix_caching: bool = True,
    token_budget: int = 256,
    max_prefill_rows: int | None = None,
    max_passes: int = 8,
  ):
    if prefill_chunk < 1 or max_waiting < 0:
      raise GenerationError(f"need prefill_chunk >= 1 and max_waiting >= 0, got {prefill_chunk}, {max_waiting}")
    if token_budget < 1 or (max_prefill_rows is not None and max_prefill_rows < 1) or max_passes < 0:
      raise GenerationError(
        f"need token_budget >= 1, max_prefill_rows >= 1 and max_passes >= 0, got {token_budget}, "
        f"{max_prefill_rows}, {max_passes}"
      )
    if kv_cache is None:  # the paged cache, unless the mesh splits the batch (its steps are one row)
      splits = mesh is not None and mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1) > 1
      kv_cache = Dense() if splits else Paged()
    self.blocks: BlockManager | None = None
    self.packed = False  # steps pack every sequence's tokens unpadded (PackedLayout)
    if isinstance(kv_cache, Paged):
      if token_budget < max_batch:
        raise GenerationError(
          f"token_budget ({token_budget}) must be at least max_batch ({max_batch}): every running request "
          "decodes one token per step"
        )
      kv_cache = sized_pool(kv_cache, model.cfg, max_batch, max_seq_len, kv_cache_memory)
      if mesh is not None and mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1) > 1:
        raise GenerationError(
          "the paged cache's steps pack every request into one row of tokens: shard over tensor only "
          "(--mesh tensor=N), or serve with --kv-cache dense"
        )
      # A speculator keeps per-row state of its own (history, a draft model's cache) that a prefix
      # taken from the cache would not fill: with one, every prompt is prefilled.
      self.blocks = BlockManager(
        kv_cache.num_blocks, kv_cache.block_size, prefix_caching=prefix_caching and speculator is None
      )
    elif kv_cache_memory is not None:
      raise GenerationError(f"kv_cache_memory sizes the paged cache's pool; the {kv_cache.name} cache takes none")
    self.runner = ModelRunner(
      model,
      max_batch=max_batch,
      max_seq_len=max_seq_len,
      kv_cache=kv_cache,
      speculator=speculator,
      mesh=mesh,
      token_state=True,
    )
    if self.blocks is not None and speculator is None:
      self.packed = kv_cache.uses_kernel(attention_lib.bind(model.cfg), tree=False)
    if max_prefill_rows is None:
      max_prefill_rows = min(4, max_batch)
    self.token_budget, self.max_prefill_rows, self.max_passes = token_budget, max_prefill_rows, max_passes
    self._admissions = itertools.count()
    self._tables = None
    if self.blocks is not None:
      self._tables = np.full((max_batch, kv_cache.blocks_per_row(max_seq_len)), -1, np.int32)
      self._tables_changed = True
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.max_batch, self.max_seq_len, self.mesh = max_batch, max_seq_len, mesh
    self.speculator = speculator
    self.prefill_chunk = min(prefill_chunk, self.runner.max_chunk())
    # Prompt tokens one step takes from one prompt (the paged cache's steps).
    self.step_chunk = token_budget if self.packed else self.prefill_chunk
    self.max_waiting = max_waiting
    self.min_prefill_bucket = min(min_prefill_bucket, self.prefill_chunk)
    self.min_kv_bucket = min_kv_bucket
    # Rows of a decode step: a multiple of the mesh's batch split, so a step partitions like the cache.
    self.min_rows = 1 if mesh is None else mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    self.cache_bytes = self.runner.cache_bytes
    self.totals = EngineTotals()
    self._slots: list[_Slot | None] = [None] * max_batch
    self._waiting: collections.deque[Request] = collections.deque()
    self._cv = threading.Condition()
    self._ids = itertools.count()
    self._seeds = np.random.default_rng()
    self._accepting = True
    self._stop_requested = False
    self._thread: threading.Thread | None = None
    self._mask_pool: concurrent.futures.ThreadPoolExecutor | None = None  # made on the first grammar
    self._next_masks: concurrent.futures.Future | None = None  # {request id: mask} being computed

  @property
  def traces(self) -> collections.Counter:
    """Compilations per runner program and shape."""
    return self.runner.traces

  @property
  def kv_cache(self):
    return self.runner.policy

  def room(self, prompt_tokens: int) -> int | None:
    """New tokens a prompt of `prompt_tokens` tokens leaves room for (None: any number)."""
    return self.runner.room(prompt_tokens)

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
    penalties: Penalties | None = None,
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    grammar=None,
  ) -> Request:
    """Queues a request and returns its handle at once.

    Args:
      prompt: token ids (or text, when the engine has a tokenizer: encoded with its specials).
      max_tokens: at most this many new tokens.
      temperature, top_k, top_p, min_p: sampling, as `jaxeff.generate.SamplingParams`; 0: greedy.
      seed: the request's PRNG seed (same seed, same tokens); None: a random one.
      stop_tokens: ids that end the request; None: the tokenizer's (none without a tokenizer).
      penalties: logit bias, repetition/presence/frequency penalties, min_tokens
        (`jaxeff.inference.logits.Penalties`), applied in the step.
      logprobs: record each new token's logprob and its `logprobs` most likely alternatives
        (0..MAX_LOGPROBS; `Request.logprobs`); None: off.
      prompt_logprobs: record the prompt tokens' logprobs (`Request.prompt_logprobs`; the prompt is
        then prefilled whole, not taken from the prefix cache).
      grammar: a compiled grammar (`jaxeff.serve.grammar.GrammarCompiler.compile`): every token is
        masked by it in the step, and the request ends (finish reason "stop") when it is complete.

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
    room = self.room(ids.size)
    if room is not None and max_tokens > room:
      raise GenerationError(
        f"the prompt has {ids.size} tokens; this engine's cache ({self.kv_cache.describe(1, self.max_seq_len)}"
        f"{', speculation included' if self.runner.lookahead else ''}) leaves room for {max(room, 0)} new tokens, "
        f"not max_tokens={max_tokens}"
      )
    if self.blocks is not None:
      need = self.blocks.blocks_for(ids.size + max_tokens + self.runner.lookahead)
      if need > self.blocks.num_blocks:
        raise GenerationError(
          f"the prompt ({ids.size} tokens) and max_tokens={max_tokens} need {need} blocks of "
          f"{self.blocks.block_size} tokens; the cache has {self.blocks.num_blocks} in all"
        )
    sampling = SamplingParams(temperature, top_k, top_p, min_p)  # validates them
    if seed is not None and not 0 <= seed < 2**32:
      raise GenerationError(f"seed must be in [0, 2**32), got {seed}")
    stops = tuple(self.tokenizer.stop_tokens if self.tokenizer else ()) if stop_tokens is None else tuple(stop_tokens)
    if len(stops) > MAX_STOP_TOKENS:
      raise GenerationError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(stops)}")
    if penalties == Penalties():
      penalties = None
    if penalties is not None:
      penalties.check_vocab(self.cfg.vocab_size)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
      raise GenerationError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    params = RequestParams(
      max_tokens=int(max_tokens),
      sampling=sampling,
      seed=int(self._seeds.integers(2**32)) if seed is None else int(seed),
      stop_tokens=tuple(int(s) for s in stops),
      penalties=penalties,
      logprobs=logprobs,
      prompt_logprobs=bool(prompt_logprobs),
      grammar=grammar,
    )
    return self._enqueue([Request(next(self._ids), ids.astype(np.int32), params)])[0]

  def submit_many(self, prompt, n: int, *, seed: int | None = None, **settings) -> list[Request]:
    """`n` samples of one prompt (`submit`'s settings; sample j's seed is seed + j): with the paged
    cache the prompt is prefilled once and its blocks shared (the others fork it and compute only
    its last token, each with its own seed)."""
    if not isinstance(n, int) or n < 1:
      raise GenerationError(f"n must be a positive integer, got {n!r}")
    first = self.submit(prompt, seed=seed, **settings)
    base = first.params.seed
    others = [
      Request(next(self._ids), first.prompt, dataclasses.replace(first.params, seed=(base + j) % 2**32))
      for j in range(1, n)
    ]
    for r in others:
      r.leader = first
    try:
      return [first, *self._enqueue(others)]
    except GenerationError:
      first.cancel()
      raise

  def _enqueue(self, requests: list[Request]) -> list[Request]:
    for request in requests:
      request._wake_engine = self._wake
    with self._cv:
      if self.failure is not None:
        raise self.failure
      if not self._accepting:
        raise EngineStoppedError("the engine is shutting down")
      # Requests that free slots will take at once do not count as waiting.
      queued = sum(not r.cancelled for r in self._waiting) - self._slots.count(None)
      if queued + len(requests) - 1 >= self.max_waiting:
        raise QueueFullError(f"{queued} requests are already waiting (max_waiting={self.max_waiting})")
      self._waiting.extend(requests)
      self._cv.notify()
    self.start()
    return requests

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

  def warm_up(self, progress=None, *, full: bool = False) -> int:
    """Compiles the programs traffic needs before serving it: the decode step (with a speculator:
    its draft and verification) for every rows x attention-span bucket, the first prefill chunk of
    every padded size, and a whole chunk at every span (later chunks). (Dense cache: only the exact
    pieces of a prompt that fills the cache to its last chunk compile on first use.) The paged
    cache's packed steps: every token-count bucket, so no traffic compiles anything. Its gather-path
    steps that mix decode rows with prompt chunks, or prefill several prompts, compile on first use
    unless `full`: then every (decode rows, prompts, chunk, span) bucket compiles now. Call it while
    no request is in the engine; `progress(done, total)` is called after each. Returns the number of programs."""
    if self.num_running or self.num_waiting:
      raise GenerationError("warm_up needs an idle engine (no requests submitted yet)")
    rows = sorted({self.rows_bucket(1 << k) for k in range(self.max_batch.bit_length() + 1)})
    spans = sorted({self.kv_bucket(self.min_kv_bucket << k) for k in range(self.max_seq_len.bit_length())}, key=str)
    sizes, size = [], self.min_prefill_bucket
    while size < self.prefill_chunk:
      sizes.append(size)
      size *= 2
    sizes.append(self.prefill_chunk)
    prefills = {(c, self.kv_bucket(c)) for c in sizes if c <= self.max_seq_len}
    if self.kv_cache.spans:
      prefills |= {(self.prefill_chunk, s) for s in spans if s >= self.kv_bucket(self.prefill_chunk)}
    jobs = [("decode", r, s) for r in rows for s in spans] + [("prefill", c, s) for c, s in sorted(prefills, key=str)]
    ragged = self.blocks is not None and self.speculator is None
    if ragged:
      self.runner.set_tables(np.full_like(self._tables, -1))  # nothing is written
      self._tables_changed = True
    if self.packed:
      buckets = {self.tokens_bucket(1 << k) for k in range(self.token_budget.bit_length() + 1)}
      jobs = [("packed", t, None) for t in sorted(buckets)]
    elif ragged:
      layouts = [(RaggedLayout(r, 0, 0), s) for r in rows for s in spans]
      layouts += [(RaggedLayout(0, 1, c), s) for c, s in sorted(prefills, key=str)]
      if full:
        prompts = sorted({min(self.max_prefill_rows, 1 << k) for k in range(self.max_prefill_rows.bit_length())})
        mixed = [(r, n, c) for r in [0, *rows] for n in prompts for c in sizes if (r, n) != (0, 1)]
        layouts += [(RaggedLayout(*m), s) for m in mixed for s in spans if s >= self.kv_bucket(m[2])]
      jobs = [("step", layout, span) for layout, span in layouts]
    for done, (kind, size, span) in enumerate(jobs, 1):
      if kind == "packed":
        s = self.max_batch
        out = self.runner.packed_step(
          np.zeros(size, np.int32), positions=np.full(size, -1, np.int32), seq_rows=np.full(s, -1, np.int32),
          cu_q_lens=np.zeros(s + 1, np.int32), lengths=np.full(s, -1, np.int32), rows=self._row_arrays([], s),
          shape=SamplingShape.any(), max_prefills=self.max_prefill_rows, score=self._no_score(size),
        )  # fmt: skip
      elif kind == "step":
        layout = size
        out = self.runner.step(
          np.zeros(layout.tokens, np.int32), positions=np.full(layout.tokens, -1, np.int32),
          seq_rows=np.full(layout.rows, -1, np.int32), lengths=np.full(layout.rows, -1, np.int32),
          rows=self._row_arrays([], layout.rows), layout=layout, shape=SamplingShape.any(), span=span,
          score=self._no_score(layout.tokens),
        )  # fmt: skip
      elif kind == "decode":
        idle = np.zeros(size, bool)  # no row is live: nothing is written back
        arrays = self._row_arrays([], size)
        if self.speculator is None:
          out = self.runner.decode(
            np.zeros(size, np.int32), positions=np.zeros(size, np.int32), live=idle, rows=arrays,
            shape=SamplingShape.any(), span=span, protect=True,
          )  # fmt: skip
        else:
          draft, q = self.runner.draft(rows=arrays, live=idle, shape=SamplingShape.any(), span=span, protect=True)
          out = self.runner.verify(
            draft, q, remaining=np.zeros(size, np.int32), rows=arrays, live=idle, shape=SamplingShape.any(),
            span=span, protect=True, masks=self._tree_masks([None] * size, draft),
          )  # fmt: skip
      else:
        start = max(0, min(span or self.max_seq_len, self.max_seq_len) - size)
        # A prompt that ends in the chunk, in a free row (emptied first: starting at 0 if it does).
        out = self.runner.prefill(
          np.zeros((1, size), np.int32), starts=np.array([start], np.int32),
          lengths=np.array([start + size], np.int32), rows=self._row_arrays([], 1), row0=0,
          shape=SamplingShape.any(), span=span, score=self._no_score((1, size)),
        )  # fmt: skip
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
    if self._mask_pool is not None:
      self._mask_pool.shutdown(wait=False)
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
        if self.blocks is None:
          self._admit()
      self._free_cancelled()
      if self.blocks is not None and self.speculator is None:
        self._paged_iteration()
        continue
      if self.blocks is not None:
        self._admit_paged()
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
        self._start_row(i)
    self.totals.running_peak = max(self.totals.running_peak, self.num_running)

  def _start_row(self, i: int) -> None:
    """Slot i's request starts (again): its token state on the device, its prompt's logprobs anew."""
    slot = self._slots[i]
    request = slot.request
    self.runner.reset_tokens(i, slot.context, len(request.tokens), request.params.penalties)
    if request.prompt_logprobs is not None and slot.prefilled == 0:
      request.prompt_logprobs = [None]

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
    self._drop_blocks(i)
    self._slots[i] = None
    self.totals.requests_finished[reason] += 1
    request._finish(reason, error)

  def _chunk(self, slot: _Slot) -> tuple[int, int]:
    """(chunk length C, real tokens in it) for the slot's next prefill chunk."""
    rest = slot.context.size - slot.prefilled
    if rest >= self.prefill_chunk:
      return self.prefill_chunk, self.prefill_chunk
    # A short prompt is padded to a power of two; the tail of a long one to a whole chunk (one
    # program per attention span instead of one per span and tail size).
    size = min(self.prefill_chunk, max(self.min_prefill_bucket, pow2_at_least(rest)))
    if slot.prefilled:
      size = self.prefill_chunk
    if self.kv_cache.pads_to_end and slot.prefilled + size > self.max_seq_len:
      # Padding would be written past the cache's end: exact pieces.
      size = 1 << (rest.bit_length() - 1)
      return size, size
    return size, rest

  def _prefill_chunk(self, i: int) -> None:
    slot = self._slots[i]
    request = slot.request
    size, real = self._chunk(slot)
    if self.blocks is not None and not self._room_for(i, slot.prefilled + real):
      return
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :real] = slot.context[slot.prefilled : slot.prefilled + real]
    score = self._no_score((1, size))
    try:
      scored = self._score_chunk(score, 0, i, real)
      token, stopped = self.runner.prefill(
        tokens,
        starts=np.array([slot.prefilled], np.int32),
        lengths=np.array([slot.context.size], np.int32),
        rows=self._row_arrays([i], 1),
        row0=i,
        shape=SamplingShape.any(),
        span=self.kv_bucket(slot.prefilled + size),
        score=score,
      )
      token, stopped = int(token[0]), bool(stopped[0])
      self._take_prompt_logprobs(scored)
      lp = self._step_logprobs([i])
    except Exception as e:  # this request alone fails
      log.exception("request %d failed in prefill", request.id)
      self._release(i, "error", e)
      return
    slot.prefilled += real
    self.totals.prefill_chunks += 1
    self.totals.computed_prompt_tokens += real
    if not slot.decoding:
      return
    self.totals.prompt_tokens += slot.context.size
    slot.position, slot.token = slot.context.size, token
    self._deliver(i, token, stopped, time.monotonic(), self._logprob(i, lp, 0))

  def _deliver(self, i: int, token: int, stopped: bool, now: float, logprob=None) -> None:
    request = self._slots[i].request
    if stopped:
      self._release(i, "stop")
      return
    complete = False
    if request.matcher is not None:
      if not request.matcher.accept(token):
        self._release(i, "error", GenerationError(f"token {token} breaks the request's grammar"))
        return
      complete = request.matcher.done
    if logprob is not None:
      request.logprobs.append(logprob)
    try:
      request._emit(token, now)
    except Exception as e:  # e.g. its consumer's event loop is gone
      self._release(i, "error", e)
      return
    self.totals.generated_tokens += 1
    if complete:  # the grammar admits nothing more (but the end)
      self._release(i, "stop")
    elif len(request.tokens) >= request.params.max_tokens:
      self._release(i, "length")

  # ------------------------------------------------------------------ the paged cache's scheduler

  def _drop_blocks(self, i: int) -> None:
    slot = self._slots[i]
    if self.blocks is None or slot is None:
      return
    self.blocks.release(slot.table)
    slot.table = []
    self._tables[i] = -1
    self._tables_changed = True

  def _grow(self, i: int, tokens: int) -> bool:
    """Slot i's table covers its first `tokens` positions (allocating blocks); False when the pool
    has too few free blocks."""
    slot = self._slots[i]
    need = self.blocks.blocks_for(min(tokens, self.max_seq_len)) - len(slot.table)
    if need <= 0:
      return True
    fresh = self.blocks.allocate(need)
    if fresh is None:
      return False
    self._tables[i, len(slot.table) : len(slot.table) + need] = fresh
    slot.table.extend(fresh)
    self._tables_changed = True
    return True

  def _preempt(self, i: int) -> None:
    """Takes slot i's blocks back and requeues its request first in line: it is recomputed (its
    prompt and the tokens it has sent so far prefilled again, mostly from the prefix cache)."""
    request = self._slots[i].request
    self._drop_blocks(i)
    self._slots[i] = None
    request.preemptions += 1
    self.totals.preemptions += 1
    with self._cv:
      self._waiting.appendleft(request)

  def _newest(self) -> int:
    return max((i for i, s in enumerate(self._slots) if s is not None), key=lambda i: self._slots[i].admitted)

  def _admit_paged(self) -> list[int]:
    """Waiting requests take free slots while the pool has blocks for their first chunk (after the
    prefix cache's hit), in arrival order; a request that does not fit may be passed over by later
    ones `max_passes` times, then admission waits for it. A request whose next prompt blocks another
    request is computing right now waits for them (so `n` samples of one prompt, or clients sending
    one system prompt at once, prefill it once). Returns the slots it filled."""
    admitted = []
    with self._cv:
      free = [i for i, s in enumerate(self._slots) if s is None]
      skipped = []  # earlier requests that did not fit
      computing = set()  # prefix hashes of blocks that prompts being prefilled will fill
      if self.blocks.prefix_caching:
        for s in self._slots:
          if s is not None and not s.decoding:
            computing.update(s.hashes[s.registered :])
      for request in list(self._waiting):
        if not free:
          break
        if request.cancelled:
          continue
        source = self._fork_source(request)
        if source == -1:
          continue  # its leader is still prefilling their prompt: fork it when done
        if source is not None:
          self._waiting.remove(request)
          i = free.pop(0)
          if not self._fork(source, i, request):
            self._waiting.appendleft(request)
            free.insert(0, i)
            break
          admitted.append(i)
          continue
        context, hashes = self._context_hashes(request)
        hit = self.blocks.match(hashes, context.size, count=False)
        if request.params.prompt_logprobs:
          hit = []  # every prompt token's logprob is computed
        if len(hit) < len(hashes) and hashes[len(hit)] in computing:
          continue  # a running prompt is computing its next blocks (e.g. n samples of one prompt): wait for them
        first = min(context.size, len(hit) * self.blocks.block_size + self.step_chunk)
        need = self.blocks.blocks_for(first) - len(hit) + int(np.sum(self.blocks.refs[hit] == 0))
        if need > self.blocks.num_free:
          skipped.append(request)
          continue
        if any(earlier.passed_over >= self.max_passes for earlier in skipped):
          break  # first come, first served: the later ones wait behind it now
        for earlier in skipped:
          earlier.passed_over += 1
        self._waiting.remove(request)
        self.blocks.count(context.size, len(hit))
        self.blocks.acquire(hit)
        i = free.pop(0)
        slot = self._slots[i] = _Slot(request, context=context, admitted=next(self._admissions))
        slot.table, slot.hashes, slot.registered = list(hit), hashes, len(hit)
        slot.prefilled = len(hit) * self.blocks.block_size
        request.cached_tokens = slot.prefilled
        if self.blocks.prefix_caching:
          computing.update(hashes[len(hit) :])
        self._tables[i] = -1
        self._tables[i, : len(hit)] = hit
        self._tables_changed = True
        self._grow(i, first)  # its first chunk's blocks, so the next admission sees what is left
        self._start_row(i)
        admitted.append(i)
    self.totals.running_peak = max(self.totals.running_peak, self.num_running)
    return admitted

  def _fork_source(self, request: Request) -> int | None:
    """The slot whose blocks `request` (a sample of `n`) can share: its leader's, once all of the
    prompt but its last token is in the cache; -1 while the leader is still prefilling; None when
    it cannot fork (no leader in a slot, or a request that must compute its prompt)."""
    leader = request.leader
    if leader is None or request.tokens or request.params.prompt_logprobs or self.speculator is not None:
      return None
    for i, slot in enumerate(self._slots):
      if slot is not None and slot.request is leader:
        return i if slot.cached >= request.prompt.size - 1 else -1
    return None

  def _fork(self, source: int, i: int, request: Request) -> bool:
    """Slot i takes `request` sharing slot `source`'s blocks for all of the prompt but its last
    token (a partly filled last block is copied: it will write there); it then computes only that
    token, and samples its first with its own seed. False when no block is free for the copy."""
    src = self._slots[source]
    keep = request.prompt.size - 1
    full, partial = divmod(keep, self.blocks.block_size)
    table = self.blocks.fork(src.table[:full])
    if partial:
      fresh = self.blocks.allocate(1)
      if fresh is None:
        self.blocks.release(table)
        return False
      self.runner.copy_blocks([src.table[full]], fresh)
      table += fresh
    context, hashes = self._context_hashes(request)
    slot = self._slots[i] = _Slot(request, context=context, admitted=next(self._admissions))
    slot.table, slot.hashes, slot.registered, slot.prefilled = table, hashes, min(full, src.registered), keep
    self._tables[i] = -1
    self._tables[i, : len(table)] = table
    self._tables_changed = True
    if not self._grow(i, context.size):  # the block its last token goes to
      self._drop_blocks(i)
      self._slots[i] = None
      return False
    request.cached_tokens = keep
    self.blocks.count(context.size, full)
    self._start_row(i)
    return True

  def _context_hashes(self, request: Request) -> tuple[np.ndarray, list]:
    """What a request prefills on admission (its prompt, and after a preemption the tokens it has
    sent) and that text's block hashes, kept on the request: a request waiting through many
    iterations is hashed once, not once per iteration."""
    size = request.prompt.size + len(request.tokens)
    if request._context is None or request._context[0].size != size:
      context = np.concatenate([request.prompt, np.asarray(request.tokens, np.int32)])
      request._context = (context, self.blocks.hashes(context))
    return request._context

  def _register_full_blocks(self, i: int) -> None:
    """Keys slot i's blocks that became full (their tokens all written) in the prefix cache."""
    slot = self._slots[i]
    full = slot.cached // self.blocks.block_size
    if full <= slot.registered:
      return
    if full > len(slot.hashes):
      tokens = np.concatenate([slot.request.prompt, np.asarray(slot.request.tokens, np.int32)])
      tokens = tokens[: full * self.blocks.block_size]
      parent = slot.hashes[-1] if slot.hashes else None
      slot.hashes = slot.hashes + self.blocks.hashes(tokens, start=len(slot.hashes), parent=parent)
    self.blocks.register(slot.table[slot.registered : full], slot.hashes[slot.registered : full])
    slot.registered = full

  def _plan(self) -> tuple[list[int], list[tuple[int, int]]]:
    """This step's rows: every decoding slot (blocks for its next token, preempting the newest
    requests when the pool is out), then prefill chunks in admission order within the token budget."""
    order = sorted((i for i, s in enumerate(self._slots) if s is not None), key=lambda i: self._slots[i].admitted)
    for i in order:
      slot = self._slots[i]
      if slot is None or not slot.decoding:
        continue
      while self._slots[i] is not None and not self._grow(i, slot.position + 1):
        self._preempt(self._newest())
    decode = [i for i in order if self._slots[i] is not None and self._slots[i].decoding]
    budget = self.token_budget - len(decode)
    prefill = []
    for i in order:
      slot = self._slots[i]
      if slot is None or slot.decoding:
        continue
      if len(prefill) == self.max_prefill_rows or budget <= 0:
        break
      chunk = min(slot.context.size - slot.prefilled, self.step_chunk, budget)
      if not self._grow(i, slot.prefilled + chunk):
        break
      prefill.append((i, chunk))
      budget -= chunk
    return decode, prefill

  def _paged_iteration(self) -> None:
    # Running requests first (their blocks, preempting the newest when the pool is out), then
    # admissions from what is left, as vLLM schedules.
    decode, prefill = self._plan()
    admitted = self._admit_paged()
    budget = self.token_budget - len(decode) - sum(c for _, c in prefill)
    for i in admitted:
      if len(prefill) == self.max_prefill_rows or budget <= 0:
        break
      slot = self._slots[i]
      chunk = min(slot.context.size - slot.prefilled, self.step_chunk, budget)
      prefill.append((i, chunk))  # its blocks were taken at admission
      budget -= chunk
    if not decode and not prefill:
      if any(self._slots):  # the pool holds only partly prefilled prompts: make room
        self._preempt(self._newest())
      return
    if self._tables_changed:
      self.runner.set_tables(self._tables)
      self._tables_changed = False
    try:
      nd, nxt, stopped = (self._packed_step if self.packed else self._ragged_step)(decode, prefill)
      nxt, stopped = np.asarray(nxt), np.asarray(stopped)
    except Exception as e:  # the shared step failed: the requests in it fail
      log.exception("step failed")
      for i in decode + [i for i, _ in prefill]:
        self._release(i, "error", e)
      return
    now = time.monotonic()
    self.totals.steps += 1
    self.totals.decode_steps += bool(decode)
    lp = self._step_logprobs(decode + [i for i, _ in prefill])
    for j, i in enumerate(decode):
      slot = self._slots[i]
      slot.position += 1
      slot.token = int(nxt[j])
      self._register_full_blocks(i)
      self._deliver(i, slot.token, bool(stopped[j]), now, self._logprob(i, lp, j))
    for k, (i, c) in enumerate(prefill):
      slot = self._slots[i]
      slot.prefilled += c
      self.totals.prefill_chunks += 1
      self.totals.computed_prompt_tokens += c
      if slot.decoding:
        slot.position, slot.token = slot.context.size, int(nxt[nd + k])
      self._register_full_blocks(i)
      if not slot.decoding:
        continue
      self.totals.prompt_tokens += slot.context.size
      self._deliver(i, slot.token, bool(stopped[nd + k]), now, self._logprob(i, lp, nd + k))
    self._prefetch_masks()

  def tokens_bucket(self, tokens: int) -> int:
    """Tokens a packed step runs for `tokens` real ones: a power of two, capped at token_budget."""
    return min(self.token_budget, pow2_at_least(tokens))

  def _packed_step(self, decode: list[int], prefill: list[tuple[int, int]]):
    """Decoding slots' tokens, then the prompts' chunks, back to back in one packed step of
    max_batch sequences. Returns (index of the first prompt, tokens, stop flags)."""
    count = len(decode) + sum(c for _, c in prefill)
    t = self.tokens_bucket(count)
    tokens, positions = np.zeros(t, np.int32), np.full(t, -1, np.int32)
    s = self.max_batch
    seq_rows, lengths, q_lens = np.full(s, -1, np.int32), np.full(s, -1, np.int32), np.zeros(s, np.int32)
    for j, i in enumerate(decode):
      slot = self._slots[i]
      tokens[j], positions[j], seq_rows[j], lengths[j], q_lens[j] = slot.token, slot.position, i, slot.position + 1, 1
    at = len(decode)
    score, scored = self._no_score(t), []
    for k, (i, c) in enumerate(prefill):
      slot, j = self._slots[i], len(decode) + k
      tokens[at : at + c] = slot.context[slot.prefilled : slot.prefilled + c]
      positions[at : at + c] = np.arange(slot.prefilled, slot.prefilled + c)
      seq_rows[j], lengths[j], q_lens[j] = i, slot.context.size, c
      scored += self._score_chunk(score, at, i, c)
      at += c
    nxt, stopped = self.runner.packed_step(
      tokens, positions=positions, seq_rows=seq_rows, cu_q_lens=np.concatenate([[0], np.cumsum(q_lens)]),
      lengths=lengths, rows=self._row_arrays(list(decode) + [i for i, _ in prefill], s), shape=SamplingShape.any(),
      max_prefills=self.max_prefill_rows, score=score,
    )  # fmt: skip
    self._take_prompt_logprobs(scored)
    return len(decode), nxt, stopped

  # ------------------------------------------------------------------ per-row extras

  def _row_arrays(self, slots: list[int], n: int):
    """Step arrays for `n` rows, row j for slot slots[j] (the rest unused), with each constrained
    request's grammar mask for its next token."""
    settings: list[RowSettings | None] = [None] * n
    for j, i in enumerate(slots):
      settings[j] = None if i is None else self._slots[i].request.params.row
    arrays = row_arrays(settings, mask_words=self.runner.mask_words)
    ready = {}
    if self._next_masks is not None:
      ready, seconds = self._next_masks.result()
      self._next_masks = None
      self.totals.mask_seconds += seconds
      self.totals.masks += len(ready)
    for j, i in enumerate(slots):
      request = None if i is None else self._slots[i].request
      if request is None or request.matcher is None:
        continue
      if request.id in ready:
        arrays.extras.masks[j] = ready[request.id]
      else:
        t0 = time.perf_counter()
        request.matcher.fill(arrays.extras.masks[j])
        self.totals.mask_seconds += time.perf_counter() - t0
        self.totals.masks += 1
    return arrays

  def _tree_masks(self, row_slots: list, draft) -> np.ndarray:
    """Speculation: each constrained row's grammar mask at every node of the draft tree, the
    grammar advanced along the node's path (a path through a token the grammar refuses is never
    accepted past it: its nodes keep all ones)."""
    words = self.runner.mask_words
    tree = self.runner.speculator.tree
    masks = np.full((len(row_slots), tree.size, words), -1, np.int32)
    constrained = [i for i in row_slots if i is not None and self._slots[i].request.matcher is not None]
    if not constrained:
      return masks
    t0 = time.perf_counter()
    draft = np.asarray(draft)
    paths = np.asarray(tree.paths)
    for i in constrained:
      matcher = self._slots[i].request.matcher
      for node in range(tree.size):
        tokens = [int(draft[i, p - 1]) for p in paths[node] if p > 0]  # node p's token is draft[p - 1]
        if matcher.valid_prefix(tokens) < len(tokens):
          continue
        for token in tokens:
          matcher.accept(token)
        matcher.fill(masks[i, node])
        matcher.rollback(len(tokens))
    self.totals.mask_seconds += time.perf_counter() - t0
    self.totals.masks += len(constrained) * tree.size
    return masks

  def _prefetch_masks(self) -> None:
    """Starts computing, on a worker thread (the grammar engine releases the GIL), the next token's
    mask of every constrained request that is decoding, while this thread delivers, plans and
    builds the next step; `_row_arrays` takes them."""
    requests = [s.request for s in self._slots if s is not None and s.decoding and s.request.matcher is not None]
    if not requests or self._next_masks is not None:
      return
    if self._mask_pool is None:
      self._mask_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxeff-grammar")
    words = self.runner.mask_words

    def fill():
      t0 = time.perf_counter()
      out = np.empty((len(requests), words), np.int32)
      for k, request in enumerate(requests):
        request.matcher.fill(out[k])
      return {r.id: out[k] for k, r in enumerate(requests)}, time.perf_counter() - t0

    self._next_masks = self._mask_pool.submit(fill)

  @staticmethod
  def _no_score(size):
    """A step's prompt-scoring input: -1, nothing to score (`_score_chunk` marks what is)."""
    return np.full(size, -1, np.int32)

  def _score_chunk(self, score, at: int, i: int, c: int) -> list:
    """Marks the next prompt token at each position of slot i's chunk (at `at` in the step) for
    scoring, when its request wants the prompt's logprobs; what `_take_prompt_logprobs` reads."""
    slot = self._slots[i]
    if not slot.request.params.prompt_logprobs:
      return []
    p = np.arange(slot.prefilled, slot.prefilled + c)
    size = slot.request.prompt.size
    nxt = np.where(p + 1 < size, slot.context[np.minimum(p + 1, slot.context.size - 1)], -1)
    score.reshape(-1)[at : at + c] = nxt
    return [(slot.request, at, nxt)]

  def _take_prompt_logprobs(self, scored: list) -> None:
    if not scored:
      return
    plp = jax.device_get(self.runner.scores[1])
    k = plp.top.shape[-1]  # a prefill step's are [rows, chunk]: flattened like its score input
    plp = type(plp)(plp.token.reshape(-1), plp.top_ids.reshape(-1, k), plp.top.reshape(-1, k))
    for request, at, nxt in scored:
      for k, token in enumerate(nxt):
        if token >= 0:
          request.prompt_logprobs.append(_entry(plp, at + k, request.params.logprobs or 0))

  def _logprob(self, i: int, lp, j):
    """Slot i's logprob entry for its token sampled in row j of the last step (None: not wanted)."""
    n = self._slots[i].request.params.logprobs
    return None if n is None else _entry(lp, j, n)

  def _step_logprobs(self, slots) -> object:
    """The last step's sampled-token logprobs on the host when a request among `slots` wants them."""
    if any(self._slots[i] is not None and self._slots[i].request.params.logprobs is not None for i in slots):
      return jax.device_get(self.runner.scores[0])
    return None

  def _ragged_step(self, decode: list[int], prefill: list[tuple[int, int]]):
    """The gather path's step: decode rows (a power of two), then prompts' chunks padded to one
    power-of-two length (RaggedLayout). Returns (index of the first prompt, tokens, stop flags)."""
    nd = 0 if not decode else self.rows_bucket(len(decode))
    npf = 0 if not prefill else min(self.max_prefill_rows, pow2_at_least(len(prefill)))
    chunk = 0
    if prefill:
      chunk = min(self.step_chunk, max(self.min_prefill_bucket, pow2_at_least(max(c for _, c in prefill))))
    layout = RaggedLayout(nd, npf, chunk)
    tokens = np.zeros(layout.tokens, np.int32)
    positions = np.full(layout.tokens, -1, np.int32)
    seq_rows = np.full(layout.rows, -1, np.int32)
    lengths = np.full(layout.rows, -1, np.int32)
    row_slots = [None] * layout.rows
    reach = 1
    for j, i in enumerate(decode):
      slot = self._slots[i]
      tokens[j], positions[j], seq_rows[j], lengths[j] = slot.token, slot.position, i, slot.position + 1
      row_slots[j] = i
      reach = max(reach, slot.position + 1)
    score, scored = self._no_score(layout.tokens), []
    for k, (i, c) in enumerate(prefill):
      slot, j, at = self._slots[i], nd + k, nd + k * chunk
      tokens[at : at + c] = slot.context[slot.prefilled : slot.prefilled + c]
      positions[at : at + c] = np.arange(slot.prefilled, slot.prefilled + c)
      seq_rows[j], lengths[j], row_slots[j] = i, slot.context.size, i
      scored += self._score_chunk(score, at, i, c)
      reach = max(reach, slot.prefilled + c)
    rows = self._row_arrays(row_slots, layout.rows)
    nxt, stopped = self.runner.step(
      tokens, positions=positions, seq_rows=seq_rows, lengths=lengths, rows=rows,
      layout=layout, shape=SamplingShape.any(), span=self.kv_bucket(reach), score=score,
    )  # fmt: skip
    self._take_prompt_logprobs(scored)
    return nd, nxt, stopped

  def kv_bucket(self, length: int) -> int | None:
    """Cache positions a step attends over when its positions are below `length`: a power of two
    >= min_kv_bucket, capped at max_seq_len (one compiled program per bucket); None for a cache
    policy without spans (every step reads its whole state)."""
    return self.runner.span_for(length, self.min_kv_bucket)

  def rows_bucket(self, rows: int) -> int:
    """Rows a decode step runs when the highest live slot is `rows - 1`: a power of two (at least
    the mesh's batch split), capped at max_batch."""
    return min(self.max_batch, max(self.min_rows, pow2_at_least(rows)))

  def _room_for(self, i: int, tokens: int) -> bool:
    """Blocks for slot i's first `tokens` positions, preempting the newest requests while the pool
    is out (False: slot i itself was preempted); the tables pushed to the runner."""
    while self._slots[i] is not None and not self._grow(i, tokens):
      self._preempt(self._newest())
    if self._tables_changed:
      self.runner.set_tables(self._tables)
      self._tables_changed = False
    return self._slots[i] is not None

  def _decode_step(self) -> None:
    if self.blocks is not None:  # blocks for every live row's next token and its speculation
      order = sorted((i for i, s in enumerate(self._slots) if s is not None), key=lambda i: self._slots[i].admitted)
      for i in order:
        slot = self._slots[i]
        if slot is not None and slot.decoding:
          self._room_for(i, slot.position + 1 + self.runner.lookahead)
    live = [i for i, s in enumerate(self._slots) if s is not None and s.decoding]
    if not live:
      return
    # Only the rows up to the highest live slot run (slots are filled lowest first), and attention
    # reads only the positions they have reached: a step costs what the live requests need.
    b = self.rows_bucket(max(live) + 1)
    reach = max(self._slots[i].position for i in live) + 1 + self.runner.lookahead
    span = self.kv_bucket(reach)
    tokens, positions, is_live = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, bool)
    remaining = np.zeros(b, np.int32)
    row_slots: list[int | None] = [None] * b
    for i in live:
      slot = self._slots[i]
      tokens[i], positions[i], is_live[i] = slot.token, slot.position, True
      remaining[i] = slot.request.params.max_tokens - len(slot.request.tokens)
      row_slots[i] = i
    arrays = self._row_arrays(row_slots, b)
    step = dict(live=is_live, rows=arrays, shape=SamplingShape.any(), span=span, protect=True)
    try:
      lp = None
      if self.speculator is None:
        nxt, stopped = self.runner.decode(tokens, positions=positions, **step)
        emitted = np.asarray(nxt)[:, None]
        accepted, done = None, np.asarray(stopped)
        lp = self._step_logprobs(live)
      else:
        draft, q = self.runner.draft(**step)
        masks = self._tree_masks(row_slots, draft)
        emitted, accepted, done = self.runner.verify(draft, q, remaining=remaining, masks=masks, **step)
        emitted, accepted, done = np.asarray(emitted), np.asarray(accepted), np.asarray(done)
        lp = self._step_logprobs(live)
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
      if accepted is None:  # plain decoding: one token, or the stop id that ends the request
        slot.position += 1
        slot.token = int(emitted[i, 0])
        self._deliver(i, slot.token, bool(done[i]), now, self._logprob(i, lp, i))
        continue
      request = slot.request
      request.forwards += 1
      request.accepted += int(accepted[i])
      self.totals.draft_tokens += self.runner.lookahead
      self.totals.accepted_tokens += int(accepted[i])
      new = [int(t) for t in emitted[i] if t >= 0]
      slot.position += int(accepted[i]) + 1
      for k, token in enumerate(new):
        self._deliver(i, token, False, now, self._logprob(i, lp, (i, k)))
        if self._slots[i] is None:  # its max_tokens reached (or its grammar is complete)
          break
      if self._slots[i] is not None and done[i]:
        self._release(i, "stop")
