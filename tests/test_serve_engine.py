"""The continuous-batching engine on the dense cache (a row of max_seq_len positions per slot;
the paged cache, the default, has tests/test_serve_paged.py) against `Generator` (an independent
static-batch path): exact tokens under concurrency, one compile per program whatever the request
mix, chunked prefill interleaved with decoding, stops, cancellation, the waiting-queue bound,
per-request failure, quantized / bf16 / GGUF-as-stored models and a tensor-parallel mesh."""

import asyncio
import threading
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_gguf
from serving import EOS, byte_tokenizer, tiny_model

import jaxeff
from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.generate import Generator, SamplingParams
from jaxeff.inference.cache import Dense, Paged
from jaxeff.inference.sampling import SamplingShape, row_values, sample
from jaxeff.serve import Engine, QueueFullError

MAX_LEN = 160


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def engine(model):
  with Engine(
    model, byte_tokenizer(), max_batch=3, max_seq_len=MAX_LEN, prefill_chunk=32, max_waiting=32, kv_cache=Dense()
  ) as e:
    # Every bucket: rows {1, 2, 3} x spans {128, 160} decode; prefill 16 and 32 at span 128, 32 at 160.
    assert e.warm_up() == 9 and len(e.traces) == 9
    yield e


@pytest.fixture(scope="module")
def reference(model):
  return Generator(model, max_batch=1, max_seq_len=MAX_LEN)


def assert_compiled_once_per_bucket(engine):
  """Programs: decode per (rows, attention span) bucket, prefill per (chunk, span); none twice."""
  assert engine.traces and all(n == 1 for n in engine.traces.values()), engine.traces
  rows = {min(engine.max_batch, 1 << k) for k in range(engine.max_batch.bit_length() + 1)}
  spans = {min(engine.max_seq_len, engine.min_kv_bucket << k) for k in range(8)}
  for key in engine.traces:
    if key[0] == "decode":
      _, size, span, shape = key
      assert size in rows, key
    else:
      _, n, size, span, shape = key
      assert key[0] == "prefill" and n == 1 and size in (16, 32), key
    assert span in spans and shape == SamplingShape.any(), key


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, n).tolist() for n in lengths]


# Greedy, and sampled with every filter in different mixes: one decode program for all of them.
SETTINGS = [
  {},
  dict(temperature=0.9, seed=3),
  dict(temperature=0.7, top_k=20, seed=4),
  dict(temperature=1.1, top_p=0.8, seed=5),
  dict(temperature=0.8, min_p=0.1, top_k=50, top_p=0.95, seed=6),
]


def test_concurrent_requests_get_exactly_what_they_get_alone(engine, reference):
  prompts = _prompts(0, [3, 17, 40, 5, 90, 33, 9, 64, 12, 1])
  settings = [SETTINGS[i % len(SETTINGS)] for i in range(len(prompts))]
  max_tokens = [12, 20, 7, 30, 15, 9, 25, 11, 18, 6]
  expected = [
    reference.generate([p], max_new_tokens=n, stop_tokens=(), **{"seed": 0, **s})
    for p, n, s in zip(prompts, max_tokens, settings)
  ]
  results = [None] * len(prompts)

  def client(i):
    time.sleep(0.01 * (i % 4))  # arrivals spread over the first decode steps
    request = engine.submit(prompts[i], max_tokens=max_tokens[i], stop_tokens=(), **{"seed": 0, **settings[i]})
    results[i] = request.result(timeout=120)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == [e[0] for e in expected]
  assert engine.totals.running_peak == 3  # all 3 slots ran at once
  # 10 requests through 3 slots, five sampling mixes, prompts of 1-90 tokens (chunks of 32 and
  # padded 16/32 tails): each program compiled once, one per shape bucket (all by the warm-up),
  # none per request mix.
  assert_compiled_once_per_bucket(engine)
  assert len(engine.traces) == 9
  # A seeded sampled request repeats.
  again = engine.submit(prompts[1], max_tokens=max_tokens[1], stop_tokens=(), **{"seed": 0, **settings[1]})
  assert again.result(timeout=60) == results[1]


def test_one_sampler_for_one_row_or_many():
  """A batch of rows with mixed settings (the engine's program shape) samples each row exactly as
  that row alone with its own program shape: same filters, same order, same draw."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(len(SETTINGS), 50)) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(1), len(SETTINGS))
  params = [SamplingParams(s.get("temperature", 0.0), s.get("top_k"), s.get("top_p"), s.get("min_p")) for s in SETTINGS]
  draw = jax.jit(sample, static_argnums=2)  # one program per shape, not op by op
  mixed = draw(logits, keys, SamplingShape.any(), row_values(params))
  for i, p in enumerate(params):
    for trial in range(6):  # several keys: the same draw, not just the same support
      key = jax.random.fold_in(keys[i], trial)
      want = draw(logits[i : i + 1], key[None], p.static, p.rows(1))
      got = draw(logits[i : i + 1], key[None], SamplingShape.any(), row_values([p]))
      assert int(got[0]) == int(want[0]), (p, trial)
    assert int(mixed[i]) == int(draw(logits[i : i + 1], keys[i][None], p.static, p.rows(1))[0])


def test_stop_token_ends_a_request_and_frees_its_slot(engine, reference):
  prompt = _prompts(1, [10])[0]
  free = reference.generate([prompt], max_new_tokens=8)[0]
  stop = free[3]
  cut = free[: free.index(stop)]
  request = engine.submit(prompt, max_tokens=8, stop_tokens=[stop])
  assert request.result(timeout=60) == cut and request.finish_reason == "stop"
  request = engine.submit(prompt, max_tokens=5, stop_tokens=[EOS])
  assert request.result(timeout=60) == free[:5] and request.finish_reason == "length"
  assert engine.num_running == 0


def test_chunked_prefill_interleaves_with_decoding(engine, model):
  """While a 150-token prompt is prefilled in 5 chunks, a running request gets a token between
  every two chunks (its inter-token latency is bounded by one chunk, not the whole prompt)."""
  running = engine.submit([1, 2, 3], max_tokens=100, stop_tokens=())
  for _ in running:  # wait until it decodes
    break
  counts = []
  prefill = engine.runner.prefill

  def recording(*args, **kwargs):
    counts.append(len(running.tokens))
    return prefill(*args, **kwargs)

  engine.runner.prefill = recording
  try:
    long = engine.submit(_prompts(2, [150])[0], max_tokens=4, stop_tokens=())
    long.result(timeout=60)
  finally:
    engine.runner.prefill = prefill
  running.cancel()
  assert len(counts) == 5
  assert all(b > a for a, b in zip(counts, counts[1:])), counts


def test_cancel_frees_the_slot_within_a_step(model):
  with Engine(model, max_batch=1, max_seq_len=MAX_LEN, max_waiting=1, kv_cache=Dense()) as engine:
    first = engine.submit([5, 6, 7], max_tokens=150)
    for _ in first:
      break
    waiting = engine.submit([8, 9], max_tokens=3)
    with pytest.raises(QueueFullError, match="max_waiting=1"):
      engine.submit([1], max_tokens=3)
    at_cancel = len(first.tokens)
    first.cancel()
    assert waiting.result(timeout=60) and waiting.finish_reason == "length"
    # It left at the next scheduler iteration: at most the step already running added a token.
    assert first.finish_reason == "cancelled" and len(first.tokens) <= at_cancel + 1
    cancelled_waiting = engine.submit([1], max_tokens=3)
    cancelled_waiting.cancel()
    assert engine.submit([2], max_tokens=2).result(timeout=60)
    assert cancelled_waiting.finish_reason == "cancelled"


def test_a_failing_request_fails_alone(engine, reference):
  prompts = _prompts(3, [8, 20, 30])
  boom = np.array([255, 255, 255, 255])
  prefill = engine.runner.prefill

  def failing(tokens, **kwargs):
    if np.array_equal(np.asarray(tokens)[0, :4], boom):
      raise RuntimeError("injected failure")
    return prefill(tokens, **kwargs)

  engine.runner.prefill = failing
  try:
    good = [engine.submit(p, max_tokens=10, stop_tokens=()) for p in prompts]
    bad = engine.submit(boom.tolist() + [1, 2], max_tokens=10, stop_tokens=())
    more = [engine.submit(p, max_tokens=6, stop_tokens=()) for p in prompts]
    with pytest.raises(RuntimeError, match="injected"):
      bad.result(timeout=60)
    assert bad.finish_reason == "error"
    for p, r in zip(prompts, good):
      assert r.result(timeout=60) == reference.generate([p], max_new_tokens=10)[0]
    for p, r in zip(prompts, more):
      assert r.result(timeout=60) == reference.generate([p], max_new_tokens=6)[0]
  finally:
    engine.runner.prefill = prefill


def test_bad_requests_are_refused_with_a_message(engine):
  cases = [
    (dict(prompt=[], max_tokens=2), "empty"),
    (dict(prompt=[1, 300], max_tokens=2), r"outside \[0, 264\)"),
    (dict(prompt=[1], max_tokens=0), "max_tokens must be a positive integer"),
    (dict(prompt=[1] * 150, max_tokens=20), "leaves room for 10 new tokens, not max_tokens=20"),
    (dict(prompt=[1], max_tokens=2, temperature=-1), "temperature"),
    (dict(prompt=[1], max_tokens=2, top_p=0), "top_p"),
    (dict(prompt=[1], max_tokens=2, stop_tokens=list(range(17))), "at most 16 stop tokens"),
  ]
  for kwargs, message in cases:
    with pytest.raises(GenerationError, match=message):
      engine.submit(kwargs.pop("prompt"), **kwargs)
  assert engine.submit("hi", max_tokens=2, stop_tokens=()).result(timeout=60)  # text, through its tokenizer


def test_async_stream_yields_tokens_as_they_come(engine, reference):
  prompt = _prompts(4, [11])[0]

  async def consume():
    request = engine.submit(prompt, max_tokens=9, stop_tokens=())  # inside the loop: an async stream
    return request, [t async for t in request]

  request, tokens = asyncio.run(consume())
  assert tokens == reference.generate([prompt], max_new_tokens=9)[0]
  assert len(request.token_times) == 9 and request.token_times == sorted(request.token_times)


@pytest.mark.slow
def test_quantized_bf16_and_gguf_as_stored_models(model, tmp_path, monkeypatch):
  prompts = _prompts(5, [6, 25, 40])
  int8 = jaxeff.quantize(model, bits=8)
  bf16 = tiny_model(dtype="bfloat16", param_dtype="bfloat16")
  models = {"int8": int8, "bf16": bf16}
  monkeypatch.setenv("JAXEFF_CACHE_DIR", str(tmp_path / "cache"))
  path = tiny_gguf.write_gguf(
    tmp_path / "q8.gguf", tiny_gguf.hf_tiny("llama"), "llama", quant=gguf.GGMLQuantizationType.Q8_0
  )
  models["gguf"] = jaxeff.load(path, quant="gguf")[0]
  for name, m in models.items():
    ref = Generator(m, max_batch=1, max_seq_len=64)
    expected = [ref.generate([p], max_new_tokens=8)[0] for p in prompts]
    for policy in (Dense(), Paged(block_size=8))[: 1 if name == "int8" else 2]:  # ragged steps: bf16, GGUF
      with Engine(m, max_batch=2, max_seq_len=64, prefill_chunk=16, kv_cache=policy) as engine:
        got = engine.generate(prompts, max_tokens=8)
      assert got == expected, (name, policy.name)


def test_tensor_parallel_slots_on_a_mesh(model, reference):
  mesh = sharding.make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
  prompts = _prompts(6, [7, 30, 19, 44])
  with Engine(model, max_batch=4, max_seq_len=MAX_LEN, mesh=mesh, kv_cache=Dense()) as engine:
    k = engine.runner.cache.layer(0)[0]
    assert k.sharding.spec[:2] == ("data", "tensor"), k.sharding  # rows over data, kv heads over tensor
    got = engine.generate(prompts, max_tokens=10, stop_tokens=())
  assert got == [reference.generate([p], max_new_tokens=10)[0] for p in prompts]
