"""pallas_kernels.sparse_attention: block lists, kernels in interpret mode, XLA path and gradients
against the dense reference; the TPU-semantics simulator; errors; the benchmark's smoke run.

Interpret mode is compile-bound here (a few seconds per kernel and shape), so the cases are few
and each covers several features; tests/test_sparse_attention_sharding.py reuses the gradient
cases (identical programs hit the session's persistent compile cache)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import racy_kernel
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels as pk
from pallas_kernels.sparse_attention import BlockSizes
from pallas_kernels.sparse_attention import block_lists as bl
from pallas_kernels.sparse_attention.reference import visibility

# Small tiles so that sequences <= 300 take several blocks and lists with ragged edges.
BLOCKS = {
  "tpu": [BlockSizes(32, 128), BlockSizes(64, 128), BlockSizes(8, 128)],
  "gpu": [BlockSizes(32, 32, block_q_dkv=16), BlockSizes(16, 64), BlockSizes(64, 16)],
  "cpu": [BlockSizes(32, 32), BlockSizes(48, 80)],
}


def _normal(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _inputs(b, h, kvh, s, t, d, dtype=jnp.float32, seed=0):
  kq, kk, kv, ko = jax.random.split(jax.random.key(seed), 4)
  return (
    _normal(kq, (b, h, s, d), dtype),
    _normal(kk, (b, kvh, t, d), dtype),
    _normal(kv, (b, kvh, t, d), dtype),
    _normal(ko, (b, h, s, d), dtype),
  )


def _close(got, want, dtype, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape and np.isfinite(got).all(), what
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: p is rounded to bf16 before the PV dot
  scale = max(1.0, np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


# --- block lists ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("mask", "s", "t", "bq", "bk"))
def _lists(mask, q_pos, kv_pos, indices, s, t, bq, bk):
  need, full, sel = bl.block_masks(mask, q_pos, kv_pos, indices, seq_q=s, seq_kv=t, block_q=bq, block_kv=bk)
  nk = need.shape[-1]
  topk = 0 if indices is None else indices.shape[-1]
  maxb = bl.max_blocks(mask, num_kv_blocks=nk, block_q=bq, block_kv=bk, topk=topk)
  return bl.build_block_lists(need, full, sel, max_blocks=maxb)


@pytest.mark.parametrize(
  "kw",
  [
    dict(window=45, sinks=3),
    dict(causal=False, window=30),
    dict(window=20, topk=2),
  ],
)
def test_block_lists_hold_exactly_the_blocks_with_visible_pairs(kw):
  s = t = 200
  bq, bk = 32, 48
  nq, nk = -(-s // bq), -(-t // bk)
  kw = dict(kw)
  topk = kw.pop("topk", None)
  indices = None
  if topk:
    indices = jax.random.randint(jax.random.key(1), (2, 2, nq, topk), -1, nk + 1)
  pos = jnp.arange(s)[None]
  mask = bl.Mask(kw.get("causal", True), kw.get("window"), kw.get("sinks", 0), indices is not None)
  lists = _lists(mask, pos, pos, indices, s, t, bq, bk)
  assert bool(lists.fits)
  # Brute force from the token mask: a block pair is needed iff it holds a visible pair.
  vis = np.asarray(
    jnp.broadcast_to(
      visibility(pos, pos, num_kv_heads=2, block_indices=indices, block_q=bq, block_kv=bk, **kw), (2, 2, s, t)
    )
  )
  vis = np.pad(vis, ((0, 0), (0, 0), (0, nq * bq - s), (0, nk * bk - t)))
  need = vis.reshape(2, 2, nq, bq, nk, bk).any((3, 5))
  ids = np.broadcast_to(np.asarray(lists.ids), (2, 2, *lists.ids.shape[2:]))
  counts = np.broadcast_to(np.asarray(lists.counts), (2, 2, nq))
  for b in range(2):
    for g in range(2):
      for i in range(nq):
        listed = ids[b, g, i, : counts[b, g, i]] >> bl.FLAG_BITS
        assert list(listed) == list(np.flatnonzero(need[b, g, i])), (b, g, i)
        assert (ids[b, g, i, counts[b, g, i] :] >> bl.FLAG_BITS == (listed[-1] if len(listed) else 0)).all()
        rows = slice(i * bq, min((i + 1) * bq, s))
        for e, j in zip(ids[b, g, i, : counts[b, g, i]], listed):
          block = vis[b, g, rows, j * bk : (j + 1) * bk]
          assert bool(e & bl.FULL) == (block.all() and (j + 1) * bk <= t), (b, g, i, j)
  # The transposed lists hold the same pairs, grouped by key block, with one run per key block.
  t_kv = np.broadcast_to(np.asarray(lists.t_kv), (2, 2, lists.t_kv.shape[-1]))
  t_info = np.broadcast_to(np.asarray(lists.t_info), t_kv.shape)
  t_start = np.broadcast_to(np.asarray(lists.t_start), (2, 2, nk))
  t_count = np.broadcast_to(np.asarray(lists.t_count), (2, 2, nk))
  for b in range(2):
    for g in range(2):
      valid = (t_info[b, g] & bl.T_VALID) != 0
      pairs = sorted(zip(t_kv[b, g][valid], t_info[b, g][valid] >> bl.T_FLAG_BITS))
      assert pairs == sorted((j, i) for i, j in zip(*np.nonzero(need[b, g])))
      assert (np.diff(t_kv[b, g]) >= 0).all()
      first = (t_info[b, g] & bl.T_FIRST) != 0
      assert list(t_kv[b, g][first]) == list(range(nk))  # every key block has a run (dk/dv written)
      for j in range(nk):
        run = t_info[b, g, t_start[b, g, j] : t_start[b, g, j] + t_count[b, g, j]]
        assert list(run >> bl.T_FLAG_BITS) == list(np.flatnonzero(need[b, g, :, j]))


def test_positions_that_break_the_static_bound_fall_back_to_every_block():
  s = t = 256
  scrambled = jax.random.permutation(jax.random.key(0), t)[None]
  mask = bl.Mask(True, 32, 0)
  lists = _lists(mask, jnp.arange(s)[None], scrambled, None, s, t, 64, 64)
  assert not bool(lists.fits)  # a window's keys are spread over every block
  q, k, v, _ = _inputs(1, 2, 1, s, t, 16)
  # The run-time choice between the bounded and the full lists lives in ops.py, shared by every impl.
  want, got, via_op = jax.jit(
    lambda q, k, v, kv_pos: (
      pk.sparse_attention_reference(q, k, v, window=32, kv_positions=kv_pos),
      pk.sparse_attention(q, k, v, impl="cpu", block_sizes=BlockSizes(64, 64), window=32, kv_positions=kv_pos),
      pk.sparse_attention(q, k, v, impl="reference", window=32, kv_positions=kv_pos),
    )
  )(q, k, v, scrambled)
  _close(got, want, jnp.float32, "cpu")
  _close(via_op, want, jnp.float32, "reference through the op")


def test_topk_block_indices_picks_the_best_causal_blocks_and_pads():
  scores = jax.random.normal(jax.random.key(0), (2, 3, 4, 6))
  idx = np.asarray(jax.jit(lambda s: pk.topk_block_indices(s, 3, block_q=64, block_kv=32))(scores))
  assert idx.shape == (2, 3, 4, 3) and idx.dtype == np.int32
  s = np.asarray(scores)
  for i in range(4):
    allowed = np.arange(6) * 32 <= (i + 1) * 64 - 1  # first key at or before the block's last query
    cand = np.flatnonzero(allowed)
    best = cand[np.argsort(-s[..., i, cand], axis=-1)][..., :3]
    n = min(3, len(cand))
    np.testing.assert_array_equal(idx[:, :, i, :n], best[..., :n])
    assert (idx[:, :, i, n:] == -1).all()


# --- kernels (interpret mode) and the XLA path vs the dense reference ----------------------------


@st.composite
def _cases(draw):
  impl = draw(st.sampled_from(["tpu", "gpu"]))
  blocks = draw(st.sampled_from(BLOCKS[impl]))
  decode = draw(st.booleans())
  t = draw(st.integers(1, 300))
  s = draw(st.integers(1, 4)) if decode else t
  nq, nk = -(-s // blocks.block_q), -(-t // blocks.block_kv)
  topk = draw(st.sampled_from([None, 1, 2]))
  return dict(
    impl=impl,
    blocks=blocks,
    s=s,
    t=t,
    decode=decode,
    offset=draw(st.integers(0, t - s)) if decode else 0,
    b=draw(st.sampled_from([1, 2])),
    kvh=draw(st.sampled_from([1, 2])),
    groups=draw(st.sampled_from([1, 2, 3])),
    d=draw(st.sampled_from([16, 32])),
    dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
    causal=draw(st.sampled_from([True, True, False])),
    window=draw(st.one_of(st.none(), st.integers(1, 200))),
    sinks=draw(st.sampled_from([0, 0, 1, 5])),
    topk=topk,
    index_seed=draw(st.integers(0, 100)),
    nq=nq,
    nk=nk,
    sink_logits=draw(st.booleans()),
  )


def _case_inputs(case):
  c = case
  q, k, v, _ = _inputs(c["b"], c["kvh"] * c["groups"], c["kvh"], c["s"], c["t"], c["d"], c["dtype"])
  kw = dict(causal=c["causal"], window=c["window"], sinks=c["sinks"])
  if c["topk"]:
    # Ids in [-1, nk]: -1 and nk are padding; duplicates are allowed.
    kw["block_indices"] = jax.random.randint(
      jax.random.key(c["index_seed"]), (c["b"], c["kvh"], c["nq"], c["topk"]), -1, c["nk"] + 1
    )
  if c["sink_logits"]:
    kw["sink_logits"] = _normal(jax.random.key(7), (c["kvh"] * c["groups"],))
  if c["decode"]:
    # A static KV cache: slots 0..t-1 in order; batch row r's new queries at offset - 7r ... (a
    # ragged batch: each row has filled a different part of its cache).
    back = (7 * jnp.arange(c["b"]) % (c["offset"] + 1))[:, None]
    kw["q_positions"] = jnp.arange(c["s"])[None] + c["offset"] - back
    kw["kv_positions"] = jnp.broadcast_to(jnp.arange(c["t"]), (c["b"], c["t"]))
  return q, k, v, kw


def _jit_with_kwargs(fn, kw):
  """jit(fn)(*args) with kw's arrays traced and its other values static (one compile per case)."""
  arrays = {k: v for k, v in kw.items() if isinstance(v, jax.Array)}
  static = {k: v for k, v in kw.items() if k not in arrays}
  return lambda *args: jax.jit(lambda args, arrays: fn(*args, **static, **arrays))(args, arrays)


def _check_case(case):
  q, k, v, kw = _case_inputs(case)
  bs = case["blocks"]

  def run(q, k, v, **kw):
    return (
      pk.sparse_attention_reference(q, k, v, block_q=bs.block_q, block_kv=bs.block_kv, **kw),
      pk.sparse_attention(q, k, v, impl=case["impl"], interpret=True, block_sizes=bs, **kw),
      # the XLA path, on the same block_indices
      pk.sparse_attention(q, k, v, impl="cpu", block_sizes=BlockSizes(bs.block_q, bs.block_kv), **kw),
    )

  want, got, got_xla = _jit_with_kwargs(run, kw)(q, k, v)
  _close(got, want, case["dtype"], case["impl"])
  _close(got_xla, want, case["dtype"], "cpu")


# Rows that see only a sink (causal + sinks, nothing else); a GQA cache decode with top-k padding;
# a window whose first listed block is fully masked for most rows, with sink logits; a ragged
# non-causal bf16 selection where some rows see nothing at all (their query block selected only
# padding), next to rows that do, with sink logits.
_BASE = dict(
  b=1,
  kvh=1,
  groups=1,
  d=16,
  dtype=jnp.float32,
  causal=True,
  window=None,
  sinks=0,
  topk=None,
  index_seed=0,
  decode=False,
  offset=0,
  sink_logits=False,
)
_EXAMPLES = [
  dict(_BASE, impl="tpu", blocks=BlockSizes(32, 128), s=200, t=200, nq=7, nk=2, sinks=3, topk=1, index_seed=5),
  dict(
    _BASE,
    impl="gpu",
    blocks=BlockSizes(16, 64),
    s=3,
    t=250,
    nq=1,
    nk=4,
    b=2,
    kvh=2,
    groups=3,
    topk=2,
    decode=True,
    offset=180,
    window=70,
    sinks=4,
  ),
  dict(_BASE, impl="tpu", blocks=BlockSizes(64, 128), s=300, t=300, nq=5, nk=3, groups=2, window=40, sink_logits=True),
  dict(
    _BASE,
    impl="gpu",
    blocks=BlockSizes(32, 16),
    s=77,
    t=77,
    nq=3,
    nk=5,
    kvh=2,
    causal=False,
    topk=1,
    index_seed=3,
    sink_logits=True,
    dtype=jnp.bfloat16,
  ),
]


@settings(deadline=None, max_examples=1, derandomize=True)
@given(_cases())
@example(_EXAMPLES[0])
@example(_EXAMPLES[1])
@example(_EXAMPLES[2])
@example(_EXAMPLES[3])
def test_kernels_and_xla_path_match_reference(case):
  _check_case(case)


def test_rows_that_see_nothing_are_zero_and_the_examples_cover_them():
  """The examples above must hit the cases they claim (a check that the test can fail)."""
  q, k, v, kw = _case_inputs(_EXAMPLES[3])
  pos = jnp.arange(77)[None]
  seen = np.asarray(
    jax.jit(lambda idx: visibility(pos, pos, num_kv_heads=2, causal=False, block_indices=idx, block_q=32, block_kv=16))(
      kw["block_indices"]
    )
  ).any(-1)[0]
  assert seen.any() and not seen.all()
  out = pk.sparse_attention(q, k, v, impl="cpu", block_sizes=BlockSizes(32, 16), **kw)
  assert float(jnp.abs(out[0].astype(jnp.float32)[~seen]).max()) == 0.0  # one query head per kv head
  # Example 0: some rows see only the 3 sink tokens.
  _, _, _, kw0 = _case_inputs(_EXAMPLES[0])
  pos = jnp.arange(200)[None]
  vis0 = np.asarray(
    jax.jit(lambda idx: visibility(pos, pos, num_kv_heads=1, sinks=3, block_indices=idx, block_q=32, block_kv=128))(
      kw0["block_indices"]
    )
  )[0, 0]
  only_sinks = vis0[:, :3].any(-1) & ~vis0[:, 3:].any(-1)
  assert only_sinks.any()
  # Example 2: for some rows the first key block of their query block's list is fully masked.
  vis2 = np.asarray(jax.jit(lambda p: visibility(p, p, num_kv_heads=1, window=40))(jnp.arange(300)[None]))[0, 0]
  first_masked = [not vis2[r, (r // 64 * 64 - 39) // 128 * 128 :][:128].any() for r in range(64, 300)]
  assert any(first_masked)


# --- gradients -----------------------------------------------------------------------------------

_GRAD_CASES = [
  ("tpu", BlockSizes(32, 128), dict(window=50, sinks=2, sink_logits=True), 150, 2),
  ("gpu", BlockSizes(32, 32, block_q_dkv=16), dict(window=20, topk=2, sink_logits=True), 100, 3),
  ("cpu", BlockSizes(32, 32), dict(window=20, topk=2, sinks=1, sink_logits=True), 100, 3),
]


def grad_case(impl, blocks, kw, s, groups, seed=0, batch=2, kv_heads=2):
  """(op, reference, args, cotangent) for a GQA gradient check."""
  kw = dict(kw)
  q, k, v, do = _inputs(batch, kv_heads * groups, kv_heads, s, s, 16, seed=seed)
  sink = _normal(jax.random.key(9), (kv_heads * groups,)) if kw.pop("sink_logits", False) else None
  topk = kw.pop("topk", None)
  if topk:
    kw["block_indices"] = jax.random.randint(
      jax.random.key(4), (batch, kv_heads, -(-s // blocks.block_q), topk), -1, -(-s // blocks.block_kv)
    )
  op = lambda q, k, v, sink: pk.sparse_attention(
    q, k, v, sink_logits=sink, impl=impl, interpret=impl != "cpu", block_sizes=blocks, **kw
  )
  ref = lambda q, k, v, sink: pk.sparse_attention_reference(
    q, k, v, sink_logits=sink, block_q=blocks.block_q, block_kv=blocks.block_kv, **kw
  )
  return op, ref, (q, k, v, sink), do


def _value_and_grads(fn, args, do):
  out, vjp = jax.vjp(fn, *args)
  return (out, *vjp(do))


def value_and_grads(fn, args, do):
  """(out, dq, dk, dv, dsink) of fn at args for cotangent do, as one compiled program."""
  return jax.jit(lambda args, do: _value_and_grads(fn, args, do))(args, do)


@pytest.mark.parametrize("impl,blocks,kw,s,groups", _GRAD_CASES, ids=[c[0] for c in _GRAD_CASES])
def test_gradients_match_reference(impl, blocks, kw, s, groups):
  op, ref, args, do = grad_case(impl, blocks, kw, s, groups)
  # Two programs: the op's is the one tests/test_sparse_attention_sharding.py runs unsharded.
  got, want = value_and_grads(op, args, do), value_and_grads(ref, args, do)
  for name, g, w in zip(("out", "dq", "dk", "dv", "dsink"), got, want):
    assert float(jnp.abs(w).max()) > 0, name  # every gradient is exercised
    _close(g, w, jnp.float32, name)


# --- TPU-semantics simulator ---------------------------------------------------------------------


@pytest.mark.slow
def test_tpu_kernels_in_tpu_simulator_find_no_race(capfd):
  """Race detection on 2 simulated cores, NaN-filled scratch, ragged lengths, forward and backward."""
  jax.block_until_ready(racy_kernel(jnp.ones((8, 128), jnp.float32)))
  assert "RACE DETECTED" in capfd.readouterr().out  # the detector works and its report is seen here
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=3)
  # 2 kv heads: every kernel's parallel grid has >= 2 points to spread over the 2 simulated cores.
  op, ref, args, do = grad_case(
    "tpu", BlockSizes(32, 128), dict(window=40, sinks=2, sink_logits=True), 70, 2, batch=1, kv_heads=2
  )
  op = lambda q, k, v, sink: pk.sparse_attention(
    q, k, v, sink_logits=sink, window=40, sinks=2, impl="tpu", interpret=params, block_sizes=BlockSizes(32, 128)
  )
  got, want = jax.block_until_ready(
    jax.jit(lambda args, do: (_value_and_grads(op, args, do), _value_and_grads(ref, args, do)))(args, do)
  )
  report = capfd.readouterr().out
  assert "RACE DETECTED" not in report, report[:2000]
  for name, g, w in zip(("out", "dq", "dk", "dv", "dsink"), got, want):
    _close(g, w, jnp.float32, name)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw,shapes,match",
  [
    (dict(), ((1, 3, 8, 16), (1, 2, 8, 16)), "multiple of kv_heads"),
    (dict(), ((1, 2, 8, 16), (1, 2, 8, 32)), "k and v must be"),
    (dict(window=0), None, "window must be a positive int"),
    (dict(), ((1, 2, 8, 16), (1, 2, 8, 16), jnp.bfloat16), "share one floating-point dtype"),
    (dict(sinks=-1), None, "sinks must be an int"),
    (dict(block_indices=jnp.zeros((1, 2, 3, 2), jnp.int32)), None, r"block_indices must be \[1, 2, 1, k\]"),
    (dict(block_indices=jnp.zeros((1, 2, 1, 2))), None, "block_indices must be integers"),
    (dict(sink_logits=jnp.zeros((3,))), None, r"sink_logits must be \[2\]"),
    (dict(q_positions=jnp.zeros((2, 8), jnp.int32)), None, "q_positions must have shape"),
    (dict(kv_positions=jnp.zeros((8,))), None, "kv_positions must be integers"),
    (dict(impl="cuda"), None, "impl must be one of"),
    (dict(impl="tpu", block_sizes=BlockSizes(32, 64)), None, "block_kv % 128"),
    (dict(impl="gpu", block_sizes=BlockSizes(24, 32)), None, "power-of-two block_q"),
  ],
)
def test_bad_arguments_raise_clear_errors(kw, shapes, match):
  qs, ks, kv_dtype = (*(shapes or ((1, 2, 8, 16), (1, 2, 8, 16))), jnp.float32)[:3]
  with pytest.raises(ValueError, match=match):
    pk.sparse_attention(jnp.zeros(qs), jnp.zeros(ks, kv_dtype), jnp.zeros(ks, kv_dtype), **kw)
  with pytest.raises(ValueError, match="positive int"):
    BlockSizes(0, 128)


# --- benchmark -----------------------------------------------------------------------------------


def test_bench_quick_smoke(capsys):
  from jaxeff.bench import attention

  assert attention.main(["--quick", "--forward-only"]) == 0  # (forward+backward: the gradient tests)
  out = capsys.readouterr().out
  assert "| 512 | window |" in out and "| 512 | top-k |" in out and "unmeasured" in out
