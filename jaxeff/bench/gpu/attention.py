"""Section 4, attention: 8k and 32k tokens, d 128, GQA 32/8, 90% of causal blocks skipped (window
+ top-k) vs dense `jax.nn.dot_product_attention` (cuDNN where it runs, else XLA where it fits),
forward and forward+backward, against the ideal (dense x computed share); plus the checks the
kernel review asked for: backward/forward ratio at 4k, one decode step over 4k/32k cached keys,
f32 vs bf16 inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run, fmt, one_line
from pallas_kernels.sparse_attention import block_stats
from pallas_kernels.sparse_attention.ops import resolve_block_sizes


def _dense_attention(q, k, v, *, implementation):
  # jax.nn.dot_product_attention takes [batch, seq, heads, dim].
  t = lambda x: x.transpose(0, 2, 1, 3)
  return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation=implementation))


def _sparse_mask(run: Run, s: int, skip: float, bq: int, bk: int, kvh: int) -> dict:
  """window + top-k keeping (1 - skip) of the causal blocks: half the budget each."""
  nq, nk = -(-s // bq), -(-s // bk)
  per_row = (1 - skip) * (nq + 1) / 2  # blocks per query block
  window = max(1, round(per_row / 2 * bk))
  topk = max(1, round(per_row / 2))
  scores = run.normal((1, kvh, nq, nk), jnp.float32)
  return dict(window=window, block_indices=pk.topk_block_indices(scores, topk, block_q=bq, block_kv=bk))


def _grad_fn(op):
  return jax.jit(
    jax.grad(lambda q, k, v, d: jnp.vdot(op(q, k, v).astype(jnp.float32), d.astype(jnp.float32)), argnums=(0, 1, 2))
  )


def measure(run: Run) -> list[dict]:
  s_ = run.sizes
  h, kvh, d = s_.attn_heads
  rows = run.rows()
  kernel = dict(impl=run.impl, interpret=run.interpret)
  dense_impls = ("xla",) if run.dry else ("cudnn", "xla")
  for s in s_.attn_lengths:
    if run.over_budget():
      rows.append(dict(check="sparse vs dense", seq=s, skipped="time budget"))
      continue
    rows.append(_sparse_vs_dense(run, s, h, kvh, d, kernel, dense_impls))
  if s_.attn_checks:
    rows += _attention_checks(run, h, kvh, d, kernel, dense_impls)
  return rows


def _timed_fwd_and_fb(op, inputs, d_out, repeats: int) -> tuple[float, float]:
  """Median ms of the jitted forward and of forward+backward (each compiled once)."""
  fwd, fb = jax.jit(op), _grad_fn(op)
  return (
    1e3 * common.median_seconds(lambda: fwd(*inputs), repeats),
    1e3 * common.median_seconds(lambda: fb(*inputs, d_out), repeats),
  )


def _sparse_vs_dense(run: Run, s: int, h: int, kvh: int, d: int, kernel: dict, dense_impls) -> dict:
  s_ = run.sizes
  q, k, v, do = (
    run.normal(shape, jnp.bfloat16) for shape in ((1, h, s, d), (1, kvh, s, d), (1, kvh, s, d), (1, h, s, d))
  )
  bs = resolve_block_sizes(run.impl, s, s, None)
  mask = _sparse_mask(run, s, s_.attn_skip, bs.block_q, bs.block_kv, kvh)
  stats = block_stats(s, s, impl=run.impl, **mask)
  row = dict(
    check="sparse vs dense",
    seq=s,
    heads=f"{h}/{kvh}",
    d=d,
    window=mask["window"],
    topk=int(mask["block_indices"].shape[-1]),
    skipped_share=1 - stats["vs_causal"],
  )
  try:
    row["sparse_fwd_ms"], row["sparse_fb_ms"] = _timed_fwd_and_fb(
      lambda q, k, v: pk.sparse_attention(q, k, v, **kernel, **mask), (q, k, v), do, s_.repeats
    )
  except Exception as e:
    row["error"] = one_line(e)
  for impl in dense_impls:  # cuDNN's flash attention where it runs; XLA only where [S, S] scores fit
    if impl == "xla" and not run.dry and s > 8192:
      continue
    try:
      row["dense_fwd_ms"], row["dense_fb_ms"] = _timed_fwd_and_fb(
        functools.partial(_dense_attention, implementation=impl), (q, k, v), do, s_.repeats
      )
      row["dense_impl"] = impl
      break
    except Exception as e:
      row[f"dense_{impl}_error"] = one_line(e)
  if "dense_fwd_ms" in row and "sparse_fwd_ms" in row:
    share = stats["vs_causal"]  # a causal flash kernel computes the causal blocks
    row.update(
      fwd_speedup=row["dense_fwd_ms"] / row["sparse_fwd_ms"],
      fb_speedup=row["dense_fb_ms"] / row["sparse_fb_ms"],
      fwd_vs_ideal=row["sparse_fwd_ms"] / (row["dense_fwd_ms"] * share),
      fb_vs_ideal=row["sparse_fb_ms"] / (row["dense_fb_ms"] * share),
    )
  return row


def _attention_checks(run: Run, h, kvh, d, kernel, dense_impls) -> list[dict]:
  """The kernel review's cheapest checks: backward cost, decode grid, f32 precision."""
  s_ = run.sizes
  rows = run.rows()
  s = s_.attn_check_len
  q, k, v, do = (
    run.normal(shape, jnp.bfloat16) for shape in ((1, h, s, d), (1, kvh, s, d), (1, kvh, s, d), (1, h, s, d))
  )
  causal = jax.jit(lambda q, k, v: pk.sparse_attention(q, k, v, **kernel))
  if not run.over_budget():
    try:
      fwd, fb = _timed_fwd_and_fb(lambda q, k, v: pk.sparse_attention(q, k, v, **kernel), (q, k, v), do, s_.repeats)
      rows.append(
        dict(
          check="causal backward cost",
          seq=s,
          fwd_ms=fwd,
          fb_ms=fb,
          fb_over_fwd=fb / fwd,
          note="a flash kernel's fwd+bwd is ~3-3.5x its forward",
        )
      )
    except Exception as e:
      rows.append(dict(check="causal backward cost", seq=s, error=one_line(e)))
  if not run.over_budget():  # the same inputs in f32: the kernels' HIGHEST-precision dots
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    try:
      t32 = common.median_seconds(lambda: causal(*f32), s_.repeats)
      t16 = common.median_seconds(lambda: causal(q, k, v), s_.repeats)
      rows.append(dict(check="f32 vs bf16 inputs", seq=s, f32_ms=t32 * 1e3, bf16_ms=t16 * 1e3, f32_over_bf16=t32 / t16))
    except Exception as e:
      rows.append(dict(check="f32 vs bf16 inputs", seq=s, error=one_line(e)))
  for ctx in s_.decode_contexts:  # one decode step: 1 query per row over `ctx` cached keys
    if run.over_budget():
      rows.append(dict(check="decode step", context=ctx, skipped="time budget"))
      continue
    batch = 1
    q1 = run.normal((batch, h, 1, d), jnp.bfloat16)
    kc, vc = run.normal((batch, kvh, ctx, d), jnp.bfloat16), run.normal((batch, kvh, ctx, d), jnp.bfloat16)
    qpos, kvpos = jnp.full((1,), ctx - 1, jnp.int32), jnp.arange(ctx, dtype=jnp.int32)
    row = dict(
      check="decode step", context=ctx, batch=batch, heads=f"{h}/{kvh}", d=d, cache_bytes=kc.nbytes + vc.nbytes
    )
    sparse = jax.jit(lambda q, k, v: pk.sparse_attention(q, k, v, q_positions=qpos, kv_positions=kvpos, **kernel))
    for name, fn in (("sparse_kernel", sparse), ("xla", jax.jit(_dense_attention_positions))):
      try:
        t = common.median_seconds(lambda fn=fn: fn(q1, kc, vc), s_.repeats)
        row[f"{name}_us"] = t * 1e6
        row[f"{name}_pct_copy"] = 100 * row["cache_bytes"] / t / run.copy_bw if run.copy_bw else None
      except Exception as e:
        row[f"{name}_error"] = one_line(e)
    rows.append(row)
  return rows


def _dense_attention_positions(q, k, v):
  """One query per row at the last position over the whole cache: a masked-nothing XLA attention."""
  b, h, _, d = q.shape
  kvh = k.shape[1]
  qg = q.reshape(b, kvh, h // kvh, 1, d)
  s = jnp.einsum("bkgqd,bktd->bkgqt", qg, k, preferred_element_type=jnp.float32) * d**-0.5
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqt,bktd->bkgqd", p, v).reshape(b, h, 1, d)


def summary(rows: list[dict]) -> list[str]:
  lines = []
  for r in rows:
    if r.get("skipped") or (r.get("error") and "sparse_fwd_ms" not in r):
      lines.append(f"- {r['check']} {r.get('seq', r.get('context'))}: {r.get('skipped') or r.get('error')}")
    elif r["check"] == "sparse vs dense":
      lines.append(
        f"- S={r['seq']} ({100 * r['skipped_share']:.0f}% skipped): sparse fwd {r['sparse_fwd_ms']:.2f} "
        f"ms, f+b {r['sparse_fb_ms']:.2f} ms; dense ({r.get('dense_impl', 'none ran')}) fwd "
        f"{fmt(r.get('dense_fwd_ms'), '.2f')}, f+b {fmt(r.get('dense_fb_ms'), '.2f')} ms; speed-up fwd "
        f"{fmt(r.get('fwd_speedup'), '.2f')}x (vs ideal {fmt(r.get('fwd_vs_ideal'), '.2f')}x), f+b "
        f"{fmt(r.get('fb_speedup'), '.2f')}x"
      )
    elif r["check"] == "causal backward cost":
      lines.append(
        f"- causal S={r['seq']}: fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fb_ms']:.2f} ms ({r['fb_over_fwd']:.1f}x)"
      )
    elif r["check"] == "f32 vs bf16 inputs":
      lines.append(
        f"- causal S={r['seq']}: f32 {r['f32_ms']:.2f} ms vs bf16 {r['bf16_ms']:.2f} ms ({r['f32_over_bf16']:.1f}x)"
      )
    elif r["check"] == "decode step":
      lines.append(
        f"- decode step over {r['context']} cached keys: kernel {fmt(r.get('sparse_kernel_us'))} us "
        f"({fmt(r.get('sparse_kernel_pct_copy'), '.0f')}% copy), XLA {fmt(r.get('xla_us'))} us "
        f"({fmt(r.get('xla_pct_copy'), '.0f')}% copy)"
        + (f"; kernel error {r['sparse_kernel_error']}" if "sparse_kernel_error" in r else "")
      )
  return lines


def goals(rows: list[dict]) -> list[tuple]:
  att = [r for r in rows if r.get("check") == "sparse vs dense" and r.get("fwd_speedup")]
  longest = max(att, key=lambda r: r["seq"]) if att else None
  return [
    (
      f"sparse attention fwd at {longest['seq'] if longest else 32768}, 90% sparse: speed-up over dense",
      longest["fwd_speedup"] if longest else None,
      ">= 5",
      bool(longest) and longest["fwd_speedup"] >= 5,
    ),
    (
      "sparse attention fwd: time / ideal",
      longest["fwd_vs_ideal"] if longest else None,
      "<= 1.3",
      bool(longest) and longest["fwd_vs_ideal"] <= 1.3,
    ),
  ]
