"""The server's engine with every KV-cache policy, at budgets smaller than the text (they evict,
compress or quantize): each request gets under concurrency exactly what it gets alone, in the
cache's own bytes, and a free slot is emptied for the next request."""

import numpy as np
import pytest
from serving import tiny_model
from serving_exactness import MAX_TOKENS, alone, prompts, together

from jaxeff.generate import Generator
from jaxeff.inference import H2O, KIVI, SnapKV, StreamingLLM
from jaxeff.serve import Engine

POLICIES = {
  "streaming": StreamingLLM(sinks=4, window=28),
  "h2o": H2O(heavy=8, recent=8),
  "snapkv": SnapKV(budget=16, window=4, prefill_chunk=16),
  "kivi": KIVI(bits=4, group=8, residual=16),
}


@pytest.fixture(scope="module")
def model():
  return tiny_model(initializer_range=0.1)


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_is_exact_under_concurrency(model, name):
  policy = POLICIES[name]
  with Engine(model, max_batch=2, max_seq_len=64, prefill_chunk=16, kv_cache=policy) as engine:
    first = alone(engine, prompts())
    assert together(engine, prompts()) == first
    assert engine.cache_bytes == policy.cache_bytes(model.cfg, 2, 64)
    # The budget is below the text: the policy changed something (vs the dense cache's answer).
    dense = Generator(model, max_batch=1, max_seq_len=64)
    plain = [dense.generate([p], max_new_tokens=n)[0] for p, n in zip(prompts()[:4], MAX_TOKENS)]
    assert first[:4] != plain
    assert all(n == 1 for n in engine.traces.values())


def test_a_bounded_cache_serves_past_max_seq_len(model):
  """StreamingLLM's ring: a prompt plus new tokens longer than max_seq_len, in flat memory."""
  prompt = np.random.default_rng(3).integers(0, 256, 50).tolist()
  with Engine(model, max_batch=1, max_seq_len=32, prefill_chunk=16, kv_cache=StreamingLLM(4, 28)) as engine:
    assert engine.room(50) is None
    assert len(engine.submit(prompt, max_tokens=60, stop_tokens=()).result(timeout=120)) == 60


def test_the_server_takes_prompts_past_max_seq_len_with_a_bounded_cache(model):
  """The HTTP layer asks the cache policy what fits: with StreamingLLM a prompt longer than
  max_seq_len is served (a dense cache answers 400 context_length_exceeded)."""
  import openai
  from serving import byte_tokenizer, running_server

  from jaxeff.serve.app import ServerSettings, create_app

  prompt = "".join(chr(ord("a") + i % 26) for i in range(50))
  for policy, ok in ((StreamingLLM(4, 28), True), (None, False)):
    engine = Engine(model, byte_tokenizer(), max_batch=1, max_seq_len=32, prefill_chunk=16, kv_cache=policy)
    with running_server(create_app(engine, byte_tokenizer(), ServerSettings(model_name="tiny"))) as url:
      client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
      ask = lambda: client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, extra_body={"ignore_eos": True}
      )
      if ok:
        assert ask().usage.completion_tokens == 20
      else:
        with pytest.raises(openai.BadRequestError, match="context"):
          ask()
