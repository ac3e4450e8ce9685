"""The OpenAI fields real clients send, through the official `openai` client against a live server
(a tiny byte-level model, the paged cache's packed steps): logprobs and echo against a direct
forward of the model, `n` from one prefill, `best_of`, each penalty against a NumPy loop written
from its rule, min_tokens, and tool-role messages."""

import httpx2 as httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from serving import BOS, EOS, byte_tokenizer, running_server, tiny_model

from jaxeff.serve import Engine
from jaxeff.serve.app import ServerSettings, create_app

MAX_LEN = 256
IDS = {"return_tokens_as_token_ids": True}  # vLLM's: logprobs name tokens "token_id:<id>"


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=3)


@pytest.fixture(scope="module")
def engine(model):
  return Engine(model, byte_tokenizer(), max_batch=4, max_seq_len=MAX_LEN, token_budget=64)


@pytest.fixture(scope="module")
def server(engine):
  with running_server(create_app(engine, byte_tokenizer(), ServerSettings(model_name="tiny", max_n=4))) as url:
    yield url


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def forward(model):
  """Log-softmax of the model's logits at every position of a token list (one compiled length)."""
  run = jax.jit(lambda t: jax.nn.log_softmax(model(t).astype(jnp.float32), axis=-1))

  def logprobs(tokens):
    padded = np.zeros((1, MAX_LEN), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(run(jnp.asarray(padded)))[0, : len(tokens)].astype(np.float64)

  return logprobs


def _ids(text: str) -> list[int]:
  return byte_tokenizer().encode(text)


def _id(name: str) -> int:
  assert name.startswith("token_id:"), name
  return int(name.split(":")[1])


def test_chat_logprobs_are_the_sampled_distributions(client, engine, forward):
  messages = [{"role": "user", "content": "Score me"}]
  prompt = byte_tokenizer().encode(byte_tokenizer().apply_chat_template(messages), add_special_tokens=False)
  for temperature in (0.0, 0.7):
    r = client.chat.completions.create(
      model="tiny", messages=messages, max_tokens=6, temperature=temperature, seed=11, logprobs=True, top_logprobs=3,
      extra_body={"ignore_eos": True, **IDS},
    )  # fmt: skip
    items = r.choices[0].logprobs.content
    tokens = [_id(item.token) for item in items]
    assert len(items) == 6
    lp = forward(prompt + tokens)
    for k, item in enumerate(items):
      ref = lp[len(prompt) - 1 + k] if temperature == 0 else _tempered(lp[len(prompt) - 1 + k], temperature)
      assert item.logprob == pytest.approx(ref[tokens[k]], abs=2e-4)
      assert [t.logprob for t in item.top_logprobs] == pytest.approx(np.sort(ref)[::-1][:3], abs=2e-4)
      assert _id(item.top_logprobs[0].token) == int(np.argmax(ref))
      if temperature == 0:
        assert tokens[k] == int(np.argmax(ref))


def _tempered(logprobs, temperature):
  z = logprobs / temperature
  return z - np.log(np.sum(np.exp(z - z.max()))) - z.max()


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_echo_returns_the_prompt_tokens_logprobs(client, forward, max_tokens):
  text = "To be, or not"
  r = client.completions.create(
    model="tiny", prompt=text, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True, extra_body=IDS
  )
  choice = r.choices[0]
  prompt = _ids(text)  # BOS first
  got = choice.logprobs.token_logprobs
  assert len(got) == len(prompt) + max_tokens and got[0] is None and choice.logprobs.top_logprobs[0] is None
  assert choice.text.startswith(text)
  tokens = [_id(t) for t in choice.logprobs.tokens]
  assert tokens[: len(prompt)] == prompt
  lp = forward(tokens)
  want = [lp[k - 1][t] for k, t in enumerate(tokens) if k]
  assert got[1:] == pytest.approx(want, abs=2e-4)
  # lm-eval's is_greedy: a token is greedy when its logprob is the largest of its top ones.
  for k in range(1, len(prompt)):
    assert max(choice.logprobs.top_logprobs[k].values()) == pytest.approx(lp[k - 1].max(), abs=2e-4)


def test_n_samples_share_one_prefill_and_each_equals_its_own_seed_alone(client, engine):
  prompt = "Shared prompt of a few blocks, for n samples"
  before = engine.totals.computed_prompt_tokens
  r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, n=3, seed=40)
  computed = engine.totals.computed_prompt_tokens - before
  assert computed == len(_ids(prompt)) + 2  # one prefill; the other two compute only the last token
  texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
  alone = [
    client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, seed=40 + j).choices[0].text
    for j in range(3)
  ]
  assert texts == alone and len(set(texts)) > 1


def test_best_of_keeps_the_answer_with_the_best_mean_logprob(client):
  prompt = "Pick the best"
  r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=1.0, best_of=3, seed=7, n=1)
  singles = [
    client.completions.create(
      model="tiny", prompt=prompt, max_tokens=4, temperature=1.0, seed=7 + j, logprobs=0
    ).choices[0]
    for j in range(3)
  ]
  best = max(singles, key=lambda c: np.mean(c.logprobs.token_logprobs))
  assert [c.text for c in r.choices] == [best.text] and r.usage.completion_tokens == 12


def _penalized_greedy(forward, prompt, steps, *, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
  """Greedy decoding with the penalties applied in NumPy from their definitions (OpenAI's
  presence/frequency over the output, CTRL's repetition over prompt and output, logit bias)."""
  out = []
  for _ in range(steps):
    logits = forward(prompt + out)[-1]
    x = logits.copy()
    counts = np.bincount(np.array(out, int), minlength=x.size) if out else np.zeros(x.size)
    for t, b in (bias or {}).items():
      x[t] += b
    seen = (counts > 0) | np.isin(np.arange(x.size), prompt)
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)
    x = x - frequency * counts - presence * (counts > 0)
    out.append(int(np.argmax(x)))
  return out


def test_each_penalty_matches_its_rule(client, model):
  raw = jax.jit(lambda t: model(t).astype(jnp.float32))

  def logits(tokens):  # the raw logits (repetition's sign rule needs them, not log-softmax)
    padded = np.zeros((1, MAX_LEN), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(raw(jnp.asarray(padded)))[0, : len(tokens)].astype(np.float64)

  prompt = "aaaa bbbb aaaa"
  ids = _ids(prompt)
  cases = [
    dict(frequency=1.5),
    dict(presence=1.8),
    dict(repetition=1.6),
    dict(frequency=-1.0, presence=0.5, bias={ord("z"): 4.0, ord("a"): -3.0}),
  ]
  plain = _penalized_greedy(logits, ids, 12)
  for case in cases:
    want = _penalized_greedy(logits, ids, 12, **case)
    assert want != plain, case  # each case changes the answer: the check can fail
    r = client.completions.create(
      model="tiny", prompt=prompt, max_tokens=12, temperature=0,
      extra_body={
        "presence_penalty": case.get("presence", 0.0), "frequency_penalty": case.get("frequency", 0.0),
        "repetition_penalty": case.get("repetition", 1.0), "ignore_eos": True,
        "logit_bias": {str(t): b for t, b in case.get("bias", {}).items()}, "logprobs": 0, **IDS,
      },
    )  # fmt: skip
    assert [_id(t) for t in r.choices[0].logprobs.tokens] == want, case


def test_min_tokens_holds_back_the_stop_ids(client):
  bias = {str(EOS): 100}  # the end-of-sequence id always wins ...
  r = client.completions.create(model="tiny", prompt="Stop", max_tokens=10, temperature=0, logit_bias=bias)
  assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
  r = client.completions.create(
    model="tiny", prompt="Stop", max_tokens=10, temperature=0, logit_bias=bias, extra_body={"min_tokens": 4}
  )  # ... except before min_tokens
  assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"


def test_bad_values_are_400s_naming_the_field(server):
  base = {"model": "tiny", "prompt": "x", "max_tokens": 2}
  cases = [
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 300}}, "logit_bias"),
    ({"logprobs": 21}, "logprobs"),
    ({"best_of": 2, "n": 3}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"echo": True, "stream": True}, "echo"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "a+", "guided_grammar": "start: /b+/"}, "guided_grammar"),
  ]
  for extra, field in cases:
    r = httpx.post(f"{server}/completions", json=base | extra, timeout=60)
    assert r.status_code == 400, (extra, r.text)
    assert r.json()["error"]["param"] == field and r.json()["error"]["message"].startswith(field), (extra, r.text)


def test_tool_role_messages_are_accepted(client):
  messages = [
    {"role": "user", "content": "Weather?"},
    {
      "role": "assistant",
      "content": None,
      "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "rain"},
  ]
  r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
  assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 40
  assert BOS not in _ids("")[1:]  # the byte tokenizer's BOS is only the template's


def test_a_row_cache_policy_gives_the_same_processing_and_logprobs(engine, model):
  """The one-row-per-slot path (StreamingLLM here, before it evicts anything) applies the same
  penalties, bias and min_tokens and returns the same logprobs as the paged cache's packed steps."""
  from jaxeff.inference.cache import StreamingLLM
  from jaxeff.inference.logits import Penalties

  settings = dict(
    max_tokens=10,
    penalties=Penalties(frequency=0.8, repetition=1.4, min_tokens=6, logit_bias=((EOS, 50.0), (ord("q"), 3.0))),
    logprobs=2,
    prompt_logprobs=True,
  )
  prompt = _ids("row by row")
  with Engine(model, byte_tokenizer(), max_batch=2, max_seq_len=64, kv_cache=StreamingLLM(4, 60)) as rows:
    got = rows.submit(prompt, **settings)
    got.result()
  want = engine.submit(prompt, **settings)
  assert got.result() == want.result() and len(want.tokens) == 6  # the biased EOS ends it at min_tokens
  for a, b in zip(got.logprobs + got.prompt_logprobs[1:], want.logprobs + want.prompt_logprobs[1:]):
    assert a[0] == pytest.approx(b[0], abs=1e-4) and [t for t, _ in a[1]] == [t for t, _ in b[1]]
