"""pallas_kernels.ragged_paged_attention: the reference against NumPy, every implementation (XLA
path, TPU and GPU kernels in interpret mode) against the reference, the TPU semantics simulator,
lowering for TPU and CUDA without the hardware (alone and per shard on an 8-device mesh), the op
on a mesh, and the input errors.

One ragged batch covers the cases at once (interpret mode is compile-bound): decode rows (q_len 1),
prefill rows of several lengths over several query and key blocks, a sequence with q_len 0, one
whose first rows sit before any key (they must come back zero, not NaN), padding sequences past
num_seqs and padding rows past cu_q_lens[num_seqs], on a shuffled pool where every page no live
sequence owns, every token past a kv_len, and every stale page-table entry (-1, past the pool, or
a NaN page) would poison the output if it were read."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import racy_kernel
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jaxeff import sharding
from pallas_kernels.compat import lowering_for
from pallas_kernels.ragged_paged_attention import (
  IMPLS,
  gpu,
  ragged_paged_attention,
  ragged_paged_attention_reference,
  work,
)

# Sequence kinds in batch order; the last two are padding (index >= NUM_SEQS). "early": q_len 3
# over one cached token, so its first two rows sit before any key.
KINDS = ["decode", "prefill", "empty", "decode", "prefill", "early", "decode", "prefill", "prefill", "decode"]
NUM_SEQS = 8
EARLY = KINDS.index("early")
PAD_ROWS = 3  # rows past cu_q_lens[NUM_SEQS] and the padding sequences'
PAGES_PER_SEQ = 6  # room for 96 tokens of 16-token pages


def _lengths(rng):
  """(q_lens, kv_lens): random lengths of each kind (prefills of 2-24 rows, contexts up to 96)."""
  q_lens, kv_lens = [], []
  for kind in KINDS:
    q = {"decode": 1, "empty": 0, "early": 3}.get(kind, None)
    q = int(rng.integers(2, 25)) if q is None else q
    kv = 1 if kind == "early" else int(rng.integers(max(q, 1), 16 * PAGES_PER_SEQ + 1))
    q_lens.append(q)
    kv_lens.append(kv)
  return np.array(q_lens, np.int32), np.array(kv_lens, np.int32)


def _batch(seed, kv_heads, group, d, dtype, window=None, page=16):
  """(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs), poisoned as the module says;
  with a window, pages wholly before the window of a sequence's first row are freed: contents NaN,
  table entry past the pool (what a cache that drops slid-out pages leaves; past the pool rather
  than -1 because the simulator raises on it, where -1 would wrap to the last page)."""
  rng = np.random.default_rng(seed)
  q_lens, kv_lens = _lengths(rng)
  s = len(KINDS)
  needed = -(-kv_lens // page)
  num_pages = int(needed[:NUM_SEQS].sum()) + 4  # 4 pages no live sequence owns
  perm = rng.permutation(num_pages)
  page_indices = np.empty((s, PAGES_PER_SEQ), np.int32)
  page_indices[:] = rng.choice([-1, num_pages + 5, int(perm[-1])], size=page_indices.shape)  # stale entries
  k = rng.standard_normal((num_pages, kv_heads, page, d), np.float32)
  v = rng.standard_normal((num_pages, kv_heads, page, d), np.float32)
  k[perm[-4:]] = v[perm[-4:]] = np.nan
  used = 0
  for i in range(NUM_SEQS):
    own = perm[used : used + needed[i]]
    used += needed[i]
    page_indices[i, : needed[i]] = own
    if kv_lens[i] % page:  # the tail of the last page is garbage
      k[own[-1], :, kv_lens[i] % page :] = v[own[-1], :, kv_lens[i] % page :] = np.nan
    if window is not None:
      gone = max(0, kv_lens[i] - q_lens[i] - window + 1) // page  # pages wholly before the first row's window
      k[own[:gone]] = v[own[:gone]] = np.nan
      page_indices[i, :gone] = num_pages + 5
  cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = rng.standard_normal((int(cu_q_lens[-1]) + PAD_ROWS, kv_heads * group, d), np.float32)
  cast = lambda x: jnp.asarray(x, dtype)
  ints = (jnp.asarray(kv_lens), jnp.asarray(page_indices), jnp.asarray(cu_q_lens), jnp.array([NUM_SEQS], jnp.int32))
  return (cast(q), cast(k), cast(v), *ints)


def _np_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, window):
  """Softmax attention in NumPy float64, one query row at a time, straight from the definition."""
  q, kp, vp = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k_pages, v_pages))
  kv_lens, page_indices, cu = (np.asarray(x) for x in (kv_lens, page_indices, cu_q_lens))
  t, hq, d = q.shape
  page, kvh = kp.shape[2], kp.shape[1]
  out = np.zeros((t, hq, d))
  for i in range(int(num_seqs[0])):
    q_len, kv_len = cu[i + 1] - cu[i], kv_lens[i]
    for r in range(q_len):
      pos = kv_len - q_len + r
      keys = [j for j in range(kv_len) if j <= pos and (window is None or j > pos - window)]
      if not keys:
        continue
      for h in range(hq):
        kk = np.stack([kp[page_indices[i, j // page], h // (hq // kvh), j % page] for j in keys])
        vv = np.stack([vp[page_indices[i, j // page], h // (hq // kvh), j % page] for j in keys])
        s = kk @ q[cu[i] + r, h] * sm_scale
        p = np.exp(s - s.max())
        out[cu[i] + r, h] = p @ vv / p.sum()
  return out


@functools.partial(jax.jit, static_argnames=("impl", "window", "block_q", "pages_per_block", "interpret"))
def _op(args, *, impl, window, block_q=None, pages_per_block=None, interpret=False):
  return ragged_paged_attention(
    *args, sliding_window=window, impl=impl, block_q=block_q, pages_per_block=pages_per_block, interpret=interpret
  )


def _close(got, want, dtype, what):
  got, want = np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, what
  assert np.isfinite(got).all(), what
  tol = 2e-5 if dtype == jnp.float32 else 3e-2  # bf16: q, k, v and the probabilities enter the dots rounded
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)


def _zero_rows(out, cu_q_lens):
  """Rows that must be zero: past cu_q_lens[num_seqs] (padding), and the "early" sequence's two
  rows placed before its only key."""
  cu, out = np.asarray(cu_q_lens), np.asarray(jnp.asarray(out, jnp.float32))
  return np.concatenate([out[cu[NUM_SEQS] :], out[cu[EARLY] : cu[EARLY] + 2]])


def test_reference_matches_numpy_softmax_row_by_row():
  args = _batch(0, 2, 3, 64, jnp.float32)
  got = _op(args, impl="reference", window=None)
  _close(got, _np_attention(*args, 64**-0.5, None), jnp.float32, "reference")
  args = _batch(0, 2, 3, 64, jnp.float32, window=7)
  assert (np.asarray(args[4])[:NUM_SEQS, 0] >= args[1].shape[0]).sum() > 2  # some pages slid out of the window
  got = _op(args, impl="reference", window=7)
  _close(got, _np_attention(*args, 64**-0.5, 7), jnp.float32, "reference, window")
  assert (_zero_rows(got, args[5]) == 0).all()


# (kv heads, GQA group, head dim, dtype, sliding window)
CASES = [(2, 1, 64, jnp.float32, None), (1, 3, 128, jnp.float32, 11), (2, 4, 64, jnp.bfloat16, 24)]
# Small blocks: prefill sequences span several query items and every sequence several key blocks.
BLOCKS = {"xla": dict(block_q=4, pages_per_block=2), "tpu": dict(block_q=4, pages_per_block=2), "gpu": dict(block_q=4)}


@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu"])
@pytest.mark.parametrize(
  "kv_heads,group,d,dtype,window", CASES, ids=[f"g{c[1]}-d{c[2]}-{jnp.dtype(c[3]).name}-w{c[4]}" for c in CASES]
)
def test_impl_matches_reference(impl, kv_heads, group, d, dtype, window, monkeypatch):
  if impl == "gpu" and window is None:  # one program per item and kv head (the other cases split the pages)
    monkeypatch.setattr(gpu, "TARGET_PROGRAMS", 1)
  args = _batch(kv_heads * 10 + group, kv_heads, group, d, dtype, window)
  want = _op(args, impl="reference", window=window)
  if impl == "gpu":  # 10 decode items (and the prefill ones) split over up to 6 programs each, or not at all
    assert gpu.num_splits(10, kv_heads, PAGES_PER_SEQ) == (1 if window is None else 6)
  got = _op(args, impl=impl, window=window, interpret=impl != "xla", **BLOCKS[impl])
  assert got.dtype == dtype
  _close(got, want, dtype, impl)
  assert (_zero_rows(got, args[5]) == 0).all()


def test_default_block_sizes_match_reference():
  """The impls' own tables (one query and one key block per sequence at these sizes) on the TPU kernel."""
  args = _batch(1, *CASES[0][:3], jnp.float32)
  _close(_op(args, impl="tpu", window=None, interpret=True), _op(args, impl="reference", window=None), jnp.float32, "")


def test_a_bound_on_prefill_sequences_shrinks_the_work_and_keeps_the_result():
  """max_prefill_seqs (a server that prefills a few prompts per step) drops the padding items the
  worst case needs; with the true count the result is the reference's."""
  args = _batch(3, 2, 3, 64, jnp.float32)
  q_lens = np.diff(np.asarray(args[5]))[:NUM_SEQS]
  prefills = int((q_lens > 1).sum())
  t, s = args[0].shape[0], args[3].shape[0]
  assert work.class_sizes(t, s, 1, 4, prefills)[1] < work.class_sizes(t, s, 1, 4)[1]
  assert work.class_sizes(t, s, 1, 4, 0)[1] == 0
  want = _op(args, impl="reference", window=None)
  got = ragged_paged_attention(*args, impl="xla", block_q=4, max_prefill_seqs=prefills)
  _close(got, want, jnp.float32, "xla, bounded prefills")


# --- TPU-semantics simulator ---------------------------------------------------------------------


def test_tpu_kernel_in_tpu_simulator_finds_no_race(capfd):
  """2 simulated cores over the parallel grid, NaN-filled scratch, DMAs run when waited on, reads
  out of bounds raise: the double buffer never reads a slot while its copy is in flight. decode_q=3
  also puts the 2- and 3-row sequences in decode items (speculative verification's shape)."""
  jax.block_until_ready(racy_kernel(jnp.ones((8, 128), jnp.float32)))
  assert "RACE DETECTED" in capfd.readouterr().out  # the detector works and its report reaches us
  params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=1)
  args = _batch(5, 2, 2, 64, jnp.float32, window=30)
  got = ragged_paged_attention(
    *args, sliding_window=30, impl="tpu", interpret=params, block_q=8, decode_q=3, pages_per_block=2
  )
  got = jax.block_until_ready(got)
  report = capfd.readouterr().out
  assert "RACE DETECTED" not in report, report[:2000]
  _close(got, _op(args, impl="reference", window=30), jnp.float32, "simulator")


# --- lowering without the hardware ---------------------------------------------------------------


def _abstract(t, kv_heads, group, d, page, dtype, mesh=None, seqs=32, pages=512, pages_per_seq=32):
  def sds(shape, dt, spec=P()):
    return jax.ShapeDtypeStruct(shape, dt, sharding=None if mesh is None else NamedSharding(mesh, spec))

  pool = sds((pages, kv_heads, page, d), dtype, P(None, "tensor"))
  ints = (sds((seqs,), jnp.int32), sds((seqs, pages_per_seq), jnp.int32), sds((seqs + 1,), jnp.int32))
  return (sds((t, kv_heads * group, d), dtype, P(None, "tensor")), pool, pool, *ints, sds((1,), jnp.int32))


def _lower(platform, impl, args, mesh=None, **kw):
  f = functools.partial(ragged_paged_attention, impl=impl, **kw)
  with jax.set_mesh(mesh) if mesh is not None else _nullcontext(), lowering_for(platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# (tokens, kv heads, group, head dim, page size, dtype, window): a decode step, a mixed prefill step
LOWERING = [(32, 8, 4, 128, 16, jnp.bfloat16, None), (256, 4, 3, 64, 32, jnp.float32, 128)]


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("t,kvh,g,d,page,dtype,window", LOWERING, ids=["decode-d128-bf16", "mixed-d64-f32-window"])
def test_lowers_for_tpu_and_cuda(platform, impl, t, kvh, g, d, page, dtype, window):
  text = _lower(platform, impl, _abstract(t, kvh, g, d, page, dtype), sliding_window=window)
  assert text.count(f"@{_CALL[platform]}(") == 2  # the decode items' kernel and the prefill items'


@pytest.mark.parametrize("platform,impl", [("tpu", "tpu"), ("cuda", "gpu")])
def test_lowers_per_shard_on_a_mesh(platform, impl):
  """Kv heads over tensor=4: each shard's kernel sees 2 of the 8 kv heads (and their 8 query heads)."""
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  text = _lower(platform, impl, _abstract(64, 8, 4, 128, 16, jnp.bfloat16, mesh), mesh)
  call = _CALL[platform]
  assert text.count(f"@{call}(") == 2
  assert "sdy.manual_computation" in text or "shard_map" in text
  operand_types = re.findall(rf"@{re.escape(call)}\([^)]*\)[^\n]*: \(([^)]*)\)", text)
  assert len(operand_types) == 2 and all("512x2x16x128xbf16" in o for o in operand_types), operand_types


@pytest.mark.parametrize("impl", ["xla", "tpu"])
def test_op_on_a_mesh_equals_one_device(impl):
  """Kv heads over tensor=2 (the first of CASES has 2): the result stays split, equal to one device's."""
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  kv_heads, group, d, dtype, window = CASES[0]
  args = _batch(kv_heads * 10 + group, kv_heads, group, d, dtype)
  kw = dict(impl=impl, window=window, interpret=impl == "tpu", **BLOCKS[impl])
  want = _op(args, **kw)
  heads = NamedSharding(mesh, P(None, "tensor"))
  sharded = (jax.device_put(args[0], heads), *(jax.device_put(a, heads) for a in args[1:3]), *args[3:])
  with jax.set_mesh(mesh):
    got = _op(sharded, **kw)
  assert got.sharding.spec[:2] == (None, "tensor")  # computed in place, not gathered
  if impl == "tpu":  # the same kernel on each head's tiles
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  else:  # XLA:CPU fuses the one-head and two-head programs' f32 dots differently (~1 ulp)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# --- errors --------------------------------------------------------------------------------------


def _call(**change):
  names = ("q", "k_pages", "v_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs")
  args = dict(zip(names, _batch(0, 2, 2, 64, jnp.float32)))
  kw = {}
  for name, value in change.items():
    (args if name in args else kw)[name] = value
  return lambda: ragged_paged_attention(*(args[n] for n in names), **kw)


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(q=jnp.zeros((5, 4))), r"q must be floating \[T, Hq, D\]"),
    (dict(k_pages=jnp.zeros((4, 2, 16, 64), jnp.int32)), "k_pages must be floating"),
    (dict(v_pages=jnp.zeros((4, 2, 16, 64))), "v_pages must match k_pages"),
    (dict(q=jnp.zeros((5, 4, 32))), r"head_dim \(64\) must equal q's \(32\)"),
    (dict(q=jnp.zeros((5, 3, 64))), r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    (dict(kv_lens=jnp.zeros((10,))), r"kv_lens must be integers \[S\]"),
    (dict(page_indices=jnp.zeros((9, 6), jnp.int32)), r"page_indices must be integers \[10, pages_per_seq\]"),
    (dict(cu_q_lens=jnp.zeros((10,), jnp.int32)), r"cu_q_lens must be integers \[11\]"),
    (dict(num_seqs=jnp.array(3)), r"num_seqs must be integers \[1\]"),
    (dict(sliding_window=0), "sliding_window must be a positive int or None"),
    (dict(block_q=0), "block_q must be a positive int"),
    (dict(max_prefill_seqs=-1), "max_prefill_seqs must be an int >= 0"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(impl="tpu", k_pages=jnp.zeros((4, 2, 12, 64)), v_pages=jnp.zeros((4, 2, 12, 64))), "multiple of 8"),
    (dict(impl="gpu", k_pages=jnp.zeros((4, 2, 8, 64)), v_pages=jnp.zeros((4, 2, 8, 64))), "page_size a power of two"),
    (dict(impl="gpu", pages_per_block=2), "pages_per_block must be None"),
  ],
)
def test_bad_inputs_raise(change, match):
  with pytest.raises(ValueError, match=match):
    _call(**change)()


def test_exported():
  assert IMPLS == ("tpu", "gpu", "xla", "reference")
  assert pallas_kernels.ragged_paged_attention is ragged_paged_attention
  assert pallas_kernels.ragged_paged_attention_reference is ragged_paged_attention_reference
