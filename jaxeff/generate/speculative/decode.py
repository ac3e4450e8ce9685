"""The speculative decode loop behind `Generator(speculator=...)`: prefill, then draft + verify.

Three compiled programs, each traced once per batch/sampling shape:
- prefill: the prompts through the target (and the speculator's own cache), the first token
  sampled exactly as plain decoding samples it, and the step state (`SpecState`).
- draft: the speculator fills its static tree (`Speculator.draft`).
- verify: one target forward over the tree's nodes (a chain: consecutive positions; a tree:
  consecutive slots with a tree mask, `kv_cache.TreeSlots`), the verification rule
  (`verify.py`), the accepted path's keys/values moved into place (trees only), stop tokens and
  the token budget applied, the state advanced. A row accepts what it accepts: rows of a batch
  advance by different counts. Rejected slots are simply overwritten later (positions are not
  advanced past them), so shapes never change.

The host loop dispatches draft then verify and reads each step's tokens (it must, to stream them
and to stop); it waits for the draft before dispatching the verification only to time it (the
draft's share of the step). Greedy output equals plain greedy decoding token for token (f32);
sampled output has the target's distribution (the PRNG draws differ from plain sampling's).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.generate.sampling import filtered_logits, sample
from jaxeff.generate.speculative.base import DraftContext, Speculator
from jaxeff.generate.speculative.verify import accept_greedy, accept_sampled, accept_typical
from jaxeff.models.attention import index_positions
from jaxeff.models.kv_cache import TreeSlots, move_slots


class SpecState(NamedTuple):
  """Per-row decode state carried from step to step (device arrays)."""

  history: jax.Array  # [B, T] int32: prompt and accepted tokens by position
  pos: jax.Array  # [B] int32: position of the root (newest token, not yet in the cache)
  hidden: jax.Array  # [B, H]: final hidden state that produced the root
  count: jax.Array  # [B] int32: tokens returned so far
  done: jax.Array  # [B] bool


def _fold(keys, positions):
  return jax.vmap(jax.random.fold_in)(keys, positions)


class SpeculativeDecoder:
  """Runs a `Speculator` for a `Generator` (which owns the target's weights, cache and stats)."""

  def __init__(self, gen, speculator: Speculator):
    self.gen, self.spec = gen, speculator
    self.tree = speculator.tree
    target = gen._model(gen._state)
    speculator.bind(target, max_batch=gen.max_batch, max_seq_len=gen.max_seq_len, mesh=gen.mesh)
    self._params = speculator.params()
    with gen._mesh():
      self._cache = speculator.init_cache()
    self._prefill = jax.jit(self._prefill_fn, static_argnames="sampling", donate_argnames=("cache", "spec_cache"))
    self._draft = jax.jit(self._draft_fn, static_argnames="sampling", donate_argnames=("cache", "spec_cache"))
    self._verify = jax.jit(self._verify_fn, static_argnames=("sampling", "rule"), donate_argnames="cache")

  @property
  def lookahead(self) -> int:
    """Cache slots past the root a step writes (the tree's nodes)."""
    return self.tree.size - 1

  @property
  def cache_bytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self._cache))

  # ------------------------------------------------------------------ compiled programs

  def _prefill_fn(self, state, cache, params, spec_cache, tokens, lengths, keys, values, stops, max_new, *, sampling):
    gen = self.gen
    gen.traces["spec_prefill", tokens.shape[1], sampling] += 1
    model = gen._model(state)
    x, cache = model.forward_with_cache(tokens, index_positions(*tokens.shape), cache)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = sample(model.logits(last), _fold(keys, lengths), sampling, values)
    spec_cache = self.spec.prefill(params, spec_cache, tokens, lengths)
    b = tokens.shape[0]
    history = jnp.zeros((b, gen.max_seq_len), jnp.int32).at[:, : tokens.shape[1]].set(tokens)
    history = history.at[jnp.arange(b), lengths].set(first)
    stopped = jnp.isin(first, stops)
    count = jnp.where(stopped, 0, 1).astype(jnp.int32)
    done = stopped | (count >= max_new)
    return first, SpecState(history, lengths, last, count, done), cache, spec_cache

  def _draft_fn(self, state, cache, params, spec_cache, spec_state, keys, values, *, sampling):
    gen = self.gen
    gen.traces["spec_draft", sampling] += 1
    s = spec_state
    last = jnp.take_along_axis(s.history, s.pos[:, None], axis=1)[:, 0]
    ctx = DraftContext(s.history, s.pos, last, s.hidden, _fold(keys, s.pos))
    tokens, q, cache, spec_cache = self.spec.draft(gen._model(state), cache, params, spec_cache, ctx, sampling, values)
    return tokens.astype(jnp.int32), q, cache, spec_cache

  def _verify_fn(self, state, cache, spec_state, draft_tokens, q, keys, values, stops, max_new, *, sampling, rule):
    gen, tree = self.gen, self.tree
    gen.traces["spec_verify", sampling, rule] += 1
    s = spec_state
    b = s.pos.shape[0]
    rows = jnp.arange(b)
    model = gen._model(state)
    root = s.history[rows, s.pos]
    tokens = jnp.concatenate([root[:, None], draft_tokens], axis=1)  # [B, N]
    depth = jnp.asarray(np.asarray(tree.depth), jnp.int32)
    positions = s.pos[:, None] + depth[None]
    is_chain = tree.max_depth == tree.size - 1
    slots = None if is_chain else TreeSlots(s.pos, jnp.asarray(np.asarray(tree.ancestors)))
    x, cache = model.forward_with_cache(tokens, positions, cache, tree=slots)
    logits = model.logits(x)  # [B, N, V]
    key = _fold(keys, s.pos)
    if sampling.greedy:
      final, bonus = accept_greedy(logits, tokens, tree)
    else:
      filtered = jax.vmap(lambda lg: filtered_logits(lg, sampling, values), in_axes=1, out_axes=1)(logits)
      if rule == "typical":
        final, bonus = accept_typical(filtered, tokens, tree, key)
      else:
        if q is not None:
          q = jnp.concatenate([jnp.zeros_like(q[:, :1]), q], axis=1)
        final, bonus = accept_sampled(filtered, tokens, tree, key, q)
    accepted = depth[final]  # draft tokens accepted per row
    path = jnp.asarray(np.asarray(tree.paths))[final]  # [B, D+1] node ids, -1 after the final node
    if not is_chain:  # the accepted path's keys/values into consecutive slots after the root
      src = s.pos[:, None] + jnp.where(path[:, 1:] >= 0, path[:, 1:], jnp.arange(1, tree.max_depth + 1)[None])
      cache = move_slots(cache, src, s.pos + 1)
    d = tree.max_depth
    path_tokens = jnp.take_along_axis(tokens, jnp.maximum(path[:, 1:], 0), axis=1)  # [B, D]
    j = jnp.arange(d + 1)[None]
    new = accepted + 1
    proposed = jnp.where(j < accepted[:, None], jnp.pad(path_tokens, ((0, 0), (0, 1))), bonus[:, None])
    is_stop = jnp.isin(proposed, stops) & (j < new[:, None])
    first_stop = jnp.min(jnp.where(is_stop, j, d + 1), axis=1)
    keep = jnp.minimum(jnp.minimum(first_stop, new), max_new - s.count)
    keep = jnp.where(s.done, 0, keep)
    count = s.count + keep
    done = s.done | (first_stop < new) | (count >= max_new)
    emitted = jnp.where(j < keep[:, None], proposed, -1)
    # History: the accepted tokens and the bonus after the root; the slots after them keep theirs.
    window = jax.vmap(lambda h, p: jax.lax.dynamic_slice(h, (p + 1,), (d + 1,)))(s.history, s.pos)
    full = jnp.where(j < new[:, None], proposed, window)
    history = jax.vmap(lambda h, w, p: jax.lax.dynamic_update_slice(h, w, (p + 1,)))(s.history, full, s.pos)
    history = jnp.where(s.done[:, None], s.history, history)
    pos = jnp.where(done, s.pos, s.pos + new)
    hidden = jnp.where(done[:, None], s.hidden, x[rows, final])
    state_out = SpecState(history, pos, hidden, count, done)
    return emitted, jnp.where(s.done, -1, accepted), state_out, cache

  # ------------------------------------------------------------------ the host loop

  def run(self, prompts: list[np.ndarray], max_new_tokens: int, sampling, seeds, stop_tokens):
    """Yields, per target forward, (each row's new tokens: a list per prompt, possibly empty,
    whether each row has finished)."""
    gen = self.gen
    n = len(prompts)
    tokens, lengths = gen._pad_prompts(prompts)
    all_seeds = np.zeros(gen.max_batch, np.uint32)
    all_seeds[:n] = seeds
    keys = jax.vmap(jax.random.key)(jnp.asarray(all_seeds))
    values = sampling.values()
    stops = gen._stop_array(stop_tokens)
    max_new = np.int32(max_new_tokens)
    stats = gen.stats
    t0 = time.perf_counter()
    with gen._mesh():
      first, state, gen._cache, self._cache = self._prefill(
        gen._state,
        gen._cache,
        self._params,
        self._cache,
        tokens,
        lengths,
        keys,
        values,
        stops,
        max_new,
        sampling=sampling.static,
      )
      first = np.asarray(first)
    stats.prefill_seconds += time.perf_counter() - t0
    stats.prompt_tokens += int(lengths[:n].sum())
    done = np.asarray(state.done).copy()
    done[n:] = True
    state = state._replace(done=jax.device_put(done, state.done.sharding))
    out = [[int(first[i])] if np.asarray(state.count)[i] else [] for i in range(n)]
    stats.new_tokens += sum(len(r) for r in out)
    yield out, done[:n].tolist()
    decode_start = stats.decode_seconds
    t0 = time.perf_counter()
    hist = stats.accepted_histogram
    while not done[:n].all():
      t_draft = time.perf_counter()
      with gen._mesh():
        draft_tokens, q, gen._cache, self._cache = self._draft(
          gen._state, gen._cache, self._params, self._cache, state, keys, values, sampling=sampling.static
        )
        jax.block_until_ready(draft_tokens)
        stats.draft_seconds += time.perf_counter() - t_draft
        emitted, accepted, state, gen._cache = self._verify(
          gen._state,
          gen._cache,
          state,
          draft_tokens,
          q,
          keys,
          values,
          stops,
          max_new,
          sampling=sampling.static,
          rule=self.spec.rule,
        )
        emitted, accepted, done = np.asarray(emitted), np.asarray(accepted), np.asarray(state.done)
      stats.target_forwards += 1
      stats.decode_steps += 1
      rows = []
      for i in range(n):
        if accepted[i] >= 0:
          hist[int(accepted[i])] += 1
        row = [int(t) for t in emitted[i] if t >= 0]
        rows.append(row)
        stats.new_tokens += len(row)
        stats.decode_tokens += len(row)
      stats.decode_seconds = decode_start + time.perf_counter() - t0
      yield rows, done[:n].tolist()
