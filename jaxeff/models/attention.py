"""Attention implementations, chosen by `ModelConfig.attention` from one registry.

Every implementation's function has the signature

  fn(q [B, S, H, D], k [B, T, KVH, D], v [B, T, KVH, D], *, q_positions [B, S] | None,
     kv_positions [B, T] | None, sliding_window: int | None, **options) -> [B, S, H, D]

and applies causal masking by position: a key is visible when kv_pos <= q_pos, and with a sliding
window also q_pos - kv_pos < sliding_window. Two optional outputs serve the KV-cache policies
(`jaxeff.inference.cache`), which merge attention over several key sets or keep what is attended
to: `return_lse=True` (capability `lse`) and `query_weights=` [B, S] (capability `key_weights`)
make it return an `AttentionResult` (out, lse [B, S, H] f32: each query's log-sum-exp of its
visible scores; key_weights [B, KVH, T] f32: the attention each key received, summed over the
kv head's query heads and over the queries weighted by `query_weights`). The registry entry
(`AttentionImpl`) says what else an implementation takes, and the model passes exactly that:
`sinks=N` (StreamingLLM attention sinks: keys at positions < N stay visible, still causal) when it
supports sinks and `ModelConfig.attention_sinks` is set, `topk_blocks=K` likewise, and `segment_ids=` [B, S] int for
packed examples (several training examples in one row): a key is then visible only from queries of
its own segment, still causal by index (the positions given to RoPE restart per example, so masking
goes by index here; positions are None). Grouped-query attention: query head h reads kv head
h // (H // KVH).

What the model knows statically it passes statically, so no implementation re-checks it at run
time: positions are None exactly when they are 0..S-1 for every row on both sides (self-attention
over one sequence, no cache; then T == S), and an implementation may then take the mask from
indices (skip blocks). Given positions (explicit ones, or a KV cache's during decode) must be
masked by value.

An implementation with parameters (NSA, jaxeff/models/nsa.py) registers a `module` factory
instead: each attention layer owns `module(cfg, rngs=rngs)` and calls it as `module(x, q, k, v)`
(x: the layer's input) in place of `fn`. A kernel or a new method plugs in with
`register_attention(name, fn, ...)` and `model.attention=name`; the model code does not change.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxeff import sharding
from jaxeff.errors import ConfigError

AttentionFn = Callable[..., jax.Array]
# A large finite mask value, not -inf: a fully masked row then gives a uniform softmax, not NaN.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """A registered attention implementation and what it supports.

  Attributes:
    fn: the attention function (module docstring), or None for a `module` implementation.
    sinks: takes `sinks=N` (attention sinks beside a window or top-k blocks).
    topk_blocks: takes `topk_blocks=K` (selected key blocks per query block).
    cache: works over a KV cache (given positions, a query shorter than the keys): decode.
    module: `module(cfg, rngs=...)` builds the layer's own parameters; its `__call__(x, q, k, v)`
      replaces `fn` (whole sequences at positions 0..S-1 only).
    check: extra config checks, `check(cfg)` raising `ConfigError`.
    mask: takes `mask=` [B, S, T] bool, ANDed with the positional mask (tree verification of
      speculative decoding: a draft node sees only its ancestors among the other draft nodes).
    segments: takes `segment_ids=` [B, S] (packed examples; self-attention at index positions).
    lse: takes `return_lse=True` (returns an `AttentionResult` with each query's log-sum-exp).
    key_weights: takes `query_weights=` [B, S] (returns an `AttentionResult` with the attention each
      key received).
  """

  fn: AttentionFn | None = None
  sinks: bool = False
  topk_blocks: bool = False
  cache: bool = True
  module: Callable | None = None
  check: Callable | None = None
  mask: bool = False
  segments: bool = False
  lse: bool = False
  key_weights: bool = False


class AttentionResult(NamedTuple):
  """What an implementation returns when asked for `return_lse` or `query_weights`."""

  out: jax.Array  # [B, S, H, D]
  lse: jax.Array | None  # [B, S, H] f32, or None when not asked for
  key_weights: jax.Array | None  # [B, KVH, T] f32, or None when not asked for


ATTENTION_IMPLS: dict[str, AttentionImpl] = {}


def register_attention(name: str, fn: AttentionFn | None = None, **supports) -> AttentionImpl:
  """Registers implementation `name` (`AttentionImpl`'s fields as keywords); returns its entry."""
  impl = AttentionImpl(fn, **supports)
  if (impl.fn is None) == (impl.module is None):
    raise ValueError(f"attention {name!r}: give exactly one of fn and module")
  ATTENTION_IMPLS[name] = impl
  return impl


def implementing(capability: str) -> list[str]:
  """Names of the registered implementations whose `capability` field (sinks, mask, ...) is set."""
  return sorted(n for n, i in ATTENTION_IMPLS.items() if getattr(i, capability))


def get_attention(name: str) -> AttentionImpl:
  if name not in ATTENTION_IMPLS:
    raise ConfigError(f"unknown model.attention {name!r}; available: {', '.join(sorted(ATTENTION_IMPLS))}")
  return ATTENTION_IMPLS[name]


def check_config(cfg) -> AttentionImpl:
  """The entry for `cfg.attention`, after checking that it implements what `cfg` asks of it."""
  impl = get_attention(cfg.attention)
  for field, supported in (("attention_sinks", impl.sinks), ("attention_topk_blocks", impl.topk_blocks)):
    if getattr(cfg, field) and not supported:
      able = implementing(field.removeprefix("attention_"))
      raise ConfigError(f"model.{field} is implemented by attention {', '.join(able)}, not {cfg.attention!r}")
  if impl.check is not None:
    impl.check(cfg)
  return impl


@dataclasses.dataclass(frozen=True)
class BoundAttention:
  """A registered implementation with a model's options bound (sliding window, sinks, top-k
  blocks): what the model's attention layers and the KV-cache policies call. Keywords given at
  the call win over the bound ones (a policy's own window, say)."""

  name: str
  impl: AttentionImpl
  options: tuple[tuple[str, object], ...] = ()

  def __call__(self, q, k, v, **kwargs):
    return self.impl.fn(q, k, v, **{**dict(self.options), **kwargs})

  def require(self, capability: str, purpose: str) -> None:
    """Raises ConfigError unless the implementation has `capability` (an `AttentionImpl` field)."""
    if not getattr(self.impl, capability):
      able = ", ".join(implementing(capability))
      raise ConfigError(f"{purpose} needs an attention with {capability} ({able}), not {self.name!r}")


def bind(cfg) -> BoundAttention:
  """`cfg.attention`'s implementation with the model's options (`ModelConfig` fields) bound."""
  impl = get_attention(cfg.attention)
  options = {"sliding_window": cfg.sliding_window}
  if cfg.attention_sinks:
    options["sinks"] = cfg.attention_sinks
  if cfg.attention_topk_blocks:
    options["topk_blocks"] = cfg.attention_topk_blocks
  return BoundAttention(cfg.attention, impl, tuple(options.items()))


def index_positions(batch: int, length: int) -> jax.Array:
  """Positions 0..length-1 for every row: what `None` positions stand for."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, S, S] bool: query s and key t belong to the same packed example."""
  return segment_ids[:, :, None] == segment_ids[:, None, :]


def dense_attention(
  q,
  k,
  v,
  *,
  q_positions=None,
  kv_positions=None,
  sliding_window=None,
  sinks=0,
  mask=None,
  segment_ids=None,
  return_lse=False,
  query_weights=None,
):
  """Reference softmax attention in XLA; scores and softmax in f32. `mask` [B, S, T] (optional)
  hides more keys on top of the positional rule; `segment_ids` [B, S] (self-attention) hides keys
  of other segments. `return_lse` / `query_weights`: an `AttentionResult` (module docstring)."""
  b, s, h, d = q.shape
  kvh = k.shape[2]
  if q_positions is None or kv_positions is None:
    if (q_positions is None) != (kv_positions is None) or k.shape[1] != s:
      raise ValueError("positions may be None only on both sides of a self-attention (q and k of one length)")
    q_positions = kv_positions = index_positions(b, s)
  if segment_ids is not None:
    if k.shape[1] != s:
      raise ValueError("segment_ids are for self-attention (q and k of one length)")
    mask = segment_mask(segment_ids) if mask is None else mask & segment_mask(segment_ids)
  # Heads-major operands, each matmul in the [batch, m, k] x [batch, k, n] form: a KV cache stored
  # heads-major ([B, KVH, T, D]) is then read in place (XLA cancels the transposes).
  q = q.reshape(b, s, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
  kv_pos, q_pos = kv_positions[:, None, None, None, :], q_positions[:, None, None, :, None]
  visible = kv_pos <= q_pos
  if sliding_window is not None:
    in_window = q_pos - kv_pos < sliding_window
    visible &= (in_window | (kv_pos < sinks)) if sinks else in_window
  if mask is not None:
    visible &= mask[:, None, None]
  scores = jnp.where(visible, scores, MASKED)
  probs32 = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs32.astype(v.dtype), v)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
  if not return_lse and query_weights is None:
    return out
  lse = None
  if return_lse:
    lse = jax.nn.logsumexp(scores, axis=-1).transpose(0, 3, 1, 2).reshape(b, s, h)
  weights = None
  if query_weights is not None:
    # A query that sees nothing has a uniform softmax over masked keys: it gives no weight.
    seen = jnp.where(visible, probs32, 0.0)
    weights = jnp.einsum("bkgst,bs->bkt", seen, query_weights.astype(jnp.float32))
  return AttentionResult(out, lse, weights)


register_attention("dense", dense_attention, sinks=True, mask=True, segments=True, lse=True, key_weights=True)


# ---------------------------------------------------------------- block-causal attention (jnp)
#
# Dense attention materializes and softmaxes the full [S, S] score matrix, half of it masked.
# This version splits the queries into a few blocks, computes each block's scores only against
# the keys it can see (up to the diagonal, and inside the sliding window), and has a
# flash-attention style backward: it saves each row's max and sum and recomputes probabilities
# instead of storing them. Plain XLA, no kernel: on XLA:CPU at S=256 its forward+backward takes
# about half of dense's time (BENCHMARKS.md). Skipping blocks by index is exact only when the
# positions are the indices, which the model states statically (positions None); with given
# positions (explicit, or a KV cache's) it is the dense computation, masked by position.


def _query_blocks(seq_len: int, num_blocks: int, window: int | None):
  """(q0, q1, k0): query rows [q0, q1) attend to key rows [k0, q1)."""
  size = seq_len // num_blocks
  for i in range(num_blocks):
    q0 = i * size
    k0 = 0 if window is None else max(0, (q0 - window + 1) // size * size)
    yield q0, q0 + size, k0


def _block_scores(q, k, segments, q0, k0, window, scale):
  # q [B, KVH, G, s, D] (rows q0..), k [B, KVH, t, D] (rows k0..) -> f32 scores [B, KVH, G, s, t],
  # masked by index (= position here) and, for packed rows, by segment.
  s = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
  qi = q0 + jnp.arange(q.shape[3])[:, None]
  ki = k0 + jnp.arange(k.shape[2])[None, :]
  visible = ki <= qi
  if window is not None:
    visible &= qi - ki < window
  if segments is not None:
    same = segments[:, q0 : q0 + q.shape[3], None] == segments[:, None, k0 : k0 + k.shape[2]]
    visible = visible & same[:, None, None]
  return jnp.where(visible, s, MASKED), visible


def _forward(q, k, v, segments, window, num_blocks):
  scale = q.shape[-1] ** -0.5
  outs, maxes, inv_sums = [], [], []
  for q0, q1, k0 in _query_blocks(q.shape[3], num_blocks, window):
    s, _ = _block_scores(q[:, :, :, q0:q1], k[:, :, k0:q1], segments, q0, k0, window, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgst,bktd->bkgsd", p.astype(v.dtype), v[:, :, k0:q1], preferred_element_type=jnp.float32)
    outs.append((o / l).astype(q.dtype))
    maxes.append(m)
    inv_sums.append(1.0 / l)
  # Row max and 1/sum rather than their log-sum-exp: m + log(l) rounds to m when m is the mask
  # value (a row with nothing visible), and the backward would then recompute p = 1, not 1/l.
  stats = (jnp.concatenate(maxes, axis=3), jnp.concatenate(inv_sums, axis=3))
  return jnp.concatenate(outs, axis=3), stats


def _backward(q, k, v, segments, out, stats, d_out, window, num_blocks):
  scale = q.shape[-1] ** -0.5
  # delta = rowsum(dO * O) = rowsum(P * dP): the softmax-backward correction term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for q0, q1, k0 in _query_blocks(q.shape[3], num_blocks, window):
    qb, kb, vb, dob = q[:, :, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], d_out[:, :, :, q0:q1]
    s, visible = _block_scores(qb, kb, segments, q0, k0, window, scale)
    p = jnp.exp(s - stats[0][:, :, :, q0:q1]) * stats[1][:, :, :, q0:q1]
    dv = dv.at[:, :, k0:q1].add(
      jnp.einsum("bkgst,bkgsd->bktd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
    )
    dp = jnp.einsum("bkgsd,bktd->bkgst", dob, vb, preferred_element_type=jnp.float32)
    # Masked scores are constants: no gradient.
    ds = jnp.where(visible, p * (dp - delta[:, :, :, q0:q1]) * scale, 0.0).astype(q.dtype)
    dq_blocks.append(jnp.einsum("bkgst,bktd->bkgsd", ds, kb, preferred_element_type=jnp.float32).astype(q.dtype))
    dk = dk.at[:, :, k0:q1].add(jnp.einsum("bkgst,bkgsd->bktd", ds, qb, preferred_element_type=jnp.float32))
  return jnp.concatenate(dq_blocks, axis=3), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q, k, v, segments, window, num_blocks):
  return _forward(q, k, v, segments, window, num_blocks)[0]


def _blocked_fwd(q, k, v, segments, window, num_blocks):
  out, stats = _forward(q, k, v, segments, window, num_blocks)
  return out, (q, k, v, segments, out, stats)


def _blocked_bwd(window, num_blocks, res, d_out):
  q, k, v, segments, out, stats = res
  # Segment ids are integers: no cotangent.
  return (*_backward(q, k, v, segments, out, stats, d_out, window, num_blocks), None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _num_query_blocks(seq_len: int) -> int:
  # 8 blocks of 32 rows measured best at S=256 on XLA:CPU. Shorter sequences gain too little
  # from skipping to pay for the larger program (compile time): they run as one block (dense).
  for n in (8, 4):
    if seq_len % n == 0 and seq_len // n >= 32:
      return n
  return 1


def blocked_attention(
  q,
  k,
  v,
  *,
  q_positions=None,
  kv_positions=None,
  sliding_window=None,
  mask=None,
  segment_ids=None,
  return_lse=False,
  query_weights=None,
):
  """Block-causal softmax attention with a recomputing backward; same results as `dense_attention`.

  Blocks are skipped only for index positions (both None), packed rows (`segment_ids`) included;
  given positions (or a `mask`, `return_lse`, `query_weights`: what KV-cache policies ask) run the
  dense computation, masked by position.
  """
  b, s, h, d = q.shape
  kvh = k.shape[2]
  num_blocks = _num_query_blocks(s)
  extras = return_lse or query_weights is not None
  dense = q_positions is not None or kv_positions is not None or k.shape[1] != s or num_blocks == 1
  if dense or mask is not None or extras:
    return dense_attention(
      q,
      k,
      v,
      q_positions=q_positions,
      kv_positions=kv_positions,
      sliding_window=sliding_window,
      mask=mask,
      segment_ids=segment_ids,
      return_lse=return_lse,
      query_weights=query_weights,
    )
  qt = q.reshape(b, s, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
  out = _blocked(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids, sliding_window, num_blocks)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


register_attention("blocked", blocked_attention, mask=True, segments=True, lse=True, key_weights=True)


def mean_key_block_selection(q, k, *, q_positions, kv_positions, topk: int, block_q: int, block_kv: int):
  """Top-k key blocks per (batch, kv head, query block), scored by mean-pooled keys (as MoBA, Lu et
  al., arXiv 2502.13189, with one selection per kv-head group as NSA shares it).

  q [B, S, H, D], k [B, T, KVH, D], positions [B, S] / [B, T]. The query block of rows
  [i*block_q, (i+1)*block_q) is represented by its first query q0 (position p0); key block j by the
  mean of its keys. score(j) = sum over the group's heads of q0_h . mean(k_j), over the blocks whose
  keys are all at positions <= p0: scoring with later queries, or with blocks holding keys after
  p0, would let tokens after p0 decide what p0 sees (a leak the causal-loss test catches). The
  blocks a query block overlaps (some key after p0 that one of its queries may see) are always
  read. Returns [B, KVH, nq, topk + ceil(block_q / block_kv) + 1] int32 ids (-1: padding), ready
  for `pallas_kernels.sparse_attention(block_indices=...)`; the selection has no gradient.
  """
  b, s, h, d = q.shape
  t, kvh = k.shape[1], k.shape[2]
  nq, nk = -(-s // block_q), -(-t // block_kv)
  q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  far = jnp.iinfo(jnp.int32).max
  kv_pos = jnp.pad(kv_positions, ((0, 0), (0, nk * block_kv - t)), constant_values=far).reshape(b, nk, block_kv)
  q_pos = jnp.pad(q_positions, ((0, 0), (0, nq * block_q - s)), mode="edge").reshape(b, nq, block_q)
  first, last = q_pos[:, :, :1], jnp.max(q_pos, axis=-1, keepdims=True)  # [B, nq, 1]
  past = jnp.max(kv_pos, axis=-1)[:, None, :] <= first  # [B, nq, nk]: every key at or before p0
  reachable = jnp.min(kv_pos, axis=-1)[:, None, :] <= last  # some key a query of the block may see
  forced = reachable & ~past
  key_sums = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nk * block_kv - t), (0, 0), (0, 0)))
  key_means = (
    key_sums.reshape(b, nk, block_kv, kvh, d).sum(2)
    / jnp.minimum(block_kv, t - jnp.arange(nk) * block_kv)[None, :, None, None]
  )  # [B, nk, KVH, D]
  q0 = q[:, ::block_q].astype(jnp.float32).reshape(b, nq, kvh, h // kvh, d).sum(3)  # [B, nq, KVH, D]
  scores = jnp.einsum("bikd,bjkd->bkij", q0, key_means)
  scores = jnp.where(past[:, None], scores, -jnp.inf)
  forced = jnp.where(jnp.broadcast_to(forced[:, None], scores.shape), 0.0, -jnp.inf)

  def top(values, n):  # the n best block ids per row, -1 where fewer than n are finite
    n_eff = min(n, nk)
    best, idx = jax.lax.top_k(values, n_eff)
    idx = jnp.where(jnp.isneginf(best), -1, idx).astype(jnp.int32)
    return jnp.pad(idx, ((0, 0),) * 3 + ((0, n - n_eff),), constant_values=-1)

  # The overlapped blocks: at most ceil(block_q / block_kv) + 1 when positions grow with the index.
  return jnp.concatenate([top(scores, topk), top(forced, -(-block_q // block_kv) + 1)], axis=-1)


def sparse_attention(q, k, v, *, q_positions=None, kv_positions=None, sliding_window=None, sinks=0, topk_blocks=0):
  """`pallas_kernels.sparse_attention`: block-sparse flash attention whose key blocks outside the
  causal / sliding-window / sink / top-k mask are never loaded (Mosaic on TPU, Triton on GPU, a
  gathered XLA path on CPU). Index positions (None) are the op's default; a KV cache's positions are
  masked by value. `topk_blocks` > 0 adds `mean_key_block_selection`'s blocks to the union. On a
  mesh the op wraps itself in `shard_map` over the axes the sharding rules give the batch and
  heads."""
  import pallas_kernels  # here: only models that choose this attention need the kernels package
  from pallas_kernels.sparse_attention import ops as sparse_ops

  block_indices = block_sizes = None
  if topk_blocks:
    b, s = q.shape[:2]
    t = k.shape[1]
    block_sizes = sparse_ops.resolve_block_sizes(sparse_ops.default_impl(), s, t, None)
    block_indices = mean_key_block_selection(
      q,
      k,
      q_positions=index_positions(b, s) if q_positions is None else q_positions,
      kv_positions=index_positions(b, t) if kv_positions is None else kv_positions,
      topk=topk_blocks,
      block_q=block_sizes.block_q,
      block_kv=block_sizes.block_kv,
    )
  out = pallas_kernels.sparse_attention(
    q.transpose(0, 2, 1, 3),
    k.transpose(0, 2, 1, 3),
    v.transpose(0, 2, 1, 3),
    causal=True,
    window=sliding_window,
    sinks=sinks,
    block_indices=block_indices,
    block_sizes=block_sizes,
    q_positions=q_positions,
    kv_positions=kv_positions,
    batch_axes=sharding.mesh_axes(sharding.BATCH),
    head_axes=sharding.mesh_axes(sharding.HEADS),
  )
  return out.transpose(0, 2, 1, 3)


register_attention("sparse", sparse_attention, sinks=True, topk_blocks=True)
