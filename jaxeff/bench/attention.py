"""Block-sparse attention benchmark: `python -m jaxeff.bench attention [--quick] [--json PATH]`.

Options: `--lengths 4096 8192`, `--skips 0.5 0.9 0.97`, `--batch`, `--heads`, `--kv-heads`,
`--head-dim`, `--rounds N`, `--forward-only`, `--impl NAME` (sparse implementation; default the backend's),
`--max-dense-len L` (longer sequences time the sparse op only: dense attention would not fit).

For each sequence length and target share of skipped blocks it builds two masks:
  window  a causal sliding window sized so that the target share of the causal key blocks is skipped;
  top-k   NSA-style selection: the diagonal block (window 1) plus k random earlier key blocks per
          (kv head, query block), k sized the same way (`topk_block_indices` on random scores).
and reports the share of block pairs the kernel's lists compute (`block_stats`: vs the causal
blocks a dense flash kernel computes, and vs all S x T blocks), then times forward and
forward+backward of dense attention (`jax.nn.dot_product_attention`, causal; XLA on CPU, cuDNN
where available) and of `pallas_kernels.sparse_attention` (the backend's implementation: Pallas
kernels on TPU/GPU, the XLA block-gather path on CPU), in alternating rounds, medians. "ideal" is
dense time x the computed share of what dense computes (all S x T scores on XLA:CPU; causal blocks
for a causal flash kernel on GPU).

Goals (issue 14, GPU only): >= 5x dense flash attention at 32k with 90% of blocks skipped, within
1.3x of ideal. On CPU they are reported as unmeasured.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from jaxeff.bench import common
from pallas_kernels.sparse_attention import block_stats
from pallas_kernels.sparse_attention.ops import default_impl, resolve_block_sizes

CPU_LENGTHS = [4096, 8192]
ACCEL_LENGTHS = [4096, 8192, 16384, 32768, 65536]
SKIPS = [0.5, 0.9, 0.97]


def _masks(s: int, skip: float, bq: int, bk: int, batch: int, kv_heads: int, seed: int):
  """(label, param, sparse_attention kwargs) for a window and a top-k mask near `skip`."""
  nq = -(-s // bq)
  rows = (1 - skip) * (nq + 1) / 2  # blocks per query block that keep (1 - skip) of the causal blocks
  window = max(1, round((rows - 1) * bk))
  k = max(1, round(rows - 1))
  scores = jax.random.normal(jax.random.key(seed), (batch, kv_heads, nq, -(-s // bk)))
  diagonal = jnp.arange(nq)[:, None] * bq // bk == jnp.arange(scores.shape[-1])[None, :]
  idx = pk.topk_block_indices(jnp.where(diagonal, -jnp.inf, scores), k, block_q=bq, block_kv=bk)
  return [("window", f"W={window}", dict(window=window)), ("top-k", f"k={k}+diag", dict(window=1, block_indices=idx))]


def run(args) -> list[dict]:
  backend = jax.default_backend()
  impl = args.impl or default_impl()
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16  # XLA:CPU low-precision dots are slow
  rows = []
  for s in args.lengths:
    bs = resolve_block_sizes(impl, s, s, None)
    kq, kk, kv, ko = jax.random.split(jax.random.key(s), 4)
    shape_q, shape_kv = (args.batch, args.heads, s, args.head_dim), (args.batch, args.kv_heads, s, args.head_dim)
    q, k, v = (jax.random.normal(key, shp, dtype) for key, shp in ((kq, shape_q), (kk, shape_kv), (kv, shape_kv)))
    do = jax.random.normal(ko, shape_q, dtype)
    # jax.nn.dot_product_attention takes [batch, seq, heads, dim].
    qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))

    def dense(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla" if backend == "cpu" else None)

    dense_fwd = jax.jit(dense)
    dense_fb = jax.jit(jax.grad(lambda q, k, v, d: jnp.vdot(dense(q, k, v), d).real, argnums=(0, 1, 2)))
    configs = []
    for skip in args.skips:
      for label, param, kw in _masks(s, skip, bs.block_q, bs.block_kv, args.batch, args.kv_heads, seed=int(skip * 100)):
        stats = block_stats(s, s, impl=impl, **kw)
        stats["computed"] = stats["computed"] * args.heads // args.kv_heads  # per query head
        op = lambda q, k, v, kw=kw: pk.sparse_attention(q, k, v, impl=impl, **kw)
        fwd = jax.jit(op)
        fb = jax.jit(jax.grad(lambda q, k, v, d, op=op: jnp.vdot(op(q, k, v), d).real, argnums=(0, 1, 2)))
        configs.append((skip, label, param, stats, fwd, fb))
    fns = {}
    with_dense = s <= args.max_dense_len
    if with_dense:
      fns["dense_fwd"] = lambda: dense_fwd(qt, kt, vt)
      if not args.forward_only:
        fns["dense_fb"] = lambda: dense_fb(qt, kt, vt, dot_)
    for n, (_, _, _, _, fwd, fb) in enumerate(configs):
      fns[f"{n}_fwd"] = lambda fwd=fwd: fwd(q, k, v)
      if not args.forward_only:
        fns[f"{n}_fb"] = lambda fb=fb: fb(q, k, v, do)
    print(f"seq {s}: timing {len(fns)} programs x {args.rounds} rounds ...", file=sys.stderr, flush=True)
    med = common.alternating(fns, args.rounds)
    for n, (skip, label, param, stats, _, _) in enumerate(configs):
      row = dict(
        seq=s,
        pattern=label,
        param=param,
        target_skip=skip,
        skipped=1 - stats["vs_causal"],
        vs_causal=stats["vs_causal"],
        vs_full=stats["vs_full"],
        block_q=stats["block_q"],
        block_kv=stats["block_kv"],
        sparse_fwd=med[f"{n}_fwd"],
        sparse_fb=med.get(f"{n}_fb"),
        dense_fwd=med.get("dense_fwd"),
        dense_fb=med.get("dense_fb"),
      )
      # Ideal: dense's time x the share of dense's work the lists keep (XLA:CPU dense computes all
      # S x T scores; a causal flash kernel computes the causal blocks).
      row["ideal_share"] = stats["vs_full"] if backend == "cpu" else stats["vs_causal"]
      rows.append(row)
  return rows


def _ms(x):
  return "-" if x is None else f"{x * 1e3:.1f}"


def _ratio(a, b):
  return "-" if a is None or b is None else f"{a / b:.2f}x"


COLUMNS = (
  "seq",
  "pattern",
  "mask",
  "skipped (target)",
  "computed vs causal / vs S*T",
  "dense fwd ms",
  "sparse fwd ms",
  "fwd speedup (ideal)",
  "dense f+b ms",
  "sparse f+b ms",
  "f+b speedup (ideal)",
)


def markdown(rows, header: str) -> str:
  cells = []
  for r in rows:
    ideal = 1 / r["ideal_share"]
    cells.append(
      (
        r["seq"],
        r["pattern"],
        r["param"],
        f"{100 * r['skipped']:.1f}% ({100 * r['target_skip']:.0f}%)",
        f"{100 * r['vs_causal']:.1f}% / {100 * r['vs_full']:.1f}%",
        _ms(r["dense_fwd"]),
        _ms(r["sparse_fwd"]),
        f"{_ratio(r['dense_fwd'], r['sparse_fwd'])} ({ideal:.1f}x)",
        _ms(r["dense_fb"]),
        _ms(r["sparse_fb"]),
        f"{_ratio(r['dense_fb'], r['sparse_fb'])} ({ideal:.1f}x)",
      )
    )
  return "\n".join([header, "", *common.markdown_table(COLUMNS, cells)])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench attention", description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes, one target, one round: a smoke test")
  p.add_argument("--forward-only", action="store_true", help="skip the forward+backward timings")
  p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: 4k-8k on CPU, 4k-64k else)")
  p.add_argument("--skips", type=float, nargs="+", default=SKIPS, help="target shares of skipped blocks")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, help="query heads (default 4 on CPU, 32 else)")
  p.add_argument("--kv-heads", type=int, help="kv heads (default 1 on CPU, 8 else)")
  p.add_argument("--head-dim", type=int, help="head dim (default 64 on CPU, 128 else)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--impl", choices=("tpu", "gpu", "cpu"), help="sparse implementation (default: the backend's)")
  p.add_argument("--max-dense-len", type=int, default=None, help="time dense attention up to this length only")
  p.add_argument("--json", help="also write the rows as JSON here")
  args = p.parse_args(argv)
  cpu = jax.default_backend() == "cpu"
  if args.quick:
    args.lengths, args.rounds, args.skips = args.lengths or [512], 1, [0.9]
    args.heads, args.kv_heads, args.head_dim = args.heads or 2, args.kv_heads or 1, args.head_dim or 32
  args.lengths = args.lengths or (CPU_LENGTHS if cpu else ACCEL_LENGTHS)
  args.heads = args.heads or (4 if cpu else 32)
  args.kv_heads = args.kv_heads or (1 if cpu else 8)
  args.head_dim = args.head_dim or (64 if cpu else 128)
  args.max_dense_len = args.max_dense_len or (8192 if cpu else max(args.lengths))
  bad = [
    f"{name} must be positive"
    for name, x in (
      ("--batch", args.batch),
      ("--heads", args.heads),
      ("--kv-heads", args.kv_heads),
      ("--head-dim", args.head_dim),
      ("--rounds", args.rounds),
    )
    if x < 1
  ]
  bad += [f"--lengths must be >= 64, got {n}" for n in args.lengths if n < 64]
  bad += [f"--skips must be in [0, 1), got {x}" for x in args.skips if not 0 <= x < 1]
  if args.heads % args.kv_heads:
    bad.append(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    bad.append(f"--json: directory of {args.json!r} does not exist")
  if bad:
    return common.error(bad[0])
  rows = run(args)
  device = jax.devices()[0].device_kind
  header = (
    f"{device}, {args.batch}x{args.heads} heads ({args.kv_heads} kv) x d{args.head_dim}, "
    f"{'f32' if cpu else 'bf16'}, sparse impl {args.impl or default_impl()}, {args.rounds} rounds, medians; "
    f"load: {common.machine_load()}"
  )
  print(markdown(rows, header))
  if cpu:
    print(
      "\nGPU goals (>= 5x dense flash attention at 32k with 90% skipped, within 1.3x of ideal): "
      "unmeasured (no GPU on this machine)."
    )
  if args.json:
    common.write_json(args.json, rows, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
