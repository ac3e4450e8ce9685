"""The serving engine on the paged cache (its default) against `Generator` on the dense cache (an
independent static path): exact tokens with and without prefix caching for requests that share
none, some or all of their prompt blocks; preemption when the pool is too small for the load (no
request lost or duplicated); ragged steps that prefill several prompts at once, compiled once
per bucket; the pool on a tensor-parallel mesh."""

import threading

import jax
import numpy as np
import pytest
from serving import tiny_model

from jaxeff import sharding
from jaxeff.errors import GenerationError
from jaxeff.generate import Generator
from jaxeff.inference.cache import Dense, Paged
from jaxeff.serve import Engine

MAX_LEN = 128
BLOCK = 8


@pytest.fixture(scope="module")
def model():
  return tiny_model(dtype="float32")


@pytest.fixture(scope="module")
def reference(model):
  gen = Generator(model, max_batch=1, max_seq_len=MAX_LEN)
  cache = {}

  def greedy(prompt, n, **settings):
    key = (tuple(prompt), n, tuple(sorted(settings.items())))
    if key not in cache:
      cache[key] = gen.generate([prompt], max_new_tokens=n, stop_tokens=(), **{"seed": 0, **settings})[0]
    return cache[key]

  return greedy


def _shared_prefix_prompts(seed):
  """Prompts sharing none, some (2 blocks) and all of their blocks with a 40-token system prompt."""
  rng = np.random.default_rng(seed)
  system = rng.integers(0, 256, 40).tolist()
  return [
    system + rng.integers(0, 256, 9).tolist(),
    system[:16] + rng.integers(0, 256, 30).tolist(),  # 2 blocks shared
    rng.integers(0, 256, 25).tolist(),  # nothing shared
    system + rng.integers(0, 256, 3).tolist(),
    list(system),  # exactly the system prompt: all its blocks but the last are reused
    system + rng.integers(0, 256, 17).tolist(),
  ]


def _run_concurrently(engine, prompts, max_tokens, settings):
  results = [None] * len(prompts)

  def client(i):
    request = engine.submit(prompts[i], max_tokens=max_tokens[i], stop_tokens=(), **{"seed": 0, **settings[i]})
    results[i] = (request.result(timeout=120), request)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefixes_give_the_same_tokens_with_and_without_prefix_caching(model, reference, prefix_caching):
  prompts = _shared_prefix_prompts(0)
  settings = [{}, dict(temperature=0.8, seed=3), {}, dict(temperature=0.9, top_k=20, seed=4), {}, {}]
  max_tokens = [12, 9, 15, 6, 10, 8]
  expected = [reference(p, n, **s) for p, n, s in zip(prompts, max_tokens, settings)]
  with Engine(
    model, max_batch=4, max_seq_len=MAX_LEN, prefill_chunk=16, kv_cache=Paged(block_size=BLOCK),
    prefix_caching=prefix_caching,
  ) as engine:  # fmt: skip
    engine.submit(prompts[0], max_tokens=2).result(timeout=60)  # the system prompt's blocks, cached
    got = _run_concurrently(engine, prompts, max_tokens, settings)
    assert [tokens for tokens, _ in got] == expected
    hits = [r.cached_tokens for _, r in got]
    if prefix_caching:
      assert hits[0] == 48 and hits[3] == hits[5] == 40 and hits[2] == 0  # prompt 0 ran before: 6 blocks
      assert hits[1] == 16 and hits[4] == 32  # 40 tokens: 5 blocks, the last recomputed
      assert engine.blocks.hit_tokens == 48 + 40 * 2 + 16 + 32
    else:
      assert hits == [0] * 6 and engine.blocks.hit_tokens == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block given back


def test_generated_text_is_cached_for_the_next_turn(model, reference):
  """A chat's next turn resends the reply: its blocks, written while decoding, are found."""
  prompt = _shared_prefix_prompts(1)[2]
  with Engine(model, max_batch=2, max_seq_len=MAX_LEN, kv_cache=Paged(block_size=BLOCK)) as engine:
    reply = engine.submit(prompt, max_tokens=20, stop_tokens=()).result(timeout=60)
    turn = prompt + reply + [7, 8, 9]
    second = engine.submit(turn, max_tokens=5, stop_tokens=())
    assert second.result(timeout=60) == reference(turn, 5)
    assert second.cached_tokens == (len(prompt) + 20 - 1) // BLOCK * BLOCK  # the last token never cached


def test_requests_sent_together_with_one_prompt_prefill_it_once(model, reference):
  """Four samples of one 60-token prompt arrive at once: one prefills it, the others wait for its
  blocks and reuse them (7 of 8 blocks each: the last is recomputed for the logits)."""
  prompt = np.random.default_rng(5).integers(0, 256, 60).tolist()
  with Engine(model, max_batch=4, max_seq_len=MAX_LEN, prefill_chunk=16, kv_cache=Paged(block_size=BLOCK)) as engine:
    requests = [engine.submit(prompt, max_tokens=5, temperature=0.8, seed=s, stop_tokens=()) for s in range(4)]
    out = [r.result(timeout=60) for r in requests]
    assert out == [reference(prompt, 5, temperature=0.8, seed=s) for s in range(4)]
    assert sorted(r.cached_tokens for r in requests) == [0, 56, 56, 56]
    assert engine.totals.prompt_tokens == 60 * 4


def test_a_pool_too_small_for_the_load_preempts_and_loses_nothing(model, reference):
  """Eight requests that need ~4x the pool: the newest give their blocks back and are recomputed
  later; every request ends once, with exactly its own tokens."""
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 256, n).tolist() for n in (30, 12, 45, 20, 8, 33, 25, 16)]
  max_tokens = [24, 30, 18, 26, 32, 20, 22, 28]
  policy = Paged(block_size=BLOCK)
  memory = 12 * policy.block_bytes(model.cfg)  # 12 blocks: 96 tokens for ~550 wanted
  with Engine(model, max_batch=6, max_seq_len=MAX_LEN, prefill_chunk=16, kv_cache=policy, kv_cache_memory=memory) as e:
    got = _run_concurrently(e, prompts, max_tokens, [{}] * 8)
    assert [tokens for tokens, _ in got] == [reference(p, n) for p, n in zip(prompts, max_tokens)]
    assert e.totals.preemptions > 0 and sum(r.preemptions for _, r in got) == e.totals.preemptions
    assert e.totals.requests_finished == {"length": 8} and e.totals.generated_tokens == sum(max_tokens)
    assert e.blocks.num_free == 12
    with pytest.raises(GenerationError, match="need 13 blocks.*12 in all"):
      e.submit([1] * 90, max_tokens=10)


@pytest.mark.parametrize("kernel", ["auto", "gather"])
def test_steps_pack_several_prompts_and_compile_once_per_bucket(model, reference, kernel):
  """Packed steps (the ragged op: one program per token-count bucket) and the gather path's ragged
  steps (one per decode rows x prompts x chunk bucket): warm-up compiles every program traffic
  uses, several prompts share steps, and the tokens are exact."""
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, n).tolist() for n in (5, 20, 11, 3, 26, 9)]
  with Engine(
    model, max_batch=4, max_seq_len=MAX_LEN, prefill_chunk=16, token_budget=40, max_prefill_rows=2,
    kv_cache=Paged(block_size=BLOCK, kernel=kernel), prefix_caching=False,
  ) as engine:  # fmt: skip
    assert engine.packed == (kernel == "auto")
    programs = engine.warm_up(full=True)
    warm = dict(engine.traces)
    name = "packed" if engine.packed else "step"
    assert len(warm) == programs and all(key[0] == name and n == 1 for key, n in warm.items())
    chunks = []
    engine.runner.packed_step = _recording(engine.runner.packed_step, chunks)

    def wave():
      requests = [engine.submit(p, max_tokens=6, stop_tokens=()) for p in prompts]  # all waiting at once
      return [r.result(timeout=60) for r in requests]

    assert wave() == [reference(p, 6) for p in prompts]
    assert wave() == [reference(p, 6) for p in prompts]
    assert engine.traces == warm  # traffic compiled nothing: every bucket was warmed
    if engine.packed:
      assert programs == 7  # tokens {1, 2, 4, 8, 16, 32, 40}, every mix of max_batch sequences
      assert max(q_lens.max() for q_lens in chunks) > 16  # a prompt's chunk is not cut to prefill_chunk
      assert max((q_lens > 1).sum() for q_lens in chunks) == 2  # two prompts in a step (max_prefill_rows)
      return
    layouts = [key[1] for key in engine.traces]
    assert any(layout.prefill >= 2 for layout in layouts)  # several prompts in one step
    for layout in layouts:  # buckets: powers of two, within the settings
      assert layout.decode in (0, 1, 2, 4) and layout.prefill in (0, 1, 2) and layout.chunk in (0, 16)
    assert programs == 11  # decode rows {1, 2, 4}, + a chunk of 16 for {0, 1, 2, 4} decode rows x {1, 2} prompts


def _recording(step, chunks):
  def record(*args, **kw):
    chunks.append(np.diff(kw["cu_q_lens"]))
    return step(*args, **kw)

  return record


def test_bad_settings_are_one_line_each(model):
  with pytest.raises(GenerationError, match="kv_cache_memory sizes the paged cache"):
    Engine(model, max_batch=1, max_seq_len=32, kv_cache=Dense(), kv_cache_memory=1 << 20)
  with pytest.raises(GenerationError, match="holds no block"):
    Engine(model, max_batch=1, max_seq_len=32, kv_cache=Paged(), kv_cache_memory=100)
  with pytest.raises(GenerationError, match="token_budget .6. must be at least max_batch .8."):
    Engine(model, max_batch=8, max_seq_len=32, kv_cache=Paged(), token_budget=6)
  mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
  with pytest.raises(GenerationError, match="shard over tensor only"):
    Engine(model, max_batch=2, max_seq_len=32, mesh=mesh, kv_cache=Paged())


def test_the_pool_on_a_tensor_parallel_mesh(model, reference):
  mesh = sharding.make_mesh({"tensor": 2}, devices=jax.devices()[:2])
  prompts = _shared_prefix_prompts(4)[:3]
  with Engine(model, max_batch=4, max_seq_len=MAX_LEN, mesh=mesh, kv_cache=Paged(block_size=BLOCK)) as engine:
    keys = engine.runner.cache.layer(0)[0]
    assert keys.sharding.spec[:2] == (None, "tensor"), keys.sharding  # every block, kv heads over tensor
    got = engine.generate(prompts, max_tokens=8, stop_tokens=())
  assert got == [reference(p, 8) for p in prompts]


def test_a_waiting_request_is_passed_over_at_most_max_passes_times(model):
  """Admission in arrival order: a request whose first chunk does not fit may be passed by later
  ones that do, `max_passes` times; then the later ones wait behind it. (The scheduler's admission
  called directly, with no thread running.)"""
  from jaxeff.serve.engine import Request, RequestParams

  policy = Paged(block_size=BLOCK)
  engine = Engine(
    model, max_batch=4, max_seq_len=MAX_LEN, prefill_chunk=64, kv_cache=policy,
    kv_cache_memory=10 * policy.block_bytes(model.cfg), max_passes=1, prefix_caching=False,
  )  # fmt: skip
  request = lambda i, n: Request(i, np.arange(n, dtype=np.int32) % 200, RequestParams(max_tokens=4))
  engine._waiting.append(request(0, 48))  # takes 6 of the 10 blocks
  engine._admit_paged()
  assert engine.num_running == 1 and engine.blocks.num_free == 4
  big, small = request(1, 40), [request(2, 8), request(3, 8)]  # 5 blocks; 1 block each
  engine._waiting.extend([big, *small])
  engine._admit_paged()
  assert [r.id for r in engine._waiting] == [1, 3] and big.passed_over == 1  # 2 passed it; 3 waits behind it
  engine._waiting.clear()
