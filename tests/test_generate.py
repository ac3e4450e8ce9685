"""jaxeff.generate on tiny random models: greedy == a full-forward reference, sampling filters,
ragged batches, stop tokens, compile counts, sharded, quantized and bf16 generation."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxeff
from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.generate import GenerationError, Generator, SamplingParams, generate, prefill_bucket
from jaxeff.inference import sampling as sampling_lib
from jaxeff.models import Llama

# Larger-than-default init so logits are peaked: greedy comparisons then have no near-ties.
CFG = ModelConfig(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  initializer_range=0.15,
)
PROMPTS = [[5, 17, 3, 88, 41], [7, 8], [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11]]


# One sampled configuration for every sampling test, so its programs compile once per module.
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02)


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gen(model):
  return Generator(model, max_batch=4, max_seq_len=32)


@pytest.fixture(scope="module")
def host_gen(model):
  return Generator(model, max_batch=4, max_seq_len=32, loop="host")


def reference_greedy(model, prompt, n, width=32):
  """Full forward over the whole sequence for every new token (no cache), argmax at the last position."""
  forward = nnx.jit(lambda m, t: m(t))
  seq = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, width), np.int32)  # causal: the padding after the sequence changes nothing
    padded[0, : len(seq)] = seq
    seq.append(int(np.argmax(np.asarray(forward(model, padded))[0, len(seq) - 1])))
  return seq[len(prompt) :]


@pytest.fixture(scope="module")
def reference(model):
  return [reference_greedy(model, p, 8) for p in PROMPTS]


@pytest.mark.parametrize("loop", ["device", "host"])
def test_greedy_matches_full_forward_reference(gen, host_gen, reference, loop):
  g = gen if loop == "device" else host_gen
  assert g.generate(PROMPTS, max_new_tokens=8) == reference
  assert g.stats.new_tokens == 24 and g.stats.decode_tokens == 21 and g.stats.prompt_tokens == 18


def test_ragged_batch_equals_each_prompt_alone(gen):
  for kw in (dict(), dict(SAMPLED, seed=5)):
    batch = gen.generate(PROMPTS, max_new_tokens=6, **kw)
    alone = [gen.generate([p], max_new_tokens=6, **kw)[0] for p in PROMPTS]
    assert batch == alone
  # Per-prompt seeds: row i gets what it gets alone with seed i.
  batch = gen.generate(PROMPTS, max_new_tokens=6, seed=[0, 1, 2], **SAMPLED)
  assert batch == [gen.generate([p], max_new_tokens=6, seed=s, **SAMPLED)[0] for s, p in enumerate(PROMPTS)]


def test_seeded_sampling_repeats_and_host_equals_device(gen, host_gen, reference):
  kw = dict(max_new_tokens=8, seed=3, **SAMPLED)
  a, b = gen.generate(PROMPTS, **kw), gen.generate(PROMPTS, **kw)
  assert a == b == host_gen.generate(PROMPTS, **kw)
  assert a != gen.generate(PROMPTS, **{**kw, "seed": 4})
  assert a != reference  # it does sample


def test_stop_tokens_end_each_row_on_its_own(gen, host_gen, reference):
  stop = reference[0][3]  # row 0 stops before its 4th token; the others stop at their first `stop`, if any
  out = gen.generate(PROMPTS, max_new_tokens=8, stop_tokens=[stop, 95])
  for row, ref in zip(out, reference):
    want = ref[: ref.index(stop)] if stop in ref else ref
    want = want[: want.index(95)] if 95 in want else want
    assert row == want
  assert len(out[0]) == 3
  # The host loop (stream) agrees, and yields None for stopped rows.
  steps = list(host_gen.stream(PROMPTS, max_new_tokens=8, stop_tokens=[stop, 95]))
  streamed = [[s[i] for s in steps if s[i] is not None] for i in range(len(PROMPTS))]
  assert streamed == out
  assert steps[3][0] is None


def test_stream_yields_one_token_per_row_per_step(host_gen, reference):
  steps = list(host_gen.stream(PROMPTS[:2], max_new_tokens=5))
  assert len(steps) == 5 and all(len(s) == 2 for s in steps)
  assert [list(t) for t in zip(*steps)] == [r[:5] for r in reference[:2]]


def test_one_call_generate_compiles_once_across_calls(model, reference):
  """Defect: the one-call form built a new Generator, so every call compiled again. Calls with the
  same model graph and prompts in the same buckets now reuse one Generator's programs, serving the
  model's current weights."""
  assert generate(model, PROMPTS, 5) == [r[:5] for r in reference]
  with CompileCounter() as counter:
    assert generate(model, PROMPTS, 5) == [r[:5] for r in reference]
    assert generate(model, [p[:-1] for p in PROMPTS], 4)[0][0] >= 0  # other lengths, same buckets
  assert sum(counter.names.values()) == 0, counter.names
  # New weights of the same shapes: same programs, new tokens.
  graphdef, state = nnx.split(model)
  other = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, state))
  with CompileCounter() as counter:
    got = generate(other, PROMPTS, 5)
  assert sum(counter.names.values()) == 0, counter.names
  assert got == Generator(other, max_batch=4, max_seq_len=32).generate(PROMPTS, max_new_tokens=5)


class CompileCounter:
  """Counts XLA lowerings (each is a jit cache miss) through jax's public monitoring events."""

  EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

  def __init__(self):
    self.names = collections.Counter()

  def __call__(self, event, duration, **kwargs):
    if event == self.EVENT:
      self.names[kwargs.get("fun_name", "?")] += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_no_recompilation_within_a_prefill_bucket(model, reference):
  gen = Generator(model, max_batch=2, max_seq_len=64)
  # Three prompts on max_batch=2: served in two chunks. Compiles prefill (bucket 16) and the decode loop.
  assert gen.generate(PROMPTS, max_new_tokens=4) == [r[:4] for r in reference]
  traces = dict(gen.traces)
  greedy = SamplingParams().static
  assert traces == {("prefill", 2, 16, None, greedy): 1, ("decode_loop", greedy): 1}
  with CompileCounter() as counter:
    gen.generate([[7] * 9, [3] * 14], max_new_tokens=6)  # other lengths, same bucket, other new tokens
    gen.generate([[2]], max_new_tokens=3, temperature=0.0)
  assert sum(counter.names.values()) == 0, counter.names
  assert dict(gen.traces) == traces
  with CompileCounter() as counter:  # a longer prompt: exactly one new program (the 32-token prefill)
    gen.generate([[4] * 20], max_new_tokens=2)
  assert sum(counter.names.values()) == 1 and gen.traces["prefill", 2, 32, None, greedy] == 1, counter.names
  gen.generate([[1, 2]], max_new_tokens=3, temperature=0.5, top_p=0.8, seed=1)
  with CompileCounter() as counter:  # other temperature / top-p values: same programs
    gen.generate([[1, 2]], max_new_tokens=3, temperature=1.5, top_p=0.3, seed=2)
  assert sum(counter.names.values()) == 0, counter.names
  assert gen.traces["decode_loop", SamplingParams(1.0, None, 0.5).static] == 1


def test_stream_compiles_prefill_and_decode_once(model):
  """The host loop's second call (and its second step) reuse the first call's programs: the
  cache and positions keep the same committed placement they come back with."""
  graphdef, state = nnx.split(model)
  placed = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))  # committed, as hf.load places it
  gen = Generator(placed, max_batch=1, max_seq_len=32)
  with CompileCounter() as counter:
    list(gen.stream([[5, 6, 7]], max_new_tokens=2))  # one decode step
  first = sum(counter.names.values())
  with CompileCounter() as counter:
    list(gen.stream([[1, 2]], max_new_tokens=6))  # five decode steps, outputs fed back
  assert first >= 2 and sum(counter.names.values()) == 0, counter.names


def test_prefill_buckets():
  assert [prefill_bucket(n, 512) for n in (1, 16, 17, 100, 300, 500)] == [16, 16, 32, 128, 512, 512]
  assert prefill_bucket(40, 48) == 48


def test_cache_buffers_are_donated_and_reused(gen):
  gen.generate([[1, 2, 3]], max_new_tokens=3)
  old = jax.tree.leaves(gen.runner.cache)[0]
  gen.generate([[1, 2, 3]], max_new_tokens=3)
  assert old.is_deleted()  # donated: XLA wrote the new cache into its buffer


# ---------------------------------------------------------------- sampling filters


def _np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_filters_keep_exactly_the_right_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
  logits[1, [3, 7, 9]] = logits[1].max() + 1.0  # a three-way tie at the top
  logits[2, :] = 0.0  # all equal
  for k in (1, 3, 10, 50):
    got = np.isfinite(np.asarray(sampling_lib.top_k_filter(jnp.asarray(logits), k)))
    for row, kept in zip(logits, got):
      assert set(np.flatnonzero(kept)) == set(np.flatnonzero(row >= np.sort(row)[::-1][k - 1]))
  for p in (0.05, 0.3, 0.9, 1.0):
    got = np.isfinite(np.asarray(sampling_lib.top_p_filter(jnp.asarray(logits), jnp.float32(p))))
    for row, kept in zip(logits, got):
      probs = _np_softmax(row.astype(np.float64))
      order = np.argsort(-probs, kind="stable")
      mass_before = np.cumsum(probs[order]) - probs[order]
      n = len(row) if p >= 1 else max(1, int(np.sum(mass_before < p)))  # smallest prefix with mass >= p
      want = set(np.flatnonzero(row >= row[order[n - 1]]))  # ties at the threshold stay
      assert set(np.flatnonzero(kept)) == want, (p, row)
  for m in (0.0, 0.1, 0.5, 1.0):
    got = np.isfinite(np.asarray(sampling_lib.min_p_filter(jnp.asarray(logits), jnp.float32(m))))
    for row, kept in zip(logits, got):
      probs = _np_softmax(row.astype(np.float64))
      assert set(np.flatnonzero(kept)) == set(np.flatnonzero(probs >= m * probs.max() - 1e-7))


def test_sampling_follows_the_filtered_distribution():
  logits = jnp.asarray(np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05])), jnp.float32)[None].repeat(4000, 0)
  keys = jax.random.split(jax.random.key(0), 4000)
  params = SamplingParams(temperature=1.0, top_k=3)
  draws = np.asarray(sampling_lib.sample(logits, keys, params.static, params.rows(4000)))
  freq = np.bincount(draws, minlength=5) / draws.size
  np.testing.assert_allclose(freq, [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], atol=0.03)
  hot = SamplingParams(temperature=2.0)
  draws = np.asarray(sampling_lib.sample(logits, keys, hot.static, hot.rows(4000)))
  want = _np_softmax(np.log([0.4, 0.3, 0.15, 0.1, 0.05]) / 2.0)
  np.testing.assert_allclose(np.bincount(draws, minlength=5) / draws.size, want, atol=0.03)


def test_bad_sampling_settings():
  for kw, match in [
    (dict(temperature=-1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=2.0), "min_p"),
  ]:
    with pytest.raises(ValueError, match=match):
      SamplingParams(**kw)


def test_bad_requests(model):
  gen = Generator(model, max_batch=2, max_seq_len=16)  # nothing compiles: every request is refused first
  cases = [
    ([], "non-empty"),
    ([[]], "empty"),
    ([[1, 2, 500]], "outside"),
    ([[1] * 14], "at most 2 new tokens fit"),
    ([1, 2, 3], "list of token ids"),
  ]
  for prompts, match in cases:
    with pytest.raises(GenerationError, match=match):
      gen.generate(prompts, max_new_tokens=4)
  with pytest.raises(GenerationError, match="max_new_tokens"):
    gen.generate([[1]], max_new_tokens=0)
  with pytest.raises(GenerationError, match="at most max_batch"):
    list(gen.stream([[1], [2], [3]], max_new_tokens=2))
  with pytest.raises(GenerationError, match="stop tokens"):
    gen.generate([[1]], max_new_tokens=2, stop_tokens=list(range(20)))
  with pytest.raises(GenerationError, match="seed"):
    gen.generate([[1], [2]], max_new_tokens=2, seed=[1, 2, 3])


# ---------------------------------------------------------------- quantized, bf16, sharded


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32)])
def test_quantized_model_generates(model, bits, group_size):
  qmodel = jaxeff.quantize(model, bits=bits, group_size=group_size)
  assert type(qmodel.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
  out = Generator(qmodel, max_batch=4, max_seq_len=32).generate(PROMPTS, max_new_tokens=5)
  assert out == [reference_greedy(qmodel, p, 5) for p in PROMPTS]


def test_bf16_generation_close_to_f32(model, reference):
  # The f32 model's weights rounded to bf16, bf16 math.
  bf16 = nnx.eval_shape(
    lambda: Llama(dataclasses.replace(CFG, dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
  )
  nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model)))
  gen = Generator(bf16, max_batch=4, max_seq_len=32)
  assert jax.tree.leaves(gen.runner.cache)[0].dtype == jnp.bfloat16
  out = gen.generate(PROMPTS, max_new_tokens=6)
  assert [len(r) for r in out] == [6, 6, 6]
  # bf16 weights and math: the same model up to rounding, so the greedy tokens mostly agree with f32's.
  agree = sum(a == b for o, r in zip(out, reference) for a, b in zip(o, r))
  assert agree >= 12, (out, reference)


def test_tensor_parallel_decode_equals_one_device():
  cfg = dataclasses.replace(CFG, num_heads=16, num_kv_heads=8, hidden_size=128, intermediate_size=256, vocab_size=128)
  model = Llama(cfg, rngs=nnx.Rngs(1))
  mesh = sharding.make_mesh({"tensor": 8})
  want = Generator(model, max_batch=4, max_seq_len=32).generate(PROMPTS, max_new_tokens=8)
  sharded = sharding.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(1)), mesh)
  tensor_cols = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
  assert sharded.layers[0].self_attn.k_proj.kernel[...].sharding.is_equivalent_to(tensor_cols, 2)
  gen = Generator(sharded, max_batch=4, max_seq_len=32, mesh=mesh)
  cache_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
  assert all(x.sharding.is_equivalent_to(cache_spec, 4) for x in jax.tree.leaves(gen.runner.cache))
  assert gen.generate(PROMPTS, max_new_tokens=8) == want
  host = Generator(sharded, max_batch=4, max_seq_len=32, mesh=mesh, loop="host")
  assert host.generate(PROMPTS, max_new_tokens=8) == want
