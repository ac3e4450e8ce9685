"""Section paged_attention: `ragged_paged_attention` (the paged cache's kernel, bf16) over about 32k
cached tokens in 16-token pages with shuffled block tables: decode-only batches (8 x 4k, 32 x 1k)
and a mixed step (the decode rows plus one 512-token prompt chunk), against the dense decode
attention it replaces (the registry's "dense" attention over a heads-major [B, KVH, T, D] cache, as
the dense KV cache feeds it) on the same keys and values. Both are checked against
`ragged_paged_attention_reference` first; reported: the bytes of the K/V pages the kv_lens cover
per second, as GB/s and as a share of the copy bandwidth (section ceilings), and dense time / paged
time (>= 1: the paged kernel is not slower)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run, copies_for, fmt, one_line, poison, relative_error, rotating
from jaxeff.models.attention import get_attention
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

TOL = 3e-2  # bf16: q, k, v and the probabilities enter the dots rounded to 8 bits


def layout(seqs: int, context: int, chunk: int | None, page: int) -> dict:
  """A step's sequences as numpy arrays: `seqs` decode rows with `context` cached tokens each (their
  new token included), then (`chunk`) one prompt chunk of `chunk` tokens after `chunk` cached ones."""
  kv_lens = [context] * seqs + ([2 * chunk] if chunk else [])
  q_lens = [1] * seqs + ([chunk] if chunk else [])
  return dict(
    kv_lens=np.asarray(kv_lens, np.int32),
    q_lens=np.asarray(q_lens, np.int32),
    cu_q_lens=np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32),
    pages=np.asarray([-(-n // page) for n in kv_lens]),
  )


def shuffled_tables(rng: np.random.Generator, pages: np.ndarray, pool_pages: int) -> np.ndarray:
  """[S, max pages] block tables: every sequence's pages drawn without replacement from a shuffled
  pool; -1 past a sequence's last page (never read)."""
  order = rng.permutation(pool_pages)
  tables = np.full((len(pages), int(pages.max())), -1, np.int32)
  start = 0
  for i, n in enumerate(pages):
    tables[i, :n] = order[start : start + n]
    start += n
  return tables


def covered_bytes(kv_lens: np.ndarray, page: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
  """Bytes of the K and V pages the kv_lens cover: what the step must read at least once."""
  return int(2 * (-(-kv_lens // page)).sum() * page * kv_heads * head_dim * itemsize)


def dense_view(pool, tables, length: int):
  """A dense cache [S, KVH, length, D] (heads-major, the dense cache's layout) of the pool's pages."""
  blocks = jnp.take(pool, jnp.maximum(tables, 0), axis=0)  # [S, NB, KVH, page, D]
  s, nb, kvh, page, d = blocks.shape
  return blocks.transpose(0, 2, 1, 3, 4).reshape(s, kvh, nb * page, d)[:, :, :length]


def dense_step(q, k_decode, v_decode, k_prompt=None, v_prompt=None):
  """The dense engine's attention for the step: one decode of the rows of k_decode [B, KVH, T, D]
  over all T keys (and the prompt chunk's prefill, its queries the last rows of q, over the
  k_prompt [1, KVH, Tp, D] cache: the chunk's keys are its last ones), the registry's dense
  attention on the [B, T, KVH, D] view of a heads-major cache, as `Dense` hands it over."""
  attend = get_attention("dense").fn
  view = lambda c: c.transpose(0, 2, 1, 3)
  seqs, _, context, _ = k_decode.shape
  q_pos = jnp.full((seqs, 1), context - 1, jnp.int32)
  kv_pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (seqs, context))
  out = attend(q[:seqs, None], view(k_decode), view(v_decode), q_positions=q_pos, kv_positions=kv_pos)[:, 0]
  if k_prompt is None:
    return out
  chunk, length = q.shape[0] - seqs, k_prompt.shape[2]
  q_pos = jnp.arange(length - chunk, length, dtype=jnp.int32)[None]
  kv_pos = jnp.arange(length, dtype=jnp.int32)[None]
  prompt = attend(q[None, seqs:], view(k_prompt), view(v_prompt), q_positions=q_pos, kv_positions=kv_pos)[0]
  return jnp.concatenate([out, prompt])


def measure(run: Run) -> list[dict]:
  s = run.sizes
  rows = run.rows()
  cases = [(seqs, context, None) for seqs, context in s.paged_batches]
  if s.paged_chunk:  # the mixed step: the last batch's decode rows plus one prompt chunk
    cases.append((*s.paged_batches[-1], s.paged_chunk))
  for d in s.paged_dims:
    for seqs, context, chunk in cases:
      base = dict(case="mixed" if chunk else "decode", d=d, seqs=seqs, context=context, chunk=chunk or 0)
      if run.over_budget():
        rows.append(dict(base, skipped="time budget"))
        continue
      try:
        rows.append(_case(run, d, seqs, context, chunk, base))
      except Exception as e:
        rows.append(dict(base, error=one_line(e)))
  return rows


def _case(run: Run, d: int, seqs: int, context: int, chunk: int | None, row: dict) -> dict:
  s = run.sizes
  h, kvh = s.paged_heads
  page, dtype = s.paged_page, jnp.bfloat16
  lay = layout(seqs, context, chunk, page)
  used = int(lay["pages"].sum())
  pool_pages = used + max(1, used // 8)  # spare pages, so the tables skip some
  nbytes = covered_bytes(lay["kv_lens"], page, kvh, d, jnp.dtype(dtype).itemsize)
  # The dry run proves the path; two copies keep its interpreted program small.
  copies = 2 if run.dry else copies_for(nbytes)
  tables = jnp.asarray(shuffled_tables(run.rng, lay["pages"], pool_pages))
  ints = (jnp.asarray(lay["kv_lens"]), tables, jnp.asarray(lay["cu_q_lens"]), jnp.asarray([len(lay["kv_lens"])]))
  t = int(lay["cu_q_lens"][-1])
  pools = [
    (run.normal((pool_pages, kvh, page, d), dtype), run.normal((pool_pages, kvh, page, d), dtype))
    for _ in range(copies)
  ]
  queries = [run.normal((t, h, d), dtype) for _ in range(copies)]

  @jax.jit
  def dense_caches(k_pool, v_pool):  # the same keys and values, one dense cache per group of rows
    out = [dense_view(pool, tables[:seqs], context) for pool in (k_pool, v_pool)]
    if chunk:
      out += [dense_view(pool, tables[seqs:], 2 * chunk) for pool in (k_pool, v_pool)]
    return out

  # Lengths and tables are arguments, as in a serving step (not constants XLA could fold).
  paged = lambda *a: ragged_paged_attention(*a, impl=run.impl, interpret=run.interpret)
  paged_sets = [(q, kp, vp, *ints) for q, (kp, vp) in zip(queries, pools)]
  dense_sets = [(q, *dense_caches(kp, vp)) for q, (kp, vp) in zip(queries, pools)]
  programs = {"paged": rotating(paged, paged_sets), "dense": rotating(dense_step, dense_sets)}
  # Correctness first: every copy's output of the timed programs against the reference.
  reference = jax.jit(lambda *a: ragged_paged_attention_reference(*a, sm_scale=d**-0.5))
  wants = [reference(*a) for a in paged_sets]
  errors = {}
  for name, program in programs.items():
    poison(4 * copies * queries[0].nbytes)
    errors[name] = max(relative_error(got, want) for got, want in zip(program(), wants))
  row.update(
    heads=f"{h}/{kvh}",
    page=page,
    tokens=int(lay["kv_lens"].sum()),
    bytes=nbytes,
    rotating_copies=copies,
    errors=errors,
    tol=TOL,
    ok=bool(max(errors.values()) <= TOL),
  )
  if not row["ok"]:
    return row  # a wrong kernel's speed means nothing
  times = common.alternating(programs, s.repeats)
  for name, seconds in times.items():
    per_call = seconds / copies
    row[f"{name}_us"] = 1e6 * per_call
    row[f"{name}_gb_s"] = nbytes / per_call / 1e9
    row[f"{name}_pct_copy"] = 100 * nbytes / per_call / run.copy_bw if run.copy_bw else None
  row["dense_over_paged"] = row["dense_us"] / row["paged_us"]
  return row


def summary(rows: list[dict]) -> list[str]:
  cells = []
  for r in rows:
    label = (r["case"], r["d"], f"{r['seqs']} x {r['context']}" + (f" + {r['chunk']}" if r["chunk"] else ""))
    if "paged_us" in r:
      cells.append(
        (
          *label,
          f"{r['bytes'] / 2**20:.0f}",
          f"{r['paged_us']:.1f}",
          f"{r['paged_gb_s']:.0f}",
          fmt(r["paged_pct_copy"], ".0f"),
          f"{r['dense_us']:.1f}",
          fmt(r["dense_pct_copy"], ".0f"),
          f"{r['dense_over_paged']:.2f}x",
          f"{max(r['errors'].values()):.2g}",
        )
      )
    else:
      problem = r.get("error") or r.get("skipped") or f"error {r['errors']} > tol {r['tol']}"
      cells.append((*label, problem))
  header = (
    "case",
    "d",
    "seqs x ctx",
    "K+V MiB",
    "paged us",
    "GB/s",
    "% copy",
    "dense us",
    "% copy",
    "dense/paged",
    "err",
  )
  return common.markdown_table(header, (c + ("",) * (len(header) - len(c)) for c in cells))


def goals(rows: list[dict]) -> list[tuple]:
  decode = [r for r in rows if r.get("case") == "decode" and "paged_us" in r]
  worst_bw = min(decode, key=lambda r: r["paged_pct_copy"] or 0) if decode else None
  worst_ratio = min(decode, key=lambda r: r["dense_over_paged"]) if decode else None
  bw = worst_bw["paged_pct_copy"] if worst_bw else None
  ratio = worst_ratio["dense_over_paged"] if worst_ratio else None
  return [
    (
      "ragged paged attention decode, ~32k cached tokens: % of copy bandwidth (worst row)",
      bw,
      ">= 80",
      bw is not None and bw >= 80,
    ),
    (
      "ragged paged attention decode: dense time / paged time (worst row)",
      ratio,
      ">= 1",
      ratio is not None and ratio >= 1,
    ),
  ]


def failures(rows: list[dict]) -> list[str]:
  out = []
  for r in rows:
    what = f"paged_attention {r.get('case')} d={r.get('d')} {r.get('seqs')}x{r.get('context')}"
    if r.get("error"):
      out.append(f"{what}: {r['error']}")
    elif "ok" in r and not r["ok"]:
      out.append(f"{what}: error {r['errors']} > tol {r['tol']}")
  return out
