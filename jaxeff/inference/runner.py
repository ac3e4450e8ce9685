"""The model runner: one model's weights, mesh, KV cache and compiled programs, under every driver.

>>> import numpy as np
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.inference import ModelRunner, RowSettings, row_arrays
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> runner = ModelRunner(Llama(cfg, rngs=nnx.Rngs(0)), max_batch=2, max_seq_len=32)
>>> rows = row_arrays([RowSettings(), RowSettings()])             # greedy, seed 0, no stop ids
>>> tokens = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], np.int32)    # right-padded prompts
>>> first, stopped = runner.prefill(tokens, starts=np.zeros(2, np.int32), lengths=np.array([3, 2], np.int32), rows=rows)
>>> nxt, stopped = runner.decode(first, positions=np.array([3, 2], np.int32), rows=rows)
>>> np.asarray(nxt).shape
(2,)

The drivers (`jaxeff.generate.Generator`: static batches; `jaxeff.serve.Engine`: continuous
batching; the speculative loop inside both) own no model program: they choose rows, chunks and
buckets and call these, each compiled once per shape (rows, chunk, attention span, sampling
shape), with every per-row setting an array so new values never recompile (`traces` counts
compilations):

- `prefill(tokens [n, C], starts, lengths, ...)`: a chunk of n rows' prompts at their positions
  starts..; a row whose prompt ends in the chunk samples its first token. A row starting at 0 is
  emptied first (a new request). Prompts longer than the policy's `max_chunk` come in chunks.
- `decode(tokens [n], positions [n], ...)`: one token per row at its own position.
- `decode_loop(...)`: up to N decode steps on the device (`lax.while_loop`), stopping early.
- `draft(...)` / `verify(...)`: one step of speculative decoding (the speculator's draft, then one
  target forward over its token tree, the verification rule, the accepted path moved into place).

A step may run on a window of the cache (`row0` and n rows, and for the dense cache only the first
`span` positions: a step then costs what its live rows need); `live` rows are the ones it is for,
and with `protect=True` no other row's state changes (continuous batching has rows mid-prefill
beside the decoding ones).

Exactness: a row's computation never reads another row; its sampling key is its seed folded with
the position being sampled; so a request gets the same tokens alone or among others, greedy or
seeded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.inference import logits as logits_lib
from jaxeff.inference.cache import Dense, PackedLayout, RaggedLayout, TreeSlots
from jaxeff.inference.logits import Penalties
from jaxeff.inference.sampling import SamplingParams, SamplingShape, filtered_logits, row_values, sample, sample_scored
from jaxeff.inference.speculation import DraftContext
from jaxeff.inference.verify import accept_greedy, accept_sampled, accept_typical
from jaxeff.models.attention import index_positions
from jaxeff.sharding import BATCH, EMBED, SEQ, constrain

MAX_STOP_TOKENS = 16  # stop ids per row travel as a fixed-size array, so their number never recompiles


def pow2_at_least(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class RowSettings:
  """One row's request settings: sampling, PRNG seed, stop ids; with a runner that keeps token
  state (`token_state=True`), its logits processing (`jaxeff.inference.logits.Penalties`) and
  whether it wants the logprobs of what it samples."""

  sampling: SamplingParams = SamplingParams()
  seed: int = 0
  stop_tokens: tuple[int, ...] = ()
  penalties: Penalties | None = None
  logprobs: bool = False

  def __post_init__(self):
    if len(self.stop_tokens) > MAX_STOP_TOKENS:
      raise GenerationError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(self.stop_tokens)}")
    if not 0 <= int(self.seed) < 2**32:
      raise GenerationError(f"seed must be in [0, 2**32), got {self.seed}")


class RowExtras(NamedTuple):
  """Per-row arrays of logits processing and logprobs (a runner with token state)."""

  penalties: dict  # [n] each (`jaxeff.inference.logits.row_values`)
  logprobs: np.ndarray  # [n] bool: the row wants the logprobs of its token
  masks: np.ndarray  # [n, W] int32 grammar bitmasks, all bits set where unconstrained


class RowArrays(NamedTuple):
  """Per-row step arguments: what `row_arrays` makes of `RowSettings`."""

  seeds: np.ndarray  # [n] uint32
  values: dict  # sampling values, [n] each (`jaxeff.inference.sampling.row_values`)
  stops: np.ndarray  # [n, MAX_STOP_TOKENS] int32, -1 pads
  extras: RowExtras | None = None


def row_arrays(settings: list[RowSettings | None], *, mask_words: int | None = None) -> RowArrays:
  """Arrays for a step over len(settings) rows (None: an unused row, greedy, no stop ids). With
  `mask_words` (a runner with token state: `ModelRunner.mask_words`) the rows' processing and
  logprobs too, grammar masks all ones (the caller writes a constrained row's)."""
  n = len(settings)
  seeds = np.zeros(n, np.uint32)
  stops = np.full((n, MAX_STOP_TOKENS), -1, np.int32)
  for i, s in enumerate(settings):
    if s is not None:
      seeds[i] = s.seed
      stops[i, : len(s.stop_tokens)] = s.stop_tokens
  extras = None
  if mask_words is not None:
    extras = RowExtras(
      logits_lib.row_values([None if s is None else s.penalties for s in settings]),
      np.array([s is not None and s.logprobs for s in settings], bool),
      np.full((n, mask_words), -1, np.int32),
    )
  return RowArrays(seeds, row_values([None if s is None else s.sampling for s in settings]), stops, extras)


def shape_of(settings: list[RowSettings | None]) -> SamplingShape:
  """The smallest program shape serving these rows (greedy when none samples)."""
  shapes = [s.sampling.static for s in settings if s is not None and not s.sampling.greedy]
  if not shapes:
    return SamplingShape()
  return SamplingShape(False, *(any(getattr(x, f) for x in shapes) for f in ("top_k", "top_p", "min_p")))


class SpecRows(NamedTuple):
  """Per-row state of speculative decoding (device arrays, rows on axis 0)."""

  history: jax.Array  # [B, T] int32: each row's tokens by position (prompt, then accepted)
  pos: jax.Array  # [B] int32: the root's position (the newest token, not yet in the cache)
  hidden: jax.Array  # [B, H]: the target's final hidden state that produced the root


def mesh_of(state) -> jax.sharding.Mesh | None:
  """The mesh `state`'s arrays are sharded over (None on one device)."""
  placement = getattr(jax.tree.leaves(state)[0], "sharding", None)
  if isinstance(placement, jax.sharding.NamedSharding) and placement.mesh.size > 1:
    return placement.mesh
  return None


def _keys(seeds, positions):
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def _is_stop(tokens, stops):
  """tokens [n] or [n, k] against each row's stop ids [n, MAX_STOP_TOKENS]: bool like tokens."""
  return jnp.any(tokens[..., None] == stops.reshape(stops.shape[0], *([1] * (tokens.ndim - 1)), -1), axis=-1)


def _take_rows(tree, row0, n):
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, row0, n, axis=0), tree)


def _put_rows(tree, part, row0):
  def put(full, piece):
    start = [0] * full.ndim
    start[0] = row0
    return jax.lax.dynamic_update_slice(full, piece.astype(full.dtype), start)

  return jax.tree.map(put, tree, part)


def _step_tables(cache, seq_rows):
  """A ragged step's block tables: the cache row of each step row (-1: padding, no blocks)."""
  (tables,) = cache.rows
  return jnp.where(seq_rows[:, None] >= 0, tables[jnp.maximum(seq_rows, 0)], -1)


def _where_rows(mask, new, old):
  return jax.tree.map(lambda a, b: jnp.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b), new, old)


class ModelRunner:
  """A model's graph and weights, one KV cache of `max_batch` rows, and the compiled programs.

  Args:
    model: a `jaxeff.models.Llama` (float, bf16, `jaxeff.quantize`d, or a GGUF as stored); its
      weights are used as they are (shared, not copied; `use_weights` swaps them).
    max_batch: rows of the cache.
    max_seq_len: positions per row (what the policy makes of them: `kv_cache.room`).
    kv_cache: the cache policy (`jaxeff.inference.cache`; default `Dense()`).
    speculator: a `jaxeff.generate.speculative` speculator; then the runner also keeps each row's
      history and the speculator's own state, and `draft`/`verify` run.
    mesh: optional device mesh: weights placed by their logical axes, the cache created in its
      sharding (rows over data/fsdp, kv heads over tensor).
    token_state: keep each row's token counts on the device (`jaxeff.inference.logits`), so steps
      take per-row penalties, logit bias, min_tokens, grammar masks and return logprobs (`scores`):
      pass `row_arrays(..., mask_words=runner.mask_words)` then.
  """

  def __init__(
    self, model, *, max_batch: int, max_seq_len: int, kv_cache=None, speculator=None, mesh=None, token_state=False
  ):
    if max_batch < 1 or max_seq_len < 2:
      raise GenerationError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, {max_seq_len}")
    self.cfg = model.cfg
    self._graphdef, state = nnx.split(model)
    if mesh is None:
      mesh = mesh_of(state)  # a model placed on a mesh runs there
    self.max_batch, self.max_seq_len, self.mesh = max_batch, max_seq_len, mesh
    self.policy = Dense() if kv_cache is None else kv_cache
    self.policy.check_model(self.cfg)
    if speculator is not None and not self.policy.exact_rollback:
      raise GenerationError(
        f"speculative decoding needs a cache that can take back rejected tokens (dense), not {self.policy.name}: "
        "drop the speculator or the cache policy"
      )
    self.use_weights(state)
    self.traces: collections.Counter = collections.Counter()  # compilations per program and shape
    with self.on_mesh():
      self._cache = self._committed(jax.jit(lambda: self.policy.init(self.cfg, max_batch, max_seq_len))())
    self._tstate = None
    if token_state:
      with self.on_mesh():
        self._tstate = self._committed(jax.jit(lambda: logits_lib.init_state(max_batch, self.cfg.vocab_size))())
    self.scores: tuple | None = None  # (sampled tokens' Logprobs, scored prompt tokens' Logprobs) of the last step
    self.speculator = speculator
    self._spec_params = self._spec_cache = self._spec_rows = None
    if speculator is not None:
      speculator.bind(self.model(), max_batch=max_batch, max_seq_len=max_seq_len, mesh=mesh)
      self._spec_params = speculator.params()
      with self.on_mesh():
        self._spec_cache = speculator.init_cache()
        make = lambda: SpecRows(
          constrain(jnp.zeros((max_batch, max_seq_len), jnp.int32), (BATCH, SEQ)),
          constrain(jnp.zeros((max_batch,), jnp.int32), (BATCH,)),
          constrain(jnp.zeros((max_batch, self.cfg.hidden_size), jnp.dtype(self.cfg.dtype)), (BATCH, EMBED)),
        )
        self._spec_rows = self._committed(jax.jit(make)())
    donate = ("cache", "spec_cache", "spec_rows", "tstate")
    self._prefill = jax.jit(self._prefill_fn, donate_argnames=donate, static_argnames=("shape", "span"))
    self._decode = jax.jit(
      self._decode_fn, donate_argnames=("cache", "tstate"), static_argnames=("shape", "span", "protect")
    )
    self._decode_loop = jax.jit(self._decode_loop_fn, donate_argnames="cache", static_argnames=("shape", "out_len"))
    self._draft = jax.jit(self._draft_fn, donate_argnames=donate[:3], static_argnames=("shape", "span", "protect"))
    self._verify = jax.jit(
      self._verify_fn,
      donate_argnames=("cache", "spec_rows", "tstate"),
      static_argnames=("shape", "span", "protect", "rule"),
    )
    self._set_tables = jax.jit(lambda cache, tables: self.policy.with_tables(cache, tables), donate_argnums=0)
    self._copy_blocks = jax.jit(lambda cache, src, dst: self.policy.copy_blocks(cache, src, dst), donate_argnums=0)
    self._step = jax.jit(
      self._step_fn, donate_argnames=("cache", "tstate"), static_argnames=("shape", "layout", "span")
    )
    self._packed = jax.jit(
      self._packed_fn, donate_argnames=("cache", "tstate"), static_argnames=("shape", "max_prefills")
    )
    self._reset_tokens = jax.jit(logits_lib.reset_row, donate_argnums=0)

  # ------------------------------------------------------------------ state

  def use_weights(self, state) -> None:
    """Serves these weights from now on: an `nnx.state` of a model with this runner's graph and
    the same shapes and dtypes (e.g. after more training); nothing recompiles."""
    if self.mesh is not None:
      state = jax.device_put(state, sharding.state_shardings(state, self.mesh))
    self._state = state

  def model(self):
    """The model (graph merged with the served weights)."""
    return nnx.merge(self._graphdef, self._state)

  def on_mesh(self):
    """A context that makes this runner's mesh the current one (a no-op without a mesh)."""
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _committed(self, tree):
    # Committed like the donated buffers that come back, so the second call reuses the first's program.
    if self.mesh is not None:
      return tree
    return jax.device_put(tree, jax.tree.leaves(self._state)[0].sharding)

  def committed(self, x):
    """`x` placed as the programs' outputs are (a driver feeding outputs back passes its first
    inputs through this, so the second call reuses the first call's program)."""
    return self._committed(x)

  @property
  def cache(self):
    """The KV cache's current state (a `jaxeff.inference.cache.Cache`; donated to each program, so
    read it between calls, not across them)."""
    return self._cache

  def set_tables(self, tables) -> None:
    """Block tables [max_batch, blocks per row] for a paged cache (`jaxeff.inference.blocks`
    decides them; -1: no block): every later program reads rows' blocks through them."""
    if not self.policy.ragged:
      raise GenerationError(f"block tables are for the paged cache, not {self.policy.name}")
    with self.on_mesh():
      self._cache = self._set_tables(self._cache, np.asarray(tables, np.int32))

  def copy_blocks(self, src, dst) -> None:
    """Blocks `src` copied to blocks `dst` in every layer (a paged cache's copy-on-write)."""
    with self.on_mesh():
      self._cache = self._copy_blocks(self._cache, np.asarray(src, np.int32), np.asarray(dst, np.int32))

  @property
  def mask_words(self) -> int | None:
    """Width of a grammar bitmask row (int32 words over the model's vocab) with token state, else None."""
    return None if self._tstate is None else -(-self.cfg.vocab_size // 32)

  def reset_tokens(self, row: int, context, generated: int = 0, penalties: Penalties | None = None) -> None:
    """Token state of cache row `row` for a request: its `context` (prompt, then the `generated`
    tokens it has already sent, after a preemption) and its logit bias."""
    if self._tstate is None:
      return
    tokens = np.full(self.max_seq_len, -1, np.int32)
    context = np.asarray(context, np.int32)[: self.max_seq_len]
    tokens[: context.size] = context
    outputs = np.arange(self.max_seq_len) >= context.size - generated
    bias_ids = np.full(logits_lib.MAX_LOGIT_BIAS, -1, np.int32)
    bias_values = np.zeros(logits_lib.MAX_LOGIT_BIAS, np.float32)
    for k, (t, b) in enumerate(() if penalties is None else penalties.logit_bias):
      bias_ids[k], bias_values[k] = t, b
    with self.on_mesh():
      self._tstate = self._reset_tokens(self._tstate, np.int32(row), tokens, outputs, bias_ids, bias_values)

  @property
  def token_state(self):
    """The device token state (`jaxeff.inference.logits.TokenState`; None without)."""
    return self._tstate

  def _pick(self, logits, keys, shape, rows, tstate, state_rows):
    """Each row's next token (and its Logprobs, with token state) from its logits [S, V]."""
    if rows.extras is None:
      return sample(logits, keys, shape, rows.values), None
    x = logits_lib.process(logits, tstate, state_rows, rows.extras.penalties, rows.stops, rows.extras.masks)
    return sample_scored(x, keys, shape, rows.values, rows.extras.logprobs)

  @staticmethod
  def _score(model, x, score):
    """Logprobs of tokens `score` [...] (-1: none) under the model's logits at hidden states x
    [..., H] (the prompt tokens' own: raw, nothing sampled there); only when some are asked for."""
    if score is None:
      return None
    flat_x, flat = x.reshape(-1, x.shape[-1]), score.reshape(-1)
    vocab = model.cfg.vocab_size
    out = jax.lax.cond(
      jnp.any(flat >= 0),
      lambda: logits_lib.logprobs_of(model.logits(flat_x), flat),
      lambda: logits_lib.empty_logprobs(flat.shape, vocab),
    )
    return jax.tree.map(lambda a: a.reshape(*score.shape, *a.shape[1:]), out)

  @property
  def cache_bytes(self) -> int:
    """Bytes of the KV cache (and the speculator's own state)."""
    trees = (self._cache, self._spec_cache, self._spec_rows)
    return sum(x.nbytes for t in trees if t is not None for x in jax.tree.leaves(t))

  @property
  def weight_bytes(self) -> int:
    """Bytes of the served weights (quantized ones as stored): what a decode step reads at least once."""
    return sum(x.nbytes for x in jax.tree.leaves(self._state) if hasattr(x, "nbytes"))

  @property
  def lookahead(self) -> int:
    """Cache positions past a row's newest token that a speculation step writes (0 without one)."""
    return 0 if self.speculator is None else self.speculator.tree.size - 1

  def room(self, prompt: int) -> int | None:
    """New tokens that fit after a prompt of `prompt` tokens (None: any number)."""
    room = self.policy.room(self.cfg, self.max_seq_len, prompt)
    return None if room is None else room - self.lookahead

  def max_chunk(self) -> int:
    """Most prompt tokens one prefill call may take."""
    return self.policy.max_chunk(self.max_seq_len)

  def span_for(self, positions: int, min_span: int = 1) -> int | None:
    """The attention span (a power of two >= min_span, capped at max_seq_len) a step over
    positions below `positions` runs with; None where the policy has no spans (whole cache)."""
    if not self.policy.spans:
      return None
    return min(self.max_seq_len, max(min_span, pow2_at_least(positions)))

  # ------------------------------------------------------------------ windows

  def _windows(self, row0, n, span):
    """None when a step over rows row0..row0+n-1 and `span` covers the whole cache, else where."""
    if n == self.max_batch and (span is None or span >= self.max_seq_len):
      return None
    return (row0, n, span)

  @staticmethod
  def _open(cache, where):
    return cache if where is None or cache is None else cache.policy.take_window(cache, *where)

  @staticmethod
  def _close(cache, part, where):
    return part if where is None or cache is None else cache.policy.put_window(cache, part, where[0])

  # ------------------------------------------------------------------ programs (traced)

  def _prefill_fn(
    self,
    state,
    cache,
    spec_params,
    spec_cache,
    spec_rows,
    tstate,
    tokens,
    starts,
    lengths,
    first,
    rows,
    row0,
    score,
    *,
    shape,
    span,
  ):
    n, c = tokens.shape
    self.traces["prefill", n, c, span, shape] += 1
    model = nnx.merge(self._graphdef, state)
    where = self._windows(row0, n, span)
    window = self._open(cache, where)
    window = self.policy.reset_rows(window, starts == 0)  # a new request forgets the previous one
    positions = starts[:, None] + index_positions(n, c)
    if not self.policy.pads_to_end:
      positions = jnp.where(positions < lengths[:, None], positions, -1)  # padding: not kept
    x, window = model.forward_with_cache(tokens, positions, window)
    cache = self._close(cache, window, where)
    offset = jnp.clip(lengths - 1 - starts, 0, c - 1)
    last = jnp.take_along_axis(x, offset[:, None, None], axis=1)[:, 0]
    here = (lengths - 1 >= starts) & (lengths - 1 < starts + c)  # the prompt ends in this chunk
    state_rows = jnp.where(here, row0 + jnp.arange(n), -1)
    sampled, lp = self._pick(model.logits(last), _keys(rows.seeds, lengths), shape, rows, tstate, state_rows)
    if tstate is not None:
      tstate = logits_lib.record(tstate, state_rows, sampled, here)
    first = jnp.where(here, sampled, first)
    if self.speculator is not None:
      spec_window = self._open(spec_cache, where)
      spec_window = self.speculator.prefill(spec_params, spec_window, tokens, positions)
      spec_cache = self._close(spec_cache, spec_window, where)
      own = _take_rows(spec_rows, row0, n)
      t = own.history.shape[1]
      at = jnp.where((positions >= 0) & (positions < lengths[:, None]), positions, t)  # padding dropped
      history = own.history.at[jnp.arange(n)[:, None], at].set(tokens, mode="drop")
      history = history.at[jnp.arange(n), jnp.where(here, lengths, t)].set(first, mode="drop")
      own = SpecRows(
        history,
        jnp.where(here, lengths, own.pos),
        jnp.where(here[:, None], last.astype(own.hidden.dtype), own.hidden),
      )
      spec_rows = _put_rows(spec_rows, own, row0)
    scores = (lp, self._score(model, x, score))
    return first, _is_stop(first, rows.stops), cache, spec_cache, spec_rows, tstate, scores

  def _decode_fn(self, state, cache, tstate, tokens, positions, live, rows, row0, *, shape, span, protect):
    n = tokens.shape[0]
    self.traces["decode", n, span, shape] += 1
    model = nnx.merge(self._graphdef, state)
    where = self._windows(row0, n, span)
    window = self._open(cache, where)
    positions_in = positions
    if protect and not self.policy.pads_to_end:
      positions_in = jnp.where(live, positions, -1)  # idle rows: padding, which these policies never keep
    elif protect and where is None:
      # The whole cache: idle rows write only the last position, which a request's own decode
      # overwrites before reading it (no prompt reaches it: every request takes >= 1 new token).
      positions_in = jnp.where(live, positions, self.max_seq_len - 1)
    elif protect:
      positions_in = jnp.where(live, positions, span - 1)  # inside the window; not written back
    x, new = model.forward_with_cache(tokens[:, None], positions_in[:, None], window)
    if protect and self.policy.pads_to_end and where is not None:
      new = self.policy.keep_rows(new, live, window)  # idle rows of the window are written back unchanged
    cache = self._close(cache, new, where)
    state_rows = jnp.where(live, row0 + jnp.arange(n), -1)
    keys = _keys(rows.seeds, positions + 1)
    nxt, lp = self._pick(model.logits(x[:, 0]), keys, shape, rows, tstate, state_rows)
    if tstate is not None:
      tstate = logits_lib.record(tstate, state_rows, nxt, live)
    return nxt, _is_stop(nxt, rows.stops), cache, tstate, (lp, None)

  def _decode_loop_fn(self, state, cache, first, positions, done, rows, num_tokens, *, shape, out_len):
    """Up to `num_tokens` tokens per row on the device: [B, out_len] ids, -1 after a row stops."""
    self.traces["decode_loop", shape] += 1
    out = jnp.full((first.shape[0], out_len), -1, jnp.int32)

    def record(out, t, tok, done):
      stopped = done | _is_stop(tok, rows.stops)
      return jax.lax.dynamic_update_slice(out, jnp.where(stopped, -1, tok)[:, None], (0, t)), stopped

    out, done = record(out, 0, first, done)

    # The weights ride in the carry (unchanged): nnx modules must live at the loop body's trace
    # level for the nnx.scan over layers inside.
    def cond(carry):
      _, _, _, _, t, done, _ = carry
      return (t < num_tokens) & ~jnp.all(done)

    def body(carry):
      state, cache, tok, pos, t, done, out = carry
      model = nnx.merge(self._graphdef, state)
      x, cache = model.forward_with_cache(tok[:, None], pos[:, None], cache)
      tok = sample(model.logits(x[:, 0]), _keys(rows.seeds, pos + 1), shape, rows.values)
      out, done = record(out, t, tok, done)
      return state, cache, tok, pos + 1, t + 1, done, out

    init = (state, cache, first, positions, jnp.int32(1), done, out)
    _, cache, _, _, steps, _, out = jax.lax.while_loop(cond, body, init)
    return out, steps - 1, cache

  def _step_fn(self, state, cache, tstate, tokens, positions, seq_rows, lengths, rows, score, *, shape, layout, span):
    """A ragged step (paged cache): `layout.decode` rows decoding one token each, then
    `layout.prefill` rows prefilling a chunk of `layout.chunk`, packed into one row of tokens."""
    self.traces["step", layout, span, shape] += 1
    model = nnx.merge(self._graphdef, state)
    tables = _step_tables(cache, seq_rows)
    if span is not None:
      tables = tables[:, : self.policy.blocks_per_row(span)]
    window = cache.replace(rows=(tables,))
    x, new = model.forward_with_cache(tokens[None], positions[None], window, layout=layout)
    cache = cache.replace(layers=new.layers)
    x = x[0]
    nd, c = layout.decode, layout.chunk
    # Each row's last token: a decode row's only one; a prefill row's last real one (its logits
    # sample the first new token when the prompt ends in this chunk).
    last_prefill = jnp.max(positions[nd:].reshape(layout.prefill, c), axis=1) if layout.prefill else None
    index = jnp.arange(nd, dtype=jnp.int32)
    sample_at = positions[:nd] + 1
    if layout.prefill:
      count = jnp.sum(positions[nd:].reshape(layout.prefill, c) >= 0, axis=1)
      index = jnp.concatenate([index, nd + jnp.arange(layout.prefill, dtype=jnp.int32) * c + jnp.maximum(count - 1, 0)])
      sample_at = jnp.concatenate([sample_at, last_prefill + 1])
    last = x[index]
    ends = sample_at == lengths  # a decode row always; a prefill row when its prompt ends here
    nxt, lp = self._pick(model.logits(last), _keys(rows.seeds, sample_at), shape, rows, tstate, seq_rows)
    if tstate is not None:
      tstate = logits_lib.record(tstate, seq_rows, nxt, ends)
    scores = (lp, self._score(model, x, score))
    return jnp.where(ends, nxt, -1), _is_stop(nxt, rows.stops) & ends, cache, tstate, scores

  def _packed_fn(
    self, state, cache, tstate, tokens, positions, seq_rows, cu_q_lens, lengths, rows, score, *, shape, max_prefills
  ):
    """A packed step (paged cache, the ragged op): S sequences' new tokens back to back in one row
    of T tokens; one program per (T, S, sampling shape, max_prefills), whatever the mix."""
    self.traces["packed", tokens.shape[0], seq_rows.shape[0], shape] += 1
    model = nnx.merge(self._graphdef, state)
    tables = _step_tables(cache, seq_rows)
    layout = PackedLayout(cu_q_lens, max_prefills)
    x, new = model.forward_with_cache(tokens[None], positions[None], cache.replace(rows=(tables,)), layout=layout)
    cache = cache.replace(layers=new.layers)
    t = tokens.shape[0]
    last = jnp.clip(cu_q_lens[1:] - 1, 0, t - 1)  # each sequence's last new token samples
    sample_at = positions[last] + 1
    # A decode row samples always; a prompt's chunk when the prompt ends in it.
    ends = (cu_q_lens[1:] > cu_q_lens[:-1]) & (sample_at == lengths)
    nxt, lp = self._pick(model.logits(x[0, last]), _keys(rows.seeds, sample_at), shape, rows, tstate, seq_rows)
    if tstate is not None:
      tstate = logits_lib.record(tstate, seq_rows, nxt, ends)
    scores = (lp, self._score(model, x[0], score))
    return jnp.where(ends, nxt, -1), _is_stop(nxt, rows.stops) & ends, cache, tstate, scores

  def _draft_fn(self, state, cache, spec_params, spec_cache, spec_rows, live, rows, row0, *, shape, span, protect):
    n = live.shape[0]
    self.traces["draft", n, span, shape] += 1
    where = self._windows(row0, n, span)
    window, spec_window = self._open(cache, where), self._open(spec_cache, where)
    own = _take_rows(spec_rows, row0, n)
    last = jnp.take_along_axis(own.history, own.pos[:, None], axis=1)[:, 0]
    ctx = DraftContext(own.history, own.pos, last, own.hidden, _keys(rows.seeds, own.pos))
    model = nnx.merge(self._graphdef, state)
    seen = self.policy.shield(window, live) if protect else window
    tokens, q, new, new_spec = self.speculator.draft(model, seen, spec_params, spec_window, ctx, shape, rows.values)
    if protect:  # idle rows (mid-prefill, free) keep their state
      new = self.policy.keep_rows(new, live, window)
      if new_spec is not None:
        new_spec = new_spec.policy.keep_rows(new_spec, live, spec_window)
    cache, spec_cache = self._close(cache, new, where), self._close(spec_cache, new_spec, where)
    return tokens.astype(jnp.int32), q, cache, spec_cache, spec_rows

  def _verify_fn(
    self,
    state,
    cache,
    spec_rows,
    tstate,
    draft_tokens,
    q,
    live,
    remaining,
    rows,
    row0,
    masks,
    *,
    shape,
    span,
    protect,
    rule,
  ):
    tree = self.speculator.tree
    n = live.shape[0]
    self.traces["verify", n, span, shape, rule] += 1
    where = self._windows(row0, n, span)
    window = self._open(cache, where)
    own = _take_rows(spec_rows, row0, n)
    ids = jnp.arange(n)
    model = nnx.merge(self._graphdef, state)
    root = own.history[ids, own.pos]
    tokens = jnp.concatenate([root[:, None], draft_tokens], axis=1)  # [n, N]
    depth = jnp.asarray(np.asarray(tree.depth), jnp.int32)
    positions = own.pos[:, None] + depth[None]
    is_chain = tree.max_depth == tree.size - 1
    slots = None if is_chain else TreeSlots(own.pos, jnp.asarray(np.asarray(tree.ancestors)))
    seen = self.policy.shield(window, live) if protect else window
    x, new = model.forward_with_cache(tokens, positions, seen, tree=slots)
    logits = model.logits(x)  # [n, N, V]
    if rows.extras is not None:  # each node's logits processed as if its path had been generated
      logits = self._process_tree(logits, tokens, rows, tstate, jnp.where(live, row0 + ids, -1), masks)
    final, bonus = accept_greedy(logits, tokens, tree)
    if not shape.greedy:
      sampled = rows.values["temperature"] > 0

      def sampled_rule():
        key = _keys(rows.seeds, own.pos)
        filtered = jax.vmap(lambda lg: filtered_logits(lg, shape, rows.values), in_axes=1, out_axes=1)(logits)
        if rule == "typical":
          final_s, bonus_s = accept_typical(filtered, tokens, tree, key)
        else:
          q_all = None if q is None else jnp.concatenate([jnp.zeros_like(q[:, :1]), q], axis=1)
          final_s, bonus_s = accept_sampled(filtered, tokens, tree, key, q_all)
        return jnp.where(sampled, final_s, final), jnp.where(sampled, bonus_s, bonus)

      # Rows at temperature 0 keep the greedy rule; when none samples, the filters never run.
      final, bonus = jax.lax.cond(jnp.any(sampled), sampled_rule, lambda: (final, bonus))
    accepted = depth[final]  # draft tokens accepted per row
    path = jnp.asarray(np.asarray(tree.paths))[final]  # [n, D+1] node ids, -1 after the final node
    if not is_chain:  # the accepted path's keys/values into consecutive slots after the root
      src = own.pos[:, None] + jnp.where(path[:, 1:] >= 0, path[:, 1:], jnp.arange(1, tree.max_depth + 1)[None])
      new = self.policy.move(new, src, own.pos + 1)
    if protect:
      new = self.policy.keep_rows(new, live, window)
    cache = self._close(cache, new, where)
    d = tree.max_depth
    path_tokens = jnp.take_along_axis(tokens, jnp.maximum(path[:, 1:], 0), axis=1)  # [n, D]
    j = jnp.arange(d + 1)[None]
    gained = accepted + 1
    proposed = jnp.where(j < accepted[:, None], jnp.pad(path_tokens, ((0, 0), (0, 1))), bonus[:, None])
    is_stop = _is_stop(proposed, rows.stops) & (j < gained[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, d + 1), axis=1)
    keep = jnp.minimum(jnp.minimum(first_stop, gained), remaining)
    keep = jnp.where(live, keep, 0)
    done = live & ((first_stop < gained) | (keep >= remaining))
    emitted = jnp.where(j < keep[:, None], proposed, -1)
    scores = (None, None)
    if rows.extras is not None:
      # Each emitted token's logprob under its node's distribution (the node on the path before it).
      nodes = jnp.maximum(path, 0)  # [n, D+1]: path[:, j] predicted emitted token j
      node_logits = logits[ids[:, None], nodes]
      tiled = jax.tree.map(lambda v: jnp.repeat(v, d + 1, axis=0), rows.values)

      def score():
        f = filtered_logits(node_logits.reshape(n * (d + 1), -1), shape, tiled)
        return logits_lib.logprobs_of(f, jnp.maximum(proposed, 0).reshape(-1))

      vocab = logits.shape[-1]
      lp = jax.lax.cond(jnp.any(rows.extras.logprobs), score, lambda: logits_lib.empty_logprobs((n * (d + 1),), vocab))
      scores = (jax.tree.map(lambda a: a.reshape(n, d + 1, *a.shape[1:]), lp), None)
      if tstate is not None:
        take = (j < keep[:, None]) & live[:, None]
        tstate = logits_lib.record(tstate, jnp.repeat(row0 + ids, d + 1), proposed.reshape(-1), take.reshape(-1))
    # History: the accepted tokens and the bonus after the root; the slots after them keep theirs.
    t = own.history.shape[1]
    at = own.pos[:, None] + 1 + j
    at = jnp.where(live[:, None] & (j < gained[:, None]) & (at < t), at, t)
    history = own.history.at[ids[:, None], at].set(proposed, mode="drop")
    own = SpecRows(
      history,
      jnp.where(live, own.pos + gained, own.pos),
      jnp.where(live[:, None], x[ids, final].astype(own.hidden.dtype), own.hidden),
    )
    spec_rows = _put_rows(spec_rows, own, row0)
    return emitted, jnp.where(live, accepted, -1), done, cache, spec_rows, tstate, scores

  def _process_tree(self, logits, tokens, rows, tstate, state_rows, masks):
    """Speculation's logits [n, N, V], each node's processed as a step after its path from the
    root would be: penalties count the path's draft tokens, `masks` [n, N, W] are the grammar's
    masks after them."""
    tree = self.speculator.tree
    n, size, vocab = logits.shape
    # (node, ancestor) pairs: each draft token on the path to a node, itself included, root excluded.
    anc = np.asarray(tree.ancestors, bool).copy()
    anc[:, 0] = False
    nodes, above = np.nonzero(anc)

    def path_counts():
      counts = jnp.zeros((n, size, vocab), jnp.int32)
      counts = counts.at[:, nodes, tokens[:, above]].add(1) if nodes.size else counts
      return counts.reshape(n * size, vocab)

    tiled = lambda a: jnp.repeat(a, size, axis=0)
    out = logits_lib.process(
      logits.reshape(n * size, vocab),
      tstate,
      tiled(state_rows),
      jax.tree.map(tiled, rows.extras.penalties),
      tiled(rows.stops),
      None if masks is None else masks.reshape(n * size, -1),
      more_counts=path_counts,
    )
    return out.reshape(n, size, vocab)

  # ------------------------------------------------------------------ calls (host side)

  def prefill(
    self, tokens, *, starts, lengths, rows: RowArrays, first=None, row0: int = 0, shape=None, span=None, score=None
  ):
    """A prompt chunk for rows row0..row0+n-1: `tokens` [n, C] at positions starts[i].. (right-
    padded; `lengths` [n] the prompts' full lengths). Returns (first tokens [n], whether each is a
    stop id [n]) as device arrays: a row's first new token where its prompt ends in this chunk,
    else `first` (its earlier value). `score` [n, C]: token ids whose logprobs to compute at
    each position (the next prompt token; -1: none), in `scores` beside the sampled tokens' (rows
    with token state)."""
    n, c = np.shape(tokens)
    if first is None:
      first = self.committed(np.zeros(n, np.int32))
    shape = SamplingShape() if shape is None else shape
    with self.on_mesh():
      first, stopped, self._cache, self._spec_cache, self._spec_rows, self._tstate, self.scores = self._prefill(
        self._state,
        self._cache,
        self._spec_params,
        self._spec_cache,
        self._spec_rows,
        self._tstate,
        np.asarray(tokens, np.int32),
        np.asarray(starts, np.int32),
        np.asarray(lengths, np.int32),
        first,
        rows,
        np.int32(row0),
        None if score is None else np.asarray(score, np.int32),
        shape=shape,
        span=span,
      )
    return first, stopped

  def decode(
    self, tokens, *, positions, rows: RowArrays, live=None, row0: int = 0, shape=None, span=None, protect=False
  ):
    """One token for each of rows row0..row0+n-1 at its own position: (next tokens [n], whether
    each is a stop id [n]). With `protect`, rows not `live` keep their cache state."""
    n = np.shape(tokens)[0]
    live = np.ones(n, bool) if live is None else live
    with self.on_mesh():
      nxt, stopped, self._cache, self._tstate, self.scores = self._decode(
        self._state,
        self._cache,
        self._tstate,
        tokens,
        positions,
        np.asarray(live, bool),
        rows,
        np.int32(row0),
        shape=SamplingShape() if shape is None else shape,
        span=span,
        protect=protect,
      )
    return nxt, stopped

  def decode_loop(self, first, *, positions, rows: RowArrays, num_tokens: int, done, out_len: int, shape=None):
    """Up to `num_tokens` tokens for every row on the device (the first is `first`): ([B, out_len]
    ids, -1 from a row's stop id on; decode steps run) over the whole cache."""
    with self.on_mesh():
      out, steps, self._cache = self._decode_loop(
        self._state,
        self._cache,
        first,
        positions,
        np.asarray(done, bool),
        rows,
        np.int32(num_tokens),
        shape=SamplingShape() if shape is None else shape,
        out_len=out_len,
      )
    return out, steps

  def step(
    self,
    tokens,
    *,
    positions,
    seq_rows,
    lengths,
    rows: RowArrays,
    layout: RaggedLayout,
    shape=None,
    span=None,
    score=None,
  ):
    """A ragged step over a paged cache: tokens and positions [layout.tokens] (decode rows' tokens,
    then each prefill row's chunk, right-padded with position -1); `seq_rows` [layout.rows] the
    cache row (block table) of each step row (-1: padding); `lengths` [layout.rows] the position
    each row samples at when it samples (a decode row: its position + 1; a prefill row: its prompt's
    length). Returns (tokens [rows], stop flags [rows]): -1 for rows that sampled nothing."""
    with self.on_mesh():
      nxt, stopped, self._cache, self._tstate, self.scores = self._step(
        self._state,
        self._cache,
        self._tstate,
        np.asarray(tokens, np.int32),
        np.asarray(positions, np.int32),
        np.asarray(seq_rows, np.int32),
        np.asarray(lengths, np.int32),
        rows,
        None if score is None else np.asarray(score, np.int32),
        shape=SamplingShape() if shape is None else shape,
        layout=layout,
        span=span,
      )
    return nxt, stopped

  def packed_step(
    self,
    tokens,
    *,
    positions,
    seq_rows,
    cu_q_lens,
    lengths,
    rows: RowArrays,
    shape=None,
    max_prefills=None,
    score=None,
  ):
    """A packed step over a paged cache (its ragged op): tokens and positions [T] hold S sequences'
    new tokens back to back (sequence i's at cu_q_lens[i] .. cu_q_lens[i+1]-1, consecutive positions;
    position -1 past the last); `seq_rows` [S] each sequence's cache row (block table; -1 and
    q_len 0: padding); `lengths` [S] the position each samples at when it samples (a decoding
    request: its position + 1; a prompt: its length). `max_prefills`: at most this many sequences
    have more than one token (sizes the attention's work; None: any). `score` [T]: token ids whose
    logprobs to compute at each position (-1: none; `scores`). Returns (tokens [S], stop flags [S]):
    -1 for sequences that sampled nothing."""
    cu_q_lens = np.asarray(cu_q_lens, np.int32)
    prefills = int(np.sum(np.diff(cu_q_lens) > 1))
    if max_prefills is not None and prefills > max_prefills:
      raise GenerationError(f"a packed step with {prefills} multi-token sequences, over max_prefills={max_prefills}")
    with self.on_mesh():
      nxt, stopped, self._cache, self._tstate, self.scores = self._packed(
        self._state,
        self._cache,
        self._tstate,
        np.asarray(tokens, np.int32),
        np.asarray(positions, np.int32),
        np.asarray(seq_rows, np.int32),
        cu_q_lens,
        np.asarray(lengths, np.int32),
        rows,
        None if score is None else np.asarray(score, np.int32),
        shape=SamplingShape() if shape is None else shape,
        max_prefills=max_prefills,
      )
    return nxt, stopped

  def draft(self, *, rows: RowArrays, live=None, row0: int = 0, shape=None, span=None, protect=False):
    """The speculator's draft for rows row0..: (draft tokens [n, N-1], draft distributions or None)
    as device arrays, passed on to `verify`."""
    n = rows.seeds.shape[0]
    live = np.ones(n, bool) if live is None else live
    with self.on_mesh():
      tokens, q, self._cache, self._spec_cache, self._spec_rows = self._draft(
        self._state,
        self._cache,
        self._spec_params,
        self._spec_cache,
        self._spec_rows,
        np.asarray(live, bool),
        rows,
        np.int32(row0),
        shape=SamplingShape() if shape is None else shape,
        span=span,
        protect=protect,
      )
    return tokens, q

  def verify(
    self,
    draft_tokens,
    q,
    *,
    remaining,
    rows: RowArrays,
    live=None,
    row0=0,
    shape=None,
    span=None,
    protect=False,
    masks=None,
  ):
    """One target forward over the draft tree of rows row0..: (emitted [n, D+1] token ids, -1 after
    a row's last; draft tokens accepted [n], -1 for rows not live; done [n]: a stop id or the row's
    `remaining` budget reached). Rows advance by what they accept. With token state: `masks` [n, N,
    W] each tree node's grammar mask (after its path's tokens), and `scores` the emitted tokens'
    Logprobs [n, D+1]."""
    n = rows.seeds.shape[0]
    live = np.ones(n, bool) if live is None else live
    with self.on_mesh():
      emitted, accepted, done, self._cache, self._spec_rows, self._tstate, self.scores = self._verify(
        self._state,
        self._cache,
        self._spec_rows,
        self._tstate,
        draft_tokens,
        q,
        np.asarray(live, bool),
        np.asarray(remaining, np.int32),
        rows,
        np.int32(row0),
        None if masks is None else np.asarray(masks, np.int32),
        shape=SamplingShape() if shape is None else shape,
        span=span,
        protect=protect,
        rule=self.speculator.rule,
      )
    return emitted, accepted, done
