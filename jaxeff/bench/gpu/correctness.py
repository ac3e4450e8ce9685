"""Section 2, correctness: every Pallas GPU kernel against an independent reference on fresh random
inputs, with freed device memory poisoned with NaN before each call (a store the kernel forgot then
shows as NaN instead of a stale right answer): quant_matmul int8/int4, symmetric and zero point,
g32/g128, decode and prefill M, f32 and bf16 activations, ragged shapes; sparse attention forward
and backward (causal, window + sinks, top-k blocks, GQA, d 64/128, a ragged decode-like chunk); the
quantized and the sparse model against the reference-quantized and the dense one."""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk
from jaxeff.bench import common
from jaxeff.bench.gpu.harness import Run, check_row, one_line, poison, relative_error
from jaxeff.config import ModelConfig
from jaxeff.quantization import quantize
from pallas_kernels.quant_matmul import dequantize
from pallas_kernels.sparse_attention.ops import resolve_block_sizes


def quant_case(run: Run, m: int, k: int, n: int, bits: int, group: int | None, zero_point: bool, act) -> dict:
  x = run.normal((m, k), act)
  w = run.normal((k, n), jnp.float32, scale=0.05)
  qw = jax.jit(lambda w: pk.quantize_weight(w, bits, group, zero_point=zero_point))(w)
  cdt = pk.default_compute_dtype(act, run.impl, run.interpret)
  # Independent reference: f64 on the host from the dequantized weight and x as the dot sees it.
  x_seen = np.asarray(x.astype(cdt).astype(jnp.float32), np.float64)
  want = x_seen @ np.asarray(dequantize(qw, jnp.float32), np.float64)
  poison(4 * m * n * 4)
  got = pk.quant_matmul(x, qw, impl=run.impl, interpret=run.interpret)
  # bf16 dots round the weights (and the group-scaled tiles) to 8 bits; f32 dots are exact-ish.
  tol = 3e-2 if jnp.dtype(cdt) == jnp.bfloat16 else 1e-3
  label = (
    f"int{bits} {'zp' if zero_point else 'sym'} {f'g{group}' if group else 'per-channel'} M={m} K={k} "
    f"N={n} {jnp.dtype(act).name}"
  )
  return check_row("quant_matmul", label, {"out": relative_error(got, want)}, tol, compute_dtype=jnp.dtype(cdt).name)


def attention_case(
  run: Run,
  label: str,
  b: int,
  h: int,
  kvh: int,
  s: int,
  t: int,
  d: int,
  *,
  window=None,
  sinks=0,
  topk=0,
  positions=False,
) -> dict:
  dt = jnp.bfloat16
  q, k, v = run.normal((b, h, s, d), dt), run.normal((b, kvh, t, d), dt), run.normal((b, kvh, t, d), dt)
  d_out = run.normal((b, h, s, d), dt)
  bs = resolve_block_sizes(run.impl, s, t, None)
  kw: dict[str, Any] = dict(window=window, sinks=sinks)
  if topk:
    scores = run.normal((b, kvh, -(-s // bs.block_q), -(-t // bs.block_kv)), jnp.float32)
    kw["block_indices"] = pk.topk_block_indices(scores, topk, block_q=bs.block_q, block_kv=bs.block_kv)
  if positions:  # the queries are the last s of t positions (a chunk decoded after a cached prefix)
    kw.update(q_positions=jnp.arange(t - s, t, dtype=jnp.int32), kv_positions=jnp.arange(t, dtype=jnp.int32))
  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: pk.sparse_attention_reference(q, k, v, block_q=bs.block_q, block_kv=bs.block_kv, **kw)
  want, ref_vjp = jax.vjp(ref, f32(q), f32(k), f32(v))
  want_grads = ref_vjp(f32(d_out))
  op = lambda q, k, v: pk.sparse_attention(q, k, v, impl=run.impl, interpret=run.interpret, **kw)
  poison(8 * q.nbytes)
  got, vjp = jax.vjp(op, q, k, v)
  poison(8 * q.nbytes)
  grads = vjp(d_out)
  errors = {"out": relative_error(got, want)}
  errors.update({name: relative_error(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads)})
  return check_row("sparse_attention", f"{label} B={b} H={h}/{kvh} S={s} T={t} d={d} bf16", errors, 3e-2)


def model_cases(run: Run) -> list[dict]:
  rows = []
  cfg = ModelConfig(**run.sizes.model, dtype="bfloat16", param_dtype="float32", attention="dense")
  tokens = jnp.asarray(run.rng.integers(0, cfg.vocab_size, run.sizes.model_tokens), jnp.int32)
  seed = int(run.rng.integers(2**31))
  dense = common.build_model(cfg, seed=seed)
  forward = nnx.jit(lambda model, tokens: model(tokens))
  want = forward(dense, tokens)
  sparse = common.build_model(dataclasses.replace(cfg, attention="sparse"), seed=seed)  # same weights
  rows.append(
    check_row(
      "model",
      f"sparse vs dense attention, tokens {tokens.shape}, bf16",
      {"logits": relative_error(forward(sparse, tokens), want)},
      3e-2,
    )
  )
  for bits, group in ((8, None), (4, 128)):
    fast = quantize(dense, bits=bits, group_size=group)
    slow = quantize(dense, bits=bits, group_size=group, impl="reference")
    got, ref = forward(fast, tokens), forward(slow, tokens)
    agree = float(np.mean(np.argmax(np.asarray(got), -1) == np.argmax(np.asarray(want), -1)))
    rows.append(
      check_row(
        "model",
        f"int{bits} {f'g{group}' if group else 'per-channel'} kernel vs reference quantized model, bf16",
        {"logits": relative_error(got, ref)},
        3e-2,
        top1_agreement_with_float=agree,
      )
    )
  return rows


def measure(run: Run) -> list[dict]:
  s = run.sizes
  cases: list[tuple[str, Callable[[], Any]]] = []  # (what, check)

  def quant(m, k, n, bits, group, zero_point, act):
    scaling = f"g{group}" if group else "per-channel"
    what = f"quant_matmul int{bits} {'zp' if zero_point else 'sym'} {scaling} M={m} K={k} N={n} {jnp.dtype(act).name}"
    cases.append((what, lambda: quant_case(run, m, k, n, bits, group, zero_point, act)))

  k, n = s.quant_kn
  for bits in (8, 4):
    for zero_point in (False, True):
      for group in s.quant_groups:
        for m in s.quant_ms:
          for act in (jnp.float32, jnp.bfloat16):
            quant(m, k, n, bits, group, zero_point, act)
  rk, rn, rms = s.quant_ragged
  for m in rms:
    quant(m, rk, rn, 8, None, False, jnp.bfloat16)
    quant(m, rk, rn, 4, 32, True, jnp.bfloat16)

  def attention(label, s_q, s_kv, d, **kw):
    what = f"sparse_attention {label} S={s_q} T={s_kv} d={d}"
    cases.append((what, lambda: attention_case(run, label, b, h, kvh, s_q, s_kv, d, **kw)))

  b, h, kvh, seq = s.attn_shape
  for d in s.attn_dims:
    attention("causal", seq, seq, d)
    attention("window+sinks", seq, seq, d, window=seq // 4, sinks=16)
    attention("top-k blocks", seq, seq, d, topk=3)
  rs, rt = s.attn_ragged
  attention("causal chunk at positions T-S..T-1", rs, rt, s.attn_dims[-1], positions=True)
  cases.append(("the quantized and sparse models", lambda: model_cases(run)))
  rows = []
  for i, (what, case) in enumerate(cases):
    if run.over_budget():
      rows.append(dict(kernel="-", case=f"{len(cases) - i} remaining cases", skipped="time budget", ok=False))
      break
    try:
      got = case()
      got = got if isinstance(got, list) else [got]
    except Exception as e:  # a kernel that fails on the hardware is a finding, not the end of the run
      got = [
        dict(kernel=what.split()[0], case=what, ok=False, error=one_line(e), traceback=traceback.format_exc(limit=8))
      ]
    rows += got
    for r in got:
      run.log(f"  {r['kernel']} {r['case']}: " + ("ok" if r["ok"] else f"FAIL {r.get('error') or r.get('errors')}"))
  return rows


def summary(rows: list[dict]) -> list[str]:
  bad = [r for r in rows if not r.get("ok")]
  lines = [f"- {len(rows) - len(bad)}/{len(rows)} checks passed"]
  for r in bad:
    lines.append(
      f"  - FAIL {r.get('kernel')} {r.get('case')}: "
      + (r.get("error") or r.get("skipped") or f"error {r.get('max_error'):.3g} > tol {r.get('tol')}")
    )
  return lines


def failures(rows: list[dict]) -> list[str]:
  return [f"correctness {r.get('kernel')} {r.get('case')}" for r in rows if not r.get("ok")]
