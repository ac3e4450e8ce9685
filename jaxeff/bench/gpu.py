"""Every accelerator path, proved and measured in one command: `python -m jaxeff.bench gpu`.

  python -m jaxeff.bench gpu --out DIR             # the whole plan, about 8 minutes on one H200
  python -m jaxeff.bench gpu --quick --out DIR     # about 2 minutes: sections 1, 2 and one row of 3-5
  python -m jaxeff.bench gpu --dry-run --out DIR   # the whole plan at toy sizes on CPU, kernels interpreted

Sections, in order (a section that raises is recorded and the next one runs):
1. ceilings     device copy bandwidth (`a + 1`, bytes read + written) and a large bf16 `jnp.dot`.
2. correctness  every Pallas GPU kernel against an independent reference on fresh random inputs,
                with freed device memory poisoned with NaN before each call (a store the kernel
                forgot then shows as NaN instead of a stale right answer): quant_matmul int8/int4,
                symmetric and zero point, g32/g128, decode and prefill M, f32 and bf16
                activations, ragged shapes; sparse attention forward and backward (causal, window +
                sinks, top-k blocks, GQA, d 64/128, a ragged decode-like chunk); the quantized and
                the sparse model against the reference-quantized and the dense one.
3. quant        x @ W for W of 4096x4096, 4096x14336, 14336x4096 (and 11008x4096: a prime
                split-K step count) at M = 1, 16, 128 (and 2048: the prefill tiles), bf16 `jnp.dot`
                vs int8 vs int4 g128: time, weight GB/s, % of the copy bandwidth, TFLOP/s.
4. attention    8k and 32k tokens, d 128, GQA 32/8, 90% of causal blocks skipped (window + top-k)
                vs dense `jax.nn.dot_product_attention` (cuDNN where it runs, else XLA where it
                fits), forward and forward+backward, against the ideal (dense x computed share);
                plus the checks the kernel review asked for: backward/forward ratio at 4k, one
                decode step over 4k/32k cached keys, f32 vs bf16 inputs.
5. decode       a Llama-3.2-1B-shaped model (random bf16 weights) through `Generator` at batch
                1, 16, 64 in bf16, int8, int4 g128: tokens/s, bytes read per step, % of copy bandwidth.
   serve        the same model (bf16) behind `jaxeff.serve.Engine` (continuous batching), 64
                concurrent requests of mixed lengths: output tokens/s, TTFT, inter-token latency.
   speculative  the same model at batch 1: a forward over 1-16 tokens against one (what bounds
                any speculator's speed-up) and prompt lookup against plain decoding.
   long_context the same model, one decode step over a cache holding 32k tokens at batch 1 and 8:
                dense, StreamingLLM 4 + 1020, H2O 512 + 512, KIVI-4 and KIVI-2 (the quantized
                part read by the Pallas kernel): ms, tokens/s, cache bytes, speed-up over dense;
                and the KIVI kernel against its reference at that size.
6. train        configs/125m.yaml's model, the engine's train step per optimizer (adamw, c_adamw,
                lion, muon, galore, osd): tokens/s, MFU against section 1's measured bf16 rate,
                step time relative to AdamW.

Timing: warm-up (compile) first, then the median of repeats, each repeat blocking once on
device results. Small kernels run several to a program over rotating inputs (distinct weights
whose bytes together exceed the GPU's L2), so neither the L2 nor Python's dispatch shows in the
time. Results go to `--out/gpu_bench.json` after every section (a run killed by its time limit
keeps what it finished); a compact table is printed last. `--budget SECONDS` (default 450 full,
150 quick) skips what would start after it, and the table says so.

Exit status: 0 when every correctness check passed and no section failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

L2_BYTES = 60 << 20  # H100/H200 L2 is 50-60 MB: rotating inputs together exceed 4x this
OPTIMIZERS = ("adamw", "c_adamw", "lion", "muon", "galore", "osd")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section runs; `FULL` is the plan, `QUICK` its 2-minute subset, `DRY` toy sizes."""

  copy_bytes: int = 2 << 30
  matmul_n: int = 8192
  # correctness
  quant_kn: tuple = (1024, 768)
  quant_ms: tuple = (1, 512)
  quant_groups: tuple = (32, 128)
  quant_ragged: tuple = (576, 1000, (16, 17))  # K, N, Ms
  attn_shape: tuple = (1, 8, 2, 1024)  # batch, heads, kv heads, seq
  attn_dims: tuple = (64, 128)
  attn_ragged: tuple = (77, 250)  # queries at the end of a longer key sequence
  model: dict = dataclasses.field(
    default_factory=lambda: dict(
      vocab_size=4096,
      hidden_size=512,
      intermediate_size=1408,
      num_layers=4,
      num_heads=8,
      num_kv_heads=2,
      max_seq_len=1024,
    )
  )
  model_tokens: tuple = (2, 512)
  # quant perf
  quant_shapes: tuple = ((4096, 4096), (4096, 14336), (14336, 4096), (11008, 4096))
  quant_perf_ms: tuple = (1, 16, 128)
  prefill_m: int | None = 2048  # extra M for the first shape (the prefill tiles)
  # attention perf
  attn_lengths: tuple = (8192, 32768)
  attn_heads: tuple = (32, 8, 128)  # heads, kv heads, head dim
  attn_skip: float = 0.9
  attn_checks: bool = True
  attn_check_len: int = 4096
  decode_contexts: tuple = (4096, 32768)
  # decode
  decode_model: dict = dataclasses.field(
    default_factory=lambda: dict(
      vocab_size=128256,
      hidden_size=2048,
      intermediate_size=8192,
      num_layers=16,
      num_heads=32,
      num_kv_heads=8,
      head_dim=64,
      tie_embeddings=True,
      rope_theta=500000.0,
      max_seq_len=131072,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
      },
    )
  )
  decode_batches: tuple = (1, 16, 64)
  decode_formats: tuple = ("bf16", "int8", "int4")
  decode_prompt: int = 128
  decode_new: int = 128
  # long context: one decode step of the decode model over a cache holding this many tokens
  long_contexts: tuple = (32768,)
  long_batches: tuple = (1, 8)
  # serve: the decode model under continuous batching, this many concurrent requests
  serve_clients: int = 64
  # train
  train_config: str = "125m"
  train_model: dict = dataclasses.field(default_factory=dict)  # overrides of the config's model
  train_batch: tuple = (64, 1024)  # batch, seq
  train_steps: int = 5
  optimizers: tuple = OPTIMIZERS
  repeats: int = 7


FULL = Sizes()
QUICK = dataclasses.replace(
  FULL,
  quant_shapes=((4096, 4096),),
  quant_perf_ms=(1,),
  prefill_m=None,
  attn_lengths=(8192,),
  attn_checks=False,
  decode_batches=(1,),
  decode_formats=("bf16",),
  optimizers=(),
  repeats=5,
)
DRY = Sizes(
  copy_bytes=16 << 20,
  matmul_n=256,
  quant_kn=(512, 192),
  quant_ms=(1,),  # M > 1: the ragged shapes below
  quant_groups=(32,),  # the dry run proves the plan; tests/test_quant_matmul.py covers the kernel's grid
  quant_ragged=(96, 100, (16, 17)),
  attn_shape=(1, 4, 2, 192),
  attn_dims=(64,),
  attn_ragged=(9, 50),
  model=dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256
  ),
  model_tokens=(2, 64),
  quant_shapes=((256, 256),),  # with the prefill M: every code path of the section
  quant_perf_ms=(1, 16),
  prefill_m=64,
  attn_lengths=(256,),
  attn_heads=(4, 2, 32),
  attn_check_len=256,
  decode_contexts=(256,),
  decode_model=dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_embeddings=True,
    max_seq_len=256,
  ),
  decode_batches=(1, 2),
  decode_prompt=8,
  decode_new=8,
  long_contexts=(160,),
  long_batches=(2,),
  serve_clients=4,
  train_config="125m",
  train_model=dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128
  ),
  train_batch=(2, 64),
  train_steps=1,
  # The section's two code paths (the baseline; a low-rank optimizer's rank setting): every
  # optimizer trains through the same engine in tests/test_train.py.
  optimizers=("adamw", "osd"),
  repeats=1,
)


# ---------------------------------------------------------------------------- the run


class Run:
  """Settings, the clock, the measured ceilings and the JSON record of one invocation."""

  def __init__(self, args, sizes: Sizes, out: pathlib.Path):
    self.args, self.sizes, self.out = args, sizes, out
    self.dry = args.dry_run
    self.impl = "gpu"  # the Pallas GPU kernels, interpreted on CPU in a dry run
    self.interpret = self.dry
    self.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    self.rng = np.random.default_rng(self.seed)
    self.start = time.perf_counter()
    self.budget = args.budget
    self.copy_bw: float | None = None  # bytes/s, read + write
    self.bf16_flops: float | None = None
    self.record: dict[str, Any] = {"meta": _meta(args, sizes, self.seed), "sections": {}}

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def log(self, message: str) -> None:
    """A progress line on stderr (the table comes last on stdout)."""
    print(f"[{self.elapsed():6.0f} s] {message}", file=sys.stderr, flush=True)

  def rows(self) -> list:
    """A list that logs each row appended to it, so a long or stuck run shows where it is."""
    return _LoggedRows(self)

  def over_budget(self) -> bool:
    return self.budget is not None and self.elapsed() > self.budget

  def key(self):
    return jax.random.key(int(self.rng.integers(2**31)))

  def normal(self, shape, dtype, scale=1.0):
    return (scale * jax.random.normal(self.key(), shape, jnp.float32)).astype(dtype)

  def save(self):
    self.out.mkdir(parents=True, exist_ok=True)
    path = self.out / "gpu_bench.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(self.record, indent=1, default=_jsonable))
    os.replace(tmp, path)


class _LoggedRows(list):
  def __init__(self, run: Run):
    super().__init__()
    self.run = run

  def append(self, row: dict) -> None:
    super().append(row)
    brief = ", ".join(
      f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in row.items()
      if k != "traceback" and not isinstance(v, (dict, list))
    )
    self.run.log("  " + brief)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return str(x)


def _meta(args, sizes: Sizes, seed: int) -> dict:
  dev = jax.devices()[0]
  return dict(
    command="python -m jaxeff.bench gpu " + " ".join(args.argv),
    date=datetime.date.today().isoformat(),
    device=dev.device_kind,
    platform=dev.platform,
    device_count=jax.device_count(),
    jax=jax.__version__,
    jaxlib=_version("jaxlib"),
    python=platform.python_version(),
    host=platform.node(),
    dry_run=args.dry_run,
    quick=args.quick,
    seed=seed,
    sizes=dataclasses.asdict(sizes),
  )


def _version(name: str) -> str | None:
  import importlib.metadata

  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


# ---------------------------------------------------------------------------- timing and checks


def median_seconds(fn: Callable[[], Any], repeats: int, calls_per_run: int = 1) -> float:
  """Median seconds per call: one warm-up run (compiles), then `repeats` runs, each blocking once."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) / calls_per_run)
  return statistics.median(times)


def rotating(op: Callable, arg_sets: list[tuple]) -> Callable[[], Any]:
  """One program calling `op` once per argument set (distinct inputs: no L2 reuse between calls)."""
  many = jax.jit(lambda sets: [op(*a) for a in sets])
  return lambda: many(arg_sets)


def copies_for(nbytes: int, cap: int = 16) -> int:
  """How many distinct copies of an input of `nbytes` rotate so that together they exceed 4x L2."""
  return int(min(cap, max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def poison(nbytes: int) -> None:
  """Fills `nbytes` of freshly freed device memory with NaN, so the next allocation likely reuses it."""
  x = jnp.full((max(nbytes, 4) // 4,), jnp.nan, jnp.float32)
  x.block_until_ready()
  x.delete()


def relative_error(got, want) -> float:
  """max |got - want| / max |want| in f64 on the host; inf when `got` has a NaN or inf."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if not np.all(np.isfinite(got)):
    return float("inf")
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_row(kernel: str, case: str, errors: dict[str, float], tol: float, **extra) -> dict:
  """A correctness row: ok when every error is at most `tol` (and finite)."""
  worst = max(errors.values())
  return dict(kernel=kernel, case=case, errors=errors, max_error=worst, tol=tol, ok=bool(worst <= tol), **extra)


# ---------------------------------------------------------------------------- 1. ceilings


def ceilings(run: Run) -> list[dict]:
  s = run.sizes
  step = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  box = [step(run.normal((s.copy_bytes // 4,), jnp.float32))]

  def copy():
    box[0] = step(box[0])
    return box[0]

  t = median_seconds(copy, run.sizes.repeats)
  run.copy_bw = 2 * s.copy_bytes / t
  n = s.matmul_n
  a, b = run.normal((n, n), jnp.bfloat16), run.normal((n, n), jnp.bfloat16)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  t_dot = median_seconds(lambda: dot(a, b), run.sizes.repeats)
  run.bf16_flops = 2 * n**3 / t_dot
  return [
    dict(name="copy bandwidth", bytes=2 * s.copy_bytes, seconds=t, gb_s=run.copy_bw / 1e9),
    dict(name=f"bf16 dot {n}^3", seconds=t_dot, tflop_s=run.bf16_flops / 1e12),
  ]


# ---------------------------------------------------------------------------- 2. correctness


def _quant_case(run: Run, m: int, k: int, n: int, bits: int, group: int | None, zero_point: bool, act) -> dict:
  import pallas_kernels as pk
  from pallas_kernels.quant_matmul import dequantize

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


def _attention_case(
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
  import pallas_kernels as pk
  from pallas_kernels.sparse_attention.ops import resolve_block_sizes

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


def _model_cases(run: Run) -> list[dict]:
  from flax import nnx

  from jaxeff.config import ModelConfig
  from jaxeff.models import Llama
  from jaxeff.quantization import quantize

  rows = []
  cfg = ModelConfig(**run.sizes.model, dtype="bfloat16", param_dtype="float32", attention="dense")
  tokens = jnp.asarray(run.rng.integers(0, cfg.vocab_size, run.sizes.model_tokens), jnp.int32)
  seed = int(run.rng.integers(2**31))
  dense = Llama(cfg, rngs=nnx.Rngs(seed))
  forward = nnx.jit(lambda model, tokens: model(tokens))
  want = forward(dense, tokens)
  sparse = Llama(dataclasses.replace(cfg, attention="sparse"), rngs=nnx.Rngs(seed))  # same weights
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


def correctness(run: Run) -> list[dict]:
  s = run.sizes
  cases: list[tuple[str, Callable[[], Any]]] = []  # (what, check)

  def quant(m, k, n, bits, group, zero_point, act):
    scaling = f"g{group}" if group else "per-channel"
    what = f"quant_matmul int{bits} {'zp' if zero_point else 'sym'} {scaling} M={m} K={k} N={n} {jnp.dtype(act).name}"
    cases.append((what, lambda: _quant_case(run, m, k, n, bits, group, zero_point, act)))

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
    cases.append((what, lambda: _attention_case(run, label, b, h, kvh, s_q, s_kv, d, **kw)))

  b, h, kvh, seq = s.attn_shape
  for d in s.attn_dims:
    attention("causal", seq, seq, d)
    attention("window+sinks", seq, seq, d, window=seq // 4, sinks=16)
    attention("top-k blocks", seq, seq, d, topk=3)
  rs, rt = s.attn_ragged
  attention("causal chunk at positions T-S..T-1", rs, rt, s.attn_dims[-1], positions=True)
  cases.append(("the quantized and sparse models", lambda: _model_cases(run)))
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
        dict(kernel=what.split()[0], case=what, ok=False, error=_one_line(e), traceback=traceback.format_exc(limit=8))
      ]
    rows += got
    for r in got:
      run.log(f"  {r['kernel']} {r['case']}: " + ("ok" if r["ok"] else f"FAIL {r.get('error') or r.get('errors')}"))
  return rows


# ---------------------------------------------------------------------------- 3. quantized matmul speed


def quant_perf(run: Run) -> list[dict]:
  import pallas_kernels as pk

  s = run.sizes
  rows = run.rows()
  shapes = [
    (kn, s.quant_perf_ms + ((s.prefill_m,) if s.prefill_m and i == 0 else ())) for i, kn in enumerate(s.quant_shapes)
  ]
  for (k, n), ms in shapes:
    w = run.normal((k, n), jnp.float32, scale=0.05)
    formats = {"bf16": w.astype(jnp.bfloat16)}
    for name, bits, group in (("int8", 8, None), ("int4 g128", 4, 128)):
      formats[name] = jax.jit(lambda w, bits=bits, group=group: pk.quantize_weight(w, bits, group))(w)
    del w
    ops = {
      "bf16": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
      "int8": lambda x, w: pk.quant_matmul(x, w, impl=run.impl, interpret=run.interpret),
      "int4 g128": lambda x, w: pk.quant_matmul(x, w, impl=run.impl, interpret=run.interpret),
    }
    for m in ms:
      bf16_t = None
      for name, weight in formats.items():
        if run.over_budget():
          rows.append(dict(shape=f"{k}x{n}", m=m, format=name, skipped="time budget"))
          continue
        nbytes = _nbytes(weight)
        reps = copies_for(nbytes)
        # Rotating copies: the weight plus a fresh offset (a distinct buffer of the same values).
        weights = [weight] + [jax.tree.map(lambda a: a.copy(), weight) for _ in range(reps - 1)]
        sets = [(run.normal((m, k), jnp.bfloat16), wi) for wi in weights]
        try:
          t = median_seconds(rotating(ops[name], sets), s.repeats, calls_per_run=reps)
        except Exception as e:
          rows.append(dict(shape=f"{k}x{n}", m=m, format=name, error=_one_line(e)))
          continue
        finally:
          del weights, sets
        bf16_t = t if name == "bf16" else bf16_t
        rows.append(
          dict(
            shape=f"{k}x{n}",
            m=m,
            format=name,
            us=t * 1e6,
            weight_bytes=nbytes,
            gb_s=nbytes / t / 1e9,
            pct_copy=100 * nbytes / t / run.copy_bw if run.copy_bw else None,
            tflop_s=2 * m * k * n / t / 1e12,
            speedup_vs_bf16=(bf16_t / t) if bf16_t else None,
            rotating_copies=reps,
          )
        )
  return rows


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------- 4. sparse attention speed


def _dense_attention(q, k, v, *, implementation):
  # jax.nn.dot_product_attention takes [batch, seq, heads, dim].
  t = lambda x: x.transpose(0, 2, 1, 3)
  return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True, implementation=implementation))


def _sparse_mask(run: Run, s: int, skip: float, bq: int, bk: int, kvh: int) -> dict:
  """window + top-k keeping (1 - skip) of the causal blocks: half the budget each."""
  import pallas_kernels as pk

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


def attention_perf(run: Run) -> list[dict]:
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
    1e3 * median_seconds(lambda: fwd(*inputs), repeats),
    1e3 * median_seconds(lambda: fb(*inputs, d_out), repeats),
  )


def _sparse_vs_dense(run: Run, s: int, h: int, kvh: int, d: int, kernel: dict, dense_impls) -> dict:
  import pallas_kernels as pk
  from pallas_kernels.sparse_attention import block_stats
  from pallas_kernels.sparse_attention.ops import resolve_block_sizes

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
    row["error"] = _one_line(e)
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
      row[f"dense_{impl}_error"] = _one_line(e)
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
  import pallas_kernels as pk

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
      rows.append(dict(check="causal backward cost", seq=s, error=_one_line(e)))
  if not run.over_budget():  # the same inputs in f32: the kernels' HIGHEST-precision dots
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    try:
      t32 = median_seconds(lambda: causal(*f32), s_.repeats)
      t16 = median_seconds(lambda: causal(q, k, v), s_.repeats)
      rows.append(dict(check="f32 vs bf16 inputs", seq=s, f32_ms=t32 * 1e3, bf16_ms=t16 * 1e3, f32_over_bf16=t32 / t16))
    except Exception as e:
      rows.append(dict(check="f32 vs bf16 inputs", seq=s, error=_one_line(e)))
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
        t = median_seconds(lambda fn=fn: fn(q1, kc, vc), s_.repeats)
        row[f"{name}_us"] = t * 1e6
        row[f"{name}_pct_copy"] = 100 * row["cache_bytes"] / t / run.copy_bw if run.copy_bw else None
      except Exception as e:
        row[f"{name}_error"] = _one_line(e)
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


# ---------------------------------------------------------------------------- 5. decode


def decode(run: Run) -> list[dict]:
  from flax import nnx

  from jaxeff.config import ModelConfig
  from jaxeff.generate import Generator
  from jaxeff.models import Llama
  from jaxeff.quantization import quantize

  s = run.sizes
  dtype = "float32" if run.dry else "bfloat16"  # XLA:CPU bf16 matvecs are slow; the dry run only proves the path
  cfg = ModelConfig(**s.decode_model, dtype=dtype, param_dtype=dtype)
  base = jax.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))  # random weights, built on the device
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, base())
  rows = run.rows()
  for fmt in s.decode_formats:
    if run.over_budget():
      rows.append(dict(format=fmt, skipped="time budget"))
      continue
    try:
      served = {"bf16": model, "int8": None, "int4": None}[fmt] or quantize(
        model, bits=8 if fmt == "int8" else 4, group_size=None if fmt == "int8" else 128
      )
    except Exception as e:
      rows.append(dict(format=fmt, error=_one_line(e)))
      continue
    weight_bytes = _nbytes(nnx.state(served))
    for batch in s.decode_batches:
      if run.over_budget():
        rows.append(dict(format=fmt, batch=batch, skipped="time budget"))
        continue
      prompts = run.rng.integers(0, cfg.vocab_size, (batch, s.decode_prompt)).tolist()
      try:
        gen = Generator(served, max_batch=batch, max_seq_len=s.decode_prompt + s.decode_new)
        gen.generate(prompts, max_new_tokens=4)  # compiles prefill and the decode loop
        rates = []
        for _ in range(max(1, s.repeats // 2)):
          gen.generate(prompts, max_new_tokens=s.decode_new)
          rates.append(gen.stats.decode_steps / gen.stats.decode_seconds)
        steps_s = statistics.median(rates)
        step_bytes = weight_bytes + gen.cache_bytes
        rows.append(
          dict(
            format=fmt,
            batch=batch,
            tok_s=steps_s * batch,
            steps_s=steps_s,
            bytes_per_step=step_bytes,
            weight_bytes=weight_bytes,
            cache_bytes=gen.cache_bytes,
            pct_copy=100 * step_bytes * steps_s / run.copy_bw if run.copy_bw else None,
          )
        )
        del gen
      except Exception as e:
        rows.append(dict(format=fmt, batch=batch, error=_one_line(e)))
    del served
  return rows


def serve(run: Run) -> list[dict]:
  """The decode model (bf16) behind `jaxeff.serve.Engine`: `serve_clients` requests at once, prompt
  and output lengths drawn from [half, full] of the decode section's; a first round compiles."""
  from flax import nnx

  from jaxeff.config import ModelConfig
  from jaxeff.models import Llama
  from jaxeff.serve import Engine

  s = run.sizes
  dtype = "float32" if run.dry else "bfloat16"
  cfg = ModelConfig(**s.decode_model, dtype=dtype, param_dtype=dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))())
  n = s.serve_clients
  lengths = run.rng.integers(max(1, s.decode_prompt // 2), s.decode_prompt + 1, n)
  new = run.rng.integers(max(1, s.decode_new // 2), s.decode_new + 1, n)
  prompts = [run.rng.integers(0, cfg.vocab_size, int(k)).tolist() for k in lengths]
  chunk = 1 << max(0, int(lengths.max()) - 1).bit_length()
  with Engine(model, max_batch=n, max_seq_len=s.decode_prompt + s.decode_new, prefill_chunk=chunk) as engine:

    def round_trip():
      requests = [engine.submit(p, max_tokens=int(m), stop_tokens=()) for p, m in zip(prompts, new)]
      t0 = time.perf_counter()
      for r in requests:
        r.result()
      return requests, time.perf_counter() - t0

    round_trip()  # compiles the buckets this traffic reaches
    requests, seconds = round_trip()
  tokens = sum(len(r.tokens) for r in requests)
  ttft = [r.token_times[0] - r.submitted_at for r in requests]
  itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
  return [
    dict(
      clients=n,
      tok_s=tokens / seconds,
      seconds=seconds,
      ttft_p50_ms=1e3 * float(np.percentile(ttft, 50)),
      itl_p50_ms=1e3 * float(np.percentile(itl, 50)),
      itl_p99_ms=1e3 * float(np.percentile(itl, 99)),
      programs=len(engine.traces),
    )
  ]


def speculative(run: Run) -> list[dict]:
  """Speculative decoding's hardware side on the decode model (bf16, batch 1): how much a forward
  over n tokens costs against a one-token step (what bounds every speculator's speed-up), and
  prompt lookup against plain decoding end to end (random weights: greedy text loops, which the
  lookup predicts; trained drafts need a real model)."""
  from flax import nnx

  from jaxeff.config import ModelConfig
  from jaxeff.generate import Generator
  from jaxeff.generate.speculative import PromptLookup
  from jaxeff.models import Llama
  from jaxeff.models.kv_cache import init_cache

  s = run.sizes
  dtype = "float32" if run.dry else "bfloat16"
  cfg = ModelConfig(**s.decode_model, dtype=dtype, param_dtype=dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))()
  max_len = s.decode_prompt + s.decode_new + 16

  @jax.jit
  def forward(state, cache, tokens, positions):
    m = nnx.merge(graphdef, state)
    x, cache = m.forward_with_cache(tokens, positions, cache)
    return m.logits(x).argmax(-1), cache

  rows = run.rows()
  one = None
  for n in (1, 2, 4, 8, 16):
    cache = init_cache(cfg, 1, max_len)
    tokens = jnp.zeros((1, n), jnp.int32)
    positions = (s.decode_prompt + jnp.arange(n, dtype=jnp.int32))[None]

    def step():
      nonlocal cache
      out, cache = forward(state, cache, tokens, positions)
      return out

    seconds = median_seconds(step, s.repeats)
    one = seconds if n == 1 else one
    rows.append(dict(check="verify forward", tokens=n, ms=1e3 * seconds, vs_one=seconds / one))
  model = nnx.merge(graphdef, state)
  prompt = [run.rng.integers(0, cfg.vocab_size, s.decode_prompt).tolist()]
  reference = None
  for name, speculator in (("plain", None), ("lookup k=8", PromptLookup(num_draft=8))):
    gen = Generator(model, max_batch=1, max_seq_len=max_len, speculator=speculator)
    gen.generate(prompt, max_new_tokens=s.decode_new)  # compiles
    times = []
    for _ in range(max(1, s.repeats // 2)):
      t0 = time.perf_counter()
      out = gen.generate(prompt, max_new_tokens=s.decode_new)
      times.append(time.perf_counter() - t0)
    reference = out if reference is None else reference
    rows.append(
      dict(
        check="decode",
        contender=name,
        tok_s=s.decode_new / statistics.median(times),
        tokens_per_forward=gen.stats.tokens_per_forward,
        exact=out == reference,  # bf16: a verification and a one-token step may round apart
      )
    )
  plain = next(r for r in rows if r.get("contender") == "plain")
  for r in rows:
    if r.get("check") == "decode":
      r["speedup"] = r["tok_s"] / plain["tok_s"]
  return rows


def _filled_cache(policy, cfg, batch: int, context: int, key):
  """`policy`'s cache as it is after `context` tokens: random keys and values (codes, scales),
  its bookkeeping (slot positions, counters) as that many tokens leave it; built on the device."""
  from jaxeff.generate.kv_cache import H2O, KIVI, StreamingLLM

  def build():
    cache = policy.init(cfg, batch, context + 8)
    leaves, treedef = jax.tree.flatten(cache)
    keys = jax.random.split(key, len(leaves))
    fill = []
    for k, x in zip(keys, leaves):
      if x.dtype == jnp.uint8:
        fill.append(jax.random.randint(k, x.shape, 0, 256, jnp.int32).astype(jnp.uint8))
      elif jnp.issubdtype(x.dtype, jnp.floating):
        fill.append(jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype))
      else:
        fill.append(x)
    cache = jax.tree.unflatten(treedef, fill)
    if isinstance(policy, StreamingLLM):  # sinks 0.., the window the last `window` positions
      slot = jnp.arange(policy.sinks + policy.window)
      recent = (
        context - policy.window + (slot - policy.sinks - (context - policy.window - policy.sinks)) % policy.window
      )
      pos = jnp.where(slot < policy.sinks, slot, recent)
      cache = cache.replace(slot_positions=jnp.broadcast_to(pos, cache.slot_positions.shape).astype(jnp.int32))
    elif isinstance(policy, H2O):  # the newest heavy + recent positions kept
      size = policy.heavy + policy.recent
      pos = jax.tree.map(
        lambda p: jnp.broadcast_to(context - size + jnp.arange(size), p.shape).astype(jnp.int32), cache.positions
      )
      cache = cache.replace(positions=pos, scores=jax.tree.map(jnp.abs, cache.scores))
    elif isinstance(policy, KIVI):
      quantized = -(-(context - policy.residual) // policy.group) * policy.group
      cache = cache.replace(
        quantized=jnp.full((batch,), quantized, jnp.int32), end=jnp.full((batch,), context, jnp.int32)
      )
    return cache

  return jax.jit(build)()


def long_context(run: Run) -> list[dict]:
  """One decode step of the decode model over a cache holding `long_contexts` tokens, per cache
  policy and batch: dense, StreamingLLM 4 + 1020, H2O 512 + 512, KIVI-4 and KIVI-2 (attention over
  the quantized part in the Pallas kernel); and the KIVI kernel against its reference there."""
  from flax import nnx

  from jaxeff.config import ModelConfig
  from jaxeff.generate.kv_cache import H2O, KIVI, Dense, StreamingLLM
  from jaxeff.models import Llama
  from pallas_kernels.kivi_attention import quantize_keys, quantize_values, quantized_attention

  s = run.sizes
  dtype = "float32" if run.dry else "bfloat16"
  # head_dim 64 (the real model's) also in the dry run: the GPU kernel's 2-bit tiles need 16 bytes a token.
  cfg = ModelConfig(**{**s.decode_model, "head_dim": 64}, dtype=dtype, param_dtype=dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))()
  window = 28 if run.dry else 1020
  kivi = dict(impl=run.impl, interpret=run.interpret)
  policies = {
    "dense": Dense(),
    f"StreamingLLM 4+{window}": StreamingLLM(4, window),
    f"H2O {(window + 4) // 2}+{(window + 4) // 2}": H2O((window + 4) // 2, (window + 4) // 2),
    "KIVI-4": KIVI(bits=4, **kivi),
    "KIVI-2": KIVI(bits=2, **kivi),
  }
  rows = run.rows()
  # The kernel on its own at the longest context and largest batch, against the reference.
  t, b = max(s.long_contexts), max(s.long_batches)
  g, kvh, d = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim
  for bits in (4, 2):
    kv = run.normal((2, b, kvh, t - t % 32, d), jnp.float32)
    qk, qv = quantize_keys(kv[0], bits, 32, dtype=cfg.dtype), quantize_values(kv[1], bits, 32, dtype=cfg.dtype)
    q = run.normal((b, kvh, g, d), cfg.dtype)
    lengths = jnp.full((b,), t - t % 32 - 32, jnp.int32)
    args = (q, *qk, *qv, lengths)
    common = dict(bits=bits, group=32, sm_scale=d**-0.5)
    want, _ = quantized_attention(*args, **common, impl="reference")
    got, _ = jax.jit(lambda *a, bits=bits: quantized_attention(*a, **{**common, "bits": bits}, **kivi))(*args)
    err = relative_error(got, want)
    rows.append(dict(check="kivi kernel", bits=bits, context=t, batch=b, max_error=err, ok=err < 2e-2))

  @functools.partial(jax.jit, donate_argnums=1)
  def step(state, cache, tokens, positions):
    m = nnx.merge(graphdef, state)
    x, cache = m.forward_with_cache(tokens[:, None], positions[:, None], cache)
    return m.logits(x[:, 0]).argmax(-1).astype(jnp.int32), cache

  for context in s.long_contexts:
    for batch in s.long_batches:
      dense_s = None
      for label, policy in policies.items():
        if run.over_budget():
          rows.append(dict(check="decode step", cache=label, context=context, batch=batch, skipped="time budget"))
          continue
        try:
          cache = _filled_cache(policy, cfg, batch, context, run.key())
          nbytes = _nbytes(cache)
          tokens = jnp.zeros((batch,), jnp.int32)
          positions = jnp.full((batch,), context, jnp.int32)

          def one():
            nonlocal cache
            out, cache = step(state, cache, tokens, positions)
            return out

          seconds = median_seconds(one, s.repeats)
          dense_s = seconds if label == "dense" else dense_s
          rows.append(
            dict(
              check="decode step",
              cache=label,
              context=context,
              batch=batch,
              ms=1e3 * seconds,
              tok_s=batch / seconds,
              cache_bytes=nbytes,
              vs_dense=dense_s / seconds if dense_s else None,
            )
          )
          del cache
        except Exception as e:
          rows.append(dict(check="decode step", cache=label, context=context, batch=batch, error=_one_line(e)))
  return rows


# ---------------------------------------------------------------------------- 6. training


def train(run: Run) -> list[dict]:
  """The training engine's own step (`jaxeff.training.Trainer`) on the config's model, per optimizer."""
  from jaxeff import training

  s = run.sizes
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{s.train_config}.yaml"
  batch, seq = s.train_batch
  base = [
    f"batch_size={batch}",
    f"seq_len={seq}",
    "optimizer.learning_rate=1e-4",
    "optimizer.warmup_steps=1",
    "progress=false",
    *(f"model.{k}={v}" for k, v in s.train_model.items()),
  ]
  rows, adamw_t = run.rows(), None
  for name in s.optimizers:
    if run.over_budget():
      rows.append(dict(optimizer=name, skipped="time budget"))
      continue
    try:
      overrides = base + [f"optimizer.name={name}"]
      if name in ("galore", "osd"):
        hidden = training.load_config(str(path), overrides).model.hidden_size
        overrides.append(f"optimizer.hyperparams={{rank: {min(128, hidden // 2)}}}")
      row = _train_row(run, training.Trainer(training.load_config(str(path), overrides)), batch, seq)
      adamw_t = row["step_ms"] if name == "adamw" else adamw_t
      rows.append(dict(optimizer=name, **row, vs_adamw=(row["step_ms"] / adamw_t) if adamw_t else None))
    except Exception as e:
      rows.append(dict(optimizer=name, error=_one_line(e), traceback=traceback.format_exc(limit=8)))
  return rows


def _train_row(run: Run, trainer, batch: int, seq: int) -> dict:
  """Median step time over `repeats` runs of `train_steps` steps, each run blocking once."""
  import itertools

  cfg = trainer.cfg
  tokens = run.rng.integers(0, cfg.model.vocab_size, (batch, seq + 1)).astype(np.int32)
  batches = itertools.repeat({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  state = trainer.init_state()
  for info in trainer.steps(state, batches, last_step=1):  # compiles
    state = info.state
  jax.block_until_ready(state)
  n, times = run.sizes.train_steps, []
  for _ in range(run.sizes.repeats):
    t0 = time.perf_counter()
    for info in trainer.steps(state, batches, last_step=int(state.step) + n):
      state, metrics = info.state, info.metrics
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t0) / n)
  t = statistics.median(times)
  flops_per_step = cfg.model.flops_per_token(seq) * batch * seq
  return dict(
    step_ms=t * 1e3,
    tokens_s=batch * seq / t,
    loss=float(metrics["loss"]),
    mfu_pct=100 * flops_per_step / t / run.bf16_flops if run.bf16_flops else None,
    batch=batch,
    seq=seq,
    params=cfg.model.num_params,
    devices=trainer.mesh.size,
  )


# ---------------------------------------------------------------------------- the table


SECTIONS: dict[str, Callable[[Run], list[dict]]] = {
  "ceilings": ceilings,
  "correctness": correctness,
  "quant": quant_perf,
  "attention": attention_perf,
  "decode": decode,
  "serve": serve,
  "speculative": speculative,
  "long_context": long_context,
  "train": train,
}


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _f(x, fmt=".1f", none="-"):
  return none if x is None else format(x, fmt)


def goals(record: dict, dry: bool) -> list[dict]:
  """The issue's goals on the H200, each met / missed / not measured (never decided on a dry run)."""
  sec = lambda name: record["sections"].get(name, {}).get("rows", [])
  out = []

  def goal(name, value, target, ok):
    state = "not measured" if value is None else ("dry run" if dry else ("met" if ok else "missed"))
    out.append(dict(goal=name, value=value, target=target, state=state))

  int8 = [r["pct_copy"] for r in sec("quant") if r.get("format") == "int8" and r.get("m") == 1 and r.get("pct_copy")]
  goal(
    "quant_matmul int8 at M=1: % of copy bandwidth (worst shape)",
    min(int8) if int8 else None,
    ">= 70",
    bool(int8) and min(int8) >= 70,
  )
  int4 = [
    r["speedup_vs_bf16"]
    for r in sec("quant")
    if r.get("format") == "int4 g128" and r.get("m") == 1 and r.get("speedup_vs_bf16")
  ]
  goal(
    "quant_matmul int4 g128 at M=1: speed-up over bf16 jnp.dot (worst shape)",
    min(int4) if int4 else None,
    ">= 2",
    bool(int4) and min(int4) >= 2,
  )
  att = [r for r in sec("attention") if r.get("check") == "sparse vs dense" and r.get("fwd_speedup")]
  longest = max(att, key=lambda r: r["seq"]) if att else None
  goal(
    f"sparse attention fwd at {longest['seq'] if longest else 32768}, 90% sparse: speed-up over dense",
    longest["fwd_speedup"] if longest else None,
    ">= 5",
    bool(longest) and longest["fwd_speedup"] >= 5,
  )
  goal(
    "sparse attention fwd: time / ideal",
    longest["fwd_vs_ideal"] if longest else None,
    "<= 1.3",
    bool(longest) and longest["fwd_vs_ideal"] <= 1.3,
  )
  dec = [r for r in sec("decode") if r.get("format") == "bf16" and r.get("batch") == 1 and r.get("pct_copy")]
  goal(
    "1B decode bf16 batch 1: % of copy bandwidth",
    dec[0]["pct_copy"] if dec else None,
    ">= 80",
    bool(dec) and dec[0]["pct_copy"] >= 80,
  )
  tr = [r for r in sec("train") if r.get("optimizer") == "adamw" and r.get("mfu_pct")]
  goal("125m train step (adamw) MFU %", tr[0]["mfu_pct"] if tr else None, ">= 40", bool(tr) and tr[0]["mfu_pct"] >= 40)
  return out


def table(record: dict) -> str:
  """The compact summary printed last."""
  meta = record["meta"]
  lines = [
    f"## jaxeff GPU bench: {meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date']}"
    f"{' -- DRY RUN (toy sizes, interpreted kernels: no speed meaning)' if meta['dry_run'] else ''}",
    "",
  ]
  secs = record["sections"]
  for name in SECTIONS:
    sec = secs.get(name)
    if sec is None:
      continue
    head = f"### {name} ({sec.get('seconds', 0):.0f} s)"
    if sec.get("error"):
      lines += [head, f"FAILED: {sec['error']}", ""]
      continue
    rows = sec.get("rows", [])
    lines.append(head)
    if name == "ceilings":
      for r in rows:
        lines.append(f"- {r['name']}: " + (f"{r['gb_s']:.0f} GB/s" if "gb_s" in r else f"{r['tflop_s']:.1f} TFLOP/s"))
    elif name == "correctness":
      bad = [r for r in rows if not r.get("ok")]
      lines.append(f"- {len(rows) - len(bad)}/{len(rows)} checks passed")
      for r in bad:
        lines.append(
          f"  - FAIL {r.get('kernel')} {r.get('case')}: "
          + (r.get("error") or r.get("skipped") or f"error {r.get('max_error'):.3g} > tol {r.get('tol')}")
        )
    elif name == "quant":
      lines += [
        "| W [K x N] | M | format | us | GB/s | % copy | TFLOP/s | vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
      ]
      for r in rows:
        lines.append(
          f"| {r['shape']} | {r['m']} | {r['format']} | "
          + (
            f"{r.get('error') or r.get('skipped')} | | | | |"
            if "us" not in r
            else f"{r['us']:.1f} | {r['gb_s']:.0f} | {_f(r['pct_copy'], '.0f')} | {r['tflop_s']:.2f} | "
            f"{_f(r['speedup_vs_bf16'], '.2f')}x |"
          )
        )
    elif name == "attention":
      for r in rows:
        if r.get("skipped") or (r.get("error") and "sparse_fwd_ms" not in r):
          lines.append(f"- {r['check']} {r.get('seq', r.get('context'))}: {r.get('skipped') or r.get('error')}")
        elif r["check"] == "sparse vs dense":
          lines.append(
            f"- S={r['seq']} ({100 * r['skipped_share']:.0f}% skipped): sparse fwd {r['sparse_fwd_ms']:.2f} "
            f"ms, f+b {r['sparse_fb_ms']:.2f} ms; dense ({r.get('dense_impl', 'none ran')}) fwd "
            f"{_f(r.get('dense_fwd_ms'), '.2f')}, f+b {_f(r.get('dense_fb_ms'), '.2f')} ms; speed-up fwd "
            f"{_f(r.get('fwd_speedup'), '.2f')}x (vs ideal {_f(r.get('fwd_vs_ideal'), '.2f')}x), f+b "
            f"{_f(r.get('fb_speedup'), '.2f')}x"
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
            f"- decode step over {r['context']} cached keys: kernel {_f(r.get('sparse_kernel_us'))} us "
            f"({_f(r.get('sparse_kernel_pct_copy'), '.0f')}% copy), XLA {_f(r.get('xla_us'))} us "
            f"({_f(r.get('xla_pct_copy'), '.0f')}% copy)"
            + (f"; kernel error {r['sparse_kernel_error']}" if "sparse_kernel_error" in r else "")
          )
    elif name == "decode":
      lines += ["| format | batch | tok/s | bytes/step | % copy |", "|---|---|---|---|---|"]
      for r in rows:
        lines.append(
          f"| {r['format']} | {r.get('batch', '-')} | "
          + (
            f"{r.get('error') or r.get('skipped')} | | |"
            if "tok_s" not in r
            else f"{r['tok_s']:.0f} | {r['bytes_per_step'] / 1e6:.0f} MB | {_f(r['pct_copy'], '.0f')} |"
          )
        )
    elif name == "serve":
      for r in rows:
        lines.append(
          f"- {r['clients']} concurrent requests: {r['tok_s']:.0f} output tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} "
          f"ms, ITL p50/p99 {r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f} ms ({r['programs']} programs compiled)"
        )
    elif name == "speculative":
      for r in rows:
        if r.get("check") == "verify forward":
          lines.append(f"- forward over {r['tokens']} tokens: {r['ms']:.2f} ms ({r['vs_one']:.2f}x one token)")
        elif r.get("check") == "decode":
          lines.append(
            f"- {r['contender']}: {r['tok_s']:.0f} tok/s ({r['speedup']:.2f}x), "
            f"{r['tokens_per_forward']:.2f} tokens/forward, same tokens as plain: {r['exact']}"
          )
        else:
          lines.append(f"- {r.get('error') or r.get('skipped')}")
    elif name == "long_context":
      lines += ["| cache | context | batch | step ms | tok/s | cache MB | vs dense |", "|---|---|---|---|---|---|---|"]
      for r in rows:
        if r.get("check") == "kivi kernel":
          err = f"error {r['max_error']:.2g}"
          lines.append(f"| KIVI-{r['bits']} kernel vs reference | {r['context']} | {r['batch']} | {err} | | | |")
        elif "ms" in r:
          lines.append(
            f"| {r['cache']} | {r['context']} | {r['batch']} | {r['ms']:.2f} | {r['tok_s']:.0f} | "
            f"{r['cache_bytes'] / 1e6:.0f} | {_f(r['vs_dense'], '.2f')}x |"
          )
        else:
          what = r.get("error") or r.get("skipped")
          lines.append(f"| {r.get('cache', '-')} | {r.get('context', '-')} | {r.get('batch', '-')} | {what} | | | |")
    elif name == "train":
      lines += ["| optimizer | step ms | tokens/s | MFU % | vs adamw |", "|---|---|---|---|---|"]
      for r in rows:
        lines.append(
          f"| {r['optimizer']} | "
          + (
            f"{r.get('error') or r.get('skipped')} | | | |"
            if "step_ms" not in r
            else f"{r['step_ms']:.1f} | {r['tokens_s']:.0f} | {_f(r['mfu_pct'])} | {_f(r['vs_adamw'], '.2f')}x |"
          )
        )
    lines.append("")
  lines.append("### goals")
  for g in record.get("goals", []):
    lines.append(f"- {g['goal']}: {_f(g['value'], '.2f')} (target {g['target']}): {g['state']}")
  return "\n".join(lines)


def failures(record: dict) -> list[str]:
  """What makes the run fail: section errors and correctness checks that did not pass."""
  out = [f"section {name}: {sec['error']}" for name, sec in record["sections"].items() if sec.get("error")]
  out += [
    f"correctness {r.get('kernel')} {r.get('case')}"
    for r in record["sections"].get("correctness", {}).get("rows", [])
    if not r.get("ok")
  ]
  out += [
    f"long_context {r.get('check')} {r.get('cache', '')} {r.get('bits', '')}: {r.get('error', 'error above tolerance')}"
    for r in record["sections"].get("long_context", {}).get("rows", [])
    if r.get("error") or (r.get("check") == "kivi kernel" and not r.get("ok"))
  ]
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench gpu", description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="sections 1 and 2, one row each of 3-5 (~2 min)")
  p.add_argument("--dry-run", action="store_true", help="the whole plan at toy sizes on CPU (kernels interpreted)")
  p.add_argument("--out", default="runs/bench_gpu", help="directory for gpu_bench.json (default runs/bench_gpu)")
  p.add_argument(
    "--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --quick: all but train)"
  )
  p.add_argument("--budget", type=float, help="seconds after which nothing new starts (default 450; quick 150)")
  p.add_argument("--seed", type=int, help="input seed (default: fresh; recorded in the JSON)")
  args = p.parse_args(argv)
  args.argv = argv
  default = [name for name in SECTIONS if not (args.quick and name == "train")]
  chosen = [s for s in args.sections.split(",") if s] if args.sections else default
  unknown = [s for s in chosen if s not in SECTIONS]
  if unknown:
    print(f"error: unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
    return 2
  if args.dry_run and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # A dry run's timings mean nothing: compile with XLA:CPU's cheapest settings (-O0: a third
    # faster; the classic emitters instead of the MLIR fusion emitters: 95 -> 52 s in the suite).
    # Takes effect when the backend has not started yet (a command line's own process).
    flags = (
      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    )
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
  backend = jax.default_backend()
  if not args.dry_run and backend != "gpu":
    print(f"error: no GPU here (jax backend {backend!r}); --dry-run runs the plan at toy sizes on CPU", file=sys.stderr)
    return 2
  if args.budget is None:
    args.budget = None if args.dry_run else (150.0 if args.quick else 450.0)
  sizes = DRY if args.dry_run else (QUICK if args.quick else FULL)
  run = Run(args, sizes, pathlib.Path(args.out))
  print(
    f"jaxeff GPU bench: {run.record['meta']['device']}, jax {jax.__version__}, seed {run.seed}, "
    f"out {run.out / 'gpu_bench.json'}",
    file=sys.stderr,
    flush=True,
  )
  seen_warnings: list[str] = []
  run.record["meta"]["warnings"] = seen_warnings
  for name in SECTIONS:
    if name not in chosen:
      continue
    t0 = time.perf_counter()
    run.log(f"{name} ...")
    entry: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      try:
        entry["rows"] = SECTIONS[name](run)
      except Exception as e:
        entry.update(error=_one_line(e), traceback=traceback.format_exc(limit=12))
    for w in caught:
      text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
      if text not in seen_warnings:
        seen_warnings.append(text)
    entry["seconds"] = time.perf_counter() - t0
    run.record["sections"][name] = entry
    run.record["goals"] = goals(run.record, run.dry)
    run.record["failures"] = failures(run.record)
    run.save()
  run.record["meta"]["seconds"] = run.elapsed()
  run.save()
  print(table(run.record))
  bad = run.record["failures"]
  if bad:
    print(f"\n{len(bad)} failure(s): " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else ""), file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
