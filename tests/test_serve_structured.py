"""Structured output and tool calls through the official `openai` client against a live server: a
tiny random model over SmolLM2's tokenizer (49152 ids), so every output's shape comes from the
grammar masks applied in the step, none from what the model learned."""

import concurrent.futures
import json
import re

import httpx2 as httpx
import jsonschema
import openai
import pytest
from serving import running_server, tiny_model
from smollm2 import smollm2_path

from jaxeff.bench.grammar import SCHEMAS
from jaxeff.loader import load_tokenizer
from jaxeff.serve import Engine
from jaxeff.serve.app import ServerSettings, create_app

WEATHER = {
  "type": "function",
  "function": {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
      "type": "object",
      "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
      "required": ["city", "unit"],
      "additionalProperties": False,
    },
  },
}
TIME = {
  "type": "function",
  "function": {
    "name": "get_time",
    "parameters": {
      "type": "object",
      "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
      "required": ["zone"],
      "additionalProperties": False,
    },
  },
}


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(str(smollm2_path()))


@pytest.fixture(scope="module")
def engine(tokenizer):
  model = tiny_model(seed=5, vocab_size=tokenizer.vocab_size)
  return Engine(model, tokenizer, max_batch=4, max_seq_len=1024, token_budget=128)


@pytest.fixture(scope="module")
def server(engine, tokenizer):
  with running_server(create_app(engine, tokenizer, ServerSettings(model_name="tiny"))) as url:
    yield url


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)


def _chat(client, **kwargs):
  kwargs.setdefault("messages", [{"role": "user", "content": "Answer in JSON."}])
  kwargs.setdefault("max_tokens", 300)
  return client.chat.completions.create(model="tiny", **kwargs)


def test_every_schema_output_parses_and_validates(client, engine):
  before = engine.totals.masks
  with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:  # batched in the engine's steps
    answers = {
      name: pool.submit(
        _chat,
        client,
        response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}},
        temperature=1.0,
        seed=k,
      )  # fmt: skip
      for k, (name, schema) in enumerate(SCHEMAS.items())
    }
  for name, answer in answers.items():
    choice = answer.result().choices[0]
    assert choice.finish_reason == "stop", (name, choice.message.content)
    jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
  assert engine.totals.masks - before >= len(SCHEMAS) * 5  # masks were computed for each token
  r = client.completions.create(
    model="tiny", prompt="JSON:", max_tokens=200, temperature=0,
    extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": SCHEMAS["enums"]}}},
  )  # fmt: skip
  jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["enums"])


def test_json_object_regex_and_grammar_extensions(client):
  r = _chat(client, response_format={"type": "json_object"}, temperature=0.8, seed=1, max_tokens=60)
  if r.choices[0].finish_reason == "stop":  # an object cut by max_tokens is not one yet
    assert isinstance(json.loads(r.choices[0].message.content), dict)
  else:
    assert r.choices[0].message.content.lstrip().startswith("{")
  r = _chat(client, temperature=1.0, seed=2, extra_body={"guided_regex": r"[a-c]{3}-[0-9]{2,4}"})
  assert re.fullmatch(r"[a-c]{3}-[0-9]{2,4}", r.choices[0].message.content)
  r = _chat(client, temperature=1.0, seed=2, logprobs=True, extra_body={"guided_regex": "[äöü✓日本]{3,6}"})
  content = r.choices[0].message.content
  assert re.fullmatch("[äöü✓日本]{3,6}", content)  # the logprobs' bytes join up to the text
  assert b"".join(bytes(item.bytes) for item in r.choices[0].logprobs.content) == content.encode()
  r = _chat(client, temperature=1.0, seed=3, extra_body={"guided_grammar": 'start: "yes" | "no"'})
  assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"


def test_a_constrained_request_does_not_change_the_others(client):
  plain = _chat(client, temperature=0, max_tokens=12)
  fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["numbers"]}}
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    both = [pool.submit(_chat, client, temperature=0, max_tokens=12) for _ in range(2)]
    constrained = pool.submit(_chat, client, response_format=fmt, temperature=0)
    texts = [f.result().choices[0].message.content for f in both]
  assert texts == [plain.choices[0].message.content] * 2
  jsonschema.validate(json.loads(constrained.result().choices[0].message.content), SCHEMAS["numbers"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_parses_with_the_clients_types(client, choice):
  r = _chat(client, tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, seed=4)
  message = r.choices[0].message
  assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
  call = message.tool_calls[0]
  assert call.type == "function" and call.id.startswith("call_")
  if isinstance(choice, dict):
    assert call.function.name == "get_time"
  tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
  jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_calls_stream_as_deltas(client):
  stream = _chat(client, tools=[WEATHER], tool_choice="required", temperature=0.5, seed=6, stream=True)
  calls, reasons = {}, []
  for chunk in stream:
    for c in chunk.choices:
      for delta in c.delta.tool_calls or []:  # clients join the pieces by index
        call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
        call["id"] = call["id"] or delta.id
        call["name"] += delta.function.name or ""
        call["arguments"] += delta.function.arguments or ""
      reasons.append(c.finish_reason)
  assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
  jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
  assert [r for r in reasons if r] == ["tool_calls"]


def test_tools_reach_the_prompt_and_a_conversation_with_tool_results_runs(client, server):
  # tool_choice "none" leaves the tools out of the prompt; "auto" lists them.
  listed = _chat(client, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=1).usage.prompt_tokens
  unlisted = _chat(client, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=1).usage.prompt_tokens
  assert listed > unlisted + 30
  messages = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
      "role": "assistant",
      "content": None,
      "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
      ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"},
  ]
  r = _chat(client, messages=messages, tools=[WEATHER], temperature=0, max_tokens=4)
  assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
  bad = {"model": "tiny", "messages": messages[:1], "tools": [WEATHER], "tool_choice": {"type": "function"}}
  response = httpx.post(f"{server}/chat/completions", json=bad, timeout=60)
  assert response.status_code == 400 and "tool_choice" in response.json()["error"]["message"]
  bad = {"model": "tiny", "messages": messages[:1], "response_format": {"type": "json_schema", "json_schema": {}}}
  response = httpx.post(f"{server}/chat/completions", json=bad, timeout=60)
  assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_speculation_composes_with_grammar_penalties_and_logprobs(tokenizer):
  """Prompt lookup proposes what the prompt repeats; the grammar's masks at every draft node keep
  the accepted tokens inside it, and the result is the plain engine's, token for token."""
  from jaxeff.generate.speculative import PromptLookup
  from jaxeff.inference.logits import Penalties
  from jaxeff.serve.grammar import GrammarCompiler

  model = tiny_model(seed=5, vocab_size=tokenizer.vocab_size)
  grammar = GrammarCompiler(tokenizer, tokenizer.vocab_size).compile({"type": "regex", "pattern": "(ab ){6,12}"})
  prompt = tokenizer.encode("ab ab ab ab ab ab ab ab")
  results = []
  for speculator in (None, PromptLookup(max_ngram=2, num_draft=4)):
    with Engine(model, tokenizer, max_batch=2, max_seq_len=64, token_budget=16, speculator=speculator) as engine:
      constrained = engine.submit(prompt, max_tokens=40, grammar=grammar, logprobs=1)
      penalized = engine.submit(prompt, max_tokens=8, penalties=Penalties(frequency=1.0, repetition=1.3), logprobs=0)
      results.append([(r.result(), [lp for lp, _ in r.logprobs]) for r in (constrained, penalized)])
      if speculator is not None:
        assert constrained.accepted > 0  # draft tokens the grammar allows were accepted
  assert re.fullmatch("(ab ){6,12}", tokenizer.decode(results[0][0][0]))
  for (tokens, lps), (spec_tokens, spec_lps) in zip(*results):
    assert tokens == spec_tokens and spec_lps == pytest.approx(lps, abs=1e-4)
