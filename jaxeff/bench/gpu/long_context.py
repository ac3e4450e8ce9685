"""Section long_context: the decode section's model, one decode step over a cache holding 32k
tokens at batch 1 and 8: dense, StreamingLLM 4 + 1020, H2O 512 + 512, KIVI-4 and KIVI-2 (the
quantized part read by the Pallas kernel): ms, tokens/s, cache bytes, speed-up over dense; and the
KIVI kernel against its reference at that size.

The caches are filled with random contents and their bookkeeping set by each policy's
`as_filled(cache, context)` (slot maps, counters as `context` tokens leave them), so no long prompt
has to be read first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.bench import common
from jaxeff.bench.common import median_seconds  # by name: `common` is a local below
from jaxeff.bench.gpu import harness
from jaxeff.bench.gpu.harness import Run, fmt, one_line, relative_error
from jaxeff.config import ModelConfig
from jaxeff.inference import H2O, KIVI, Dense, StreamingLLM
from jaxeff.models import Llama
from pallas_kernels.kivi_attention import quantize_keys, quantize_values, quantized_attention


def _filled_cache(policy, cfg, batch: int, context: int, key):
  """`policy`'s cache as it is after `context` tokens: random keys and values (codes, scales), its
  bookkeeping as the policy says that many tokens leave it; built on the device."""

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
    return policy.as_filled(jax.tree.unflatten(treedef, fill), context)

  return jax.jit(build)()


def measure(run: Run) -> list[dict]:
  """One decode step of the decode model over a cache holding `long_contexts` tokens, per cache
  policy and batch: dense, StreamingLLM 4 + 1020, H2O 512 + 512, KIVI-4 and KIVI-2 (attention over
  the quantized part in the Pallas kernel); and the KIVI kernel against its reference there."""
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
          nbytes = harness.nbytes(cache)
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
          rows.append(dict(check="decode step", cache=label, context=context, batch=batch, error=one_line(e)))
  return rows


def summary(rows: list[dict]) -> list[str]:
  cells = []
  for r in rows:
    if r.get("check") == "kivi kernel":
      cells.append((f"KIVI-{r['bits']} kernel vs reference", r["context"], r["batch"], f"error {r['max_error']:.2g}"))
    elif "ms" in r:
      cells.append(
        (
          r["cache"],
          r["context"],
          r["batch"],
          f"{r['ms']:.2f}",
          f"{r['tok_s']:.0f}",
          f"{r['cache_bytes'] / 1e6:.0f}",
          f"{fmt(r['vs_dense'], '.2f')}x",
        )
      )
    else:
      cells.append(
        (r.get("cache", "-"), r.get("context", "-"), r.get("batch", "-"), r.get("error") or r.get("skipped"))
      )
  header = ("cache", "context", "batch", "step ms", "tok/s", "cache MB", "vs dense")
  return common.markdown_table(header, (c + ("",) * (len(header) - len(c)) for c in cells))


def failures(rows: list[dict]) -> list[str]:
  return [
    f"long_context {r.get('check')} {r.get('cache', '')} {r.get('bits', '')}: {r.get('error', 'error above tolerance')}"
    for r in rows
    if r.get("error") or (r.get("check") == "kivi kernel" and not r.get("ok"))
  ]
