"""StreamingLLM's sinks + window ring cache: dense attention when the budget covers the text, the
paper's cache-relative positions against an independent reference, flat memory and one program
over thousands of decode steps, sinks never evicted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.config import ModelConfig
from jaxeff.generate import GenerationError
from jaxeff.inference import StreamingLLM, perplexity
from jaxeff.models import Llama


def init_ring_cache(cfg, batch, *, sinks, window):
  return StreamingLLM(sinks=sinks, window=window).init(cfg, batch)


CFG = ModelConfig(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  initializer_range=0.3,
)
TOKENS = np.random.default_rng(0).integers(0, 64, 150)


@pytest.fixture(scope="module")
def model():
  return Llama(CFG, rngs=nnx.Rngs(0))


forward = nnx.jit(lambda m, t, p, c: m.forward_with_cache(t, p, c))


def test_budget_covering_the_text_is_dense_attention(model):
  full = np.asarray(model(TOKENS[None].astype(np.int32)))[0]
  cache = init_ring_cache(CFG, 1, sinks=4, window=len(TOKENS) - 4)
  got = []
  for start in range(0, len(TOKENS), 50):  # chunks
    chunk = TOKENS[None, start : start + 50].astype(np.int32)
    x, cache = forward(model, chunk, np.arange(start, start + chunk.shape[1])[None], cache)
    got.append(np.asarray(model.logits(x))[0])
  np.testing.assert_allclose(np.concatenate(got), full, atol=1e-4, rtol=1e-4)
  lp = jax.nn.log_softmax(full[:-1], axis=-1)
  want = float(np.exp(-np.mean(np.take_along_axis(np.asarray(lp), TOKENS[1:, None], axis=-1))))
  covered = StreamingLLM(sinks=4, window=len(TOKENS) - 4)
  assert perplexity(model, TOKENS, kv_cache=covered, chunk=32) == pytest.approx(want, rel=1e-4)
  assert perplexity(model, TOKENS, chunk=32) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("chunk", [1, 8])
def test_cache_relative_positions_match_a_forward_over_the_kept_tokens(chunk):
  """One layer: a token's keys and values depend only on itself and its position, so the last
  token's logits through a full ring == a plain forward over the kept tokens (sinks, then the
  window) at positions 0..sinks + window - 1: the paper's cache-relative scheme."""
  one = Llama(ModelConfig(**{**CFG.__dict__, "num_layers": 1}), rngs=nnx.Rngs(1))
  sinks, window, n = 3, 12, 61
  cache = init_ring_cache(one.cfg, 1, sinks=sinks, window=window)
  for start in range(0, n, chunk):
    toks = TOKENS[None, start : min(start + chunk, n)].astype(np.int32)
    x, cache = forward(one, toks, np.arange(start, start + toks.shape[1])[None], cache)
  kept = np.concatenate([TOKENS[:sinks], TOKENS[n - window : n]])[None].astype(np.int32)
  want = np.asarray(one(kept))[0, -1]
  np.testing.assert_allclose(np.asarray(one.logits(x))[0, -1], want, atol=1e-4, rtol=1e-4)
  # Without the cache-relative shift (absolute positions) the logits differ: the check can fail.
  absolute = np.asarray(one(kept, positions=np.r_[0:sinks, n - window : n][None]))[0, -1]
  assert np.abs(absolute - want).max() > 1e-3


def test_thousands_of_steps_wrap_with_flat_memory_and_one_program(model):
  sinks, window, steps = 4, 16, 2000
  traces = []

  @jax.jit
  def step(state, cache, tok, pos):
    traces.append(1)
    x, cache = nnx.merge(graphdef, state).forward_with_cache(tok, pos, cache)
    return jnp.argmax(nnx.merge(graphdef, state).logits(x[:, -1]), -1).astype(jnp.int32)[:, None], cache

  graphdef, state = nnx.split(model)
  cache = init_ring_cache(CFG, 2, sinks=sinks, window=window)
  nbytes = cache.nbytes
  tok = jnp.asarray([[1], [2]], jnp.int32)
  for t in range(steps):
    tok, cache = step(state, cache, tok, jnp.full((2, 1), t, jnp.int32))
    if t in (3, 19, 20, 1234):
      slots = np.asarray(cache.rows[0])  # each slot's absolute position
      assert (slots[:, :sinks] == np.arange(sinks)).all()  # sinks never evicted
      held = sorted(slots[0, sinks:][slots[0, sinks:] >= 0].tolist())
      assert held == list(range(max(sinks, t - window + 1), t + 1))  # the last `window` positions
  assert len(traces) == 1 and cache.nbytes == nbytes
  assert np.isfinite(np.asarray(cache.layer(0)[0])).all()


def test_sinks_help_past_the_window(model):
  """The paper's point, on a tiny model: a window without sinks drifts further from dense."""
  dense = perplexity(model, TOKENS, chunk=16)
  with_sinks = perplexity(model, TOKENS, kv_cache=StreamingLLM(sinks=4, window=28), chunk=16)
  window_only = perplexity(model, TOKENS, kv_cache=StreamingLLM(sinks=0, window=32), chunk=16)
  assert abs(with_sinks - dense) < abs(window_only - dense)


def test_bad_input(model):
  cache = init_ring_cache(CFG, 1, sinks=2, window=8)
  with pytest.raises(ValueError, match="at most 8 tokens"):
    forward(model, np.zeros((1, 9), np.int32), np.arange(9)[None], cache)
  with pytest.raises(GenerationError, match="sinks >= 0"):
    StreamingLLM(sinks=-1)
  with pytest.raises(GenerationError, match="at least 2 tokens"):
    perplexity(model, [3])
  with pytest.raises(GenerationError, match="token ids"):
    perplexity(model, [3, 99])


# ---------------------------------------------------------------- through the Generator


def test_generator_with_a_covering_window_equals_dense(model):
  from jaxeff.generate import Generator

  prompts = [TOKENS[:9].tolist(), TOKENS[20:45].tolist(), TOKENS[50:53].tolist()]
  dense = Generator(model, max_batch=4, max_seq_len=96).generate(prompts, max_new_tokens=40)
  ring = Generator(model, max_batch=4, max_seq_len=96, kv_cache=StreamingLLM(sinks=4, window=92))
  assert ring.generate(prompts, max_new_tokens=40) == dense
  assert [r[:8] for r in ring.generate(prompts, max_new_tokens=8)] == [r[:8] for r in dense]  # a second request
  stream = list(ring.stream(prompts, max_new_tokens=40))
  assert [[s[i] for s in stream if s[i] is not None] for i in range(3)] == dense


def test_generator_runs_past_max_seq_len_in_flat_memory_and_prefills_long_prompts_in_chunks():
  from jaxeff.generate import Generator

  one = Llama(ModelConfig(**{**CFG.__dict__, "num_layers": 1}), rngs=nnx.Rngs(1))
  policy = StreamingLLM(sinks=2, window=16)
  gen = Generator(one, max_batch=2, max_seq_len=32, kv_cache=policy)
  assert gen.cache_bytes == policy.cache_bytes(one.cfg, 2)
  prompt = TOKENS[:50].tolist()  # longer than the window: prefilled in chunks of 16
  out = gen.generate([prompt, prompt[:7]], max_new_tokens=100)
  assert [len(o) for o in out] == [100, 100]
  # The first new token after the long prompt: the one-layer model over the kept tokens.
  kept = np.asarray(prompt[:2] + prompt[-16:], np.int32)[None]
  assert out[0][0] == int(np.argmax(np.asarray(one(kept))[0, -1]))
  prefills = {k: v for k, v in gen.traces.items() if k[0] == "prefill"}
  assert [k[2] for k in prefills] == [16] and set(prefills.values()) == {1}  # 4 chunks, one program
  assert sum(1 for k in gen.traces if k[0] == "decode_loop") == 1
