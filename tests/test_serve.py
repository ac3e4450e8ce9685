"""The HTTP server through the official `openai` client (and raw HTTP where the client hides the
wire): a real uvicorn server on 127.0.0.1 at a free port, serving a tiny byte-level model."""

import asyncio
import json
import threading
import time

import httpx2 as httpx
import numpy as np
import openai
import pytest
from serving import byte_tokenizer, running_server, tiny_model

from jaxeff.generate import Generator
from jaxeff.inference.cache import Paged
from jaxeff.serve import Engine
from jaxeff.serve.app import ServerSettings, TextStream, create_app

KEY = "test-key"
MAX_LEN = 256


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def server(model):
  engine = Engine(
    model, byte_tokenizer(), max_batch=4, max_seq_len=MAX_LEN, prefill_chunk=32, max_waiting=4, kv_cache=Paged()
  )
  settings = ServerSettings(model_name="tiny", api_key=KEY, max_tokens=200, max_n=3, max_body_bytes=16384)
  with running_server(create_app(engine, byte_tokenizer(), settings)) as url:
    yield url, engine


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(model):
  return Generator(model, max_batch=1, max_seq_len=MAX_LEN)


def _greedy_text(reference, ids, n):
  tok = byte_tokenizer()
  return tok.decode(reference.generate([ids], max_new_tokens=n, stop_tokens=tok.stop_tokens)[0])


def _chat_ids(messages):
  tok = byte_tokenizer()
  return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


def test_completion_and_chat_match_the_generator(client, reference):
  r = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
  assert r.choices[0].text == _greedy_text(reference, byte_tokenizer().encode("To be, or not"), 12)
  assert r.choices[0].finish_reason in ("length", "stop")
  assert r.usage.prompt_tokens == 14 and r.usage.completion_tokens <= 12
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
  r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == _greedy_text(reference, _chat_ids(messages), 10)
  assert r.usage.prompt_tokens == len(_chat_ids(messages))
  assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
  # Token-id prompts, several prompts x n choices with seeds: same seed, same text.
  a = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=6, seed=7)
  b = client.completions.create(model="tiny", prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=6, seed=7)
  assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 4
  assert sorted(c.index for c in a.choices) == [0, 1, 2, 3]
  assert client.models.list().data[0].id == "tiny"


def test_streaming_equals_the_whole_answer(client, server):
  messages = [{"role": "user", "content": "Stream me something"}]
  whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
  stream = client.chat.completions.create(
    model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
  )
  chunks = list(stream)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
  assert len(finals) == 1 and finals[0].usage is not None  # usage on every stream, asked or not
  # On the wire: server-sent events, the last one `data: [DONE]`.
  body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "stream": True}
  with httpx.stream("POST", f"{server[0]}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.iter_lines() if line]
  assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
  assert "usage" in json.loads(events[-2][6:])


def test_concurrent_clients_each_get_their_own_answer(server, reference):
  url, engine = server
  prompts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(5 + 9 * i)) for i in range(10)]
  expected = [_greedy_text(reference, byte_tokenizer().encode(p), 16) for p in prompts]

  async def main():
    aclient = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)

    async def one(p, stream):
      if not stream:
        r = await aclient.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
        return r.choices[0].text
      s = await aclient.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True)
      return "".join([c.choices[0].text async for c in s if c.choices])

    # 10 clients on 4 slots and a queue of 4: sent in two waves so the queue never overflows.
    first = await asyncio.gather(*(one(p, i % 2 == 0) for i, p in enumerate(prompts[:6])))
    second = await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(prompts[6:])))
    return first + second

  assert asyncio.run(main()) == expected
  assert all(n == 1 for n in engine.traces.values()), engine.traces  # no request mix recompiles


def test_stop_strings_cut_the_text(client, reference):
  full = client.completions.create(model="tiny", prompt="stop test", max_tokens=30, temperature=0).choices[0].text
  assert len(full) > 6
  stop = full[3:5]
  r = client.completions.create(model="tiny", prompt="stop test", max_tokens=30, temperature=0, stop=[stop])
  assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
  s = client.completions.create(model="tiny", prompt="stop test", max_tokens=30, temperature=0, stop=stop, stream=True)
  assert "".join(c.choices[0].text for c in s if c.choices) == full[: full.index(stop)]


def test_text_stream_holds_back_a_possible_stop():
  tok = byte_tokenizer()
  stream = TextStream(tok, ["END"])
  pieces = [stream.push(t) for t in b"abcEN"]
  assert "".join(pieces) == "abc" and not stream.stopped  # "EN" could still become "END"
  assert stream.push(ord("X")) == "ENX"
  assert stream.push(ord("E")) + stream.push(ord("N")) + stream.push(ord("D")) == "" and stream.stopped
  assert stream.text == "abcENX"


def _raw(url, path, body=None, key=KEY, content=None, method="POST"):
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  if content is not None:
    headers["content-type"] = "application/json"
  return httpx.request(method, f"{url}{path}", json=body, content=content, headers=headers)


def test_bad_input_gets_a_4xx_with_an_openai_error_body(server, client):
  url, engine = server
  ok = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
  cases = [
    (dict(content=b'{"model": "tiny", "prompt": '), 400, "not valid JSON"),
    (dict(body={**ok, "max_tokens": "many"}), 400, "max_tokens"),
    (dict(body={**ok, "max_tokens": -1}), 400, "max_tokens must be at least 1"),
    (dict(body={**ok, "max_tokens": 201}), 400, "over this server's limit of 200"),
    (dict(body={**ok, "n": 4}), 400, "n=4 is over this server's limit of 3"),
    (dict(body={**ok, "temperature": 3}), 400, "temperature"),
    (dict(body={**ok, "model": "gpt-4"}), 404, "model 'gpt-4' does not exist"),
    (dict(body={**ok, "prompt": "x" * 300}), 400, "context"),
    (dict(body={**ok, "prompt": "x" * 250, "max_tokens": 10}), 400, "more than this server's context"),
    (dict(body={**ok, "prompt": [1, 9999]}), 400, "prompt token ids"),
    (dict(body={**ok, "logprobs": 30}), 400, "logprobs"),
    (dict(body={"model": "tiny"}), 400, "prompt"),
    (dict(body={"model": "tiny", "messages": []}, path="/chat/completions"), 400, "messages"),
    (dict(body={**ok, "prompt": "y" * 20000}), 413, "over 16384 bytes"),
    (dict(body=ok, key=None), 401, "API key"),
    (dict(body=ok, key="wrong"), 401, "API key"),
    (dict(body=ok, path="/nothing"), 404, "no such endpoint"),
  ]
  for kwargs, status, message in cases:
    path = kwargs.pop("path", "/completions")
    r = _raw(url, path, **kwargs)
    assert r.status_code == status, (kwargs, r.text)
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}, (kwargs, error)
  with pytest.raises(openai.BadRequestError, match="context"):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "z" * 300}])
  # /health needs no key; nothing was left running; the server still answers.
  assert httpx.get(url.replace("/v1", "/health")).json()["status"] == "ok"
  assert httpx.get(url.replace("/v1", "/metrics")).status_code == 401
  assert engine.num_running == 0 and engine.num_waiting == 0
  assert client.completions.create(model="tiny", prompt="still fine", max_tokens=2).usage.completion_tokens >= 1


def _wait_for(condition, timeout=30.0):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


def test_disconnect_cancels_and_a_full_queue_answers_429(server):
  url, engine = server
  cancelled = engine.totals.requests_finished["cancelled"]
  headers = {"Authorization": f"Bearer {KEY}"}
  long = {"model": "tiny", "prompt": "go", "max_tokens": 200, "stream": True, "ignore_eos": True}
  # Once all 4 slots decode (none prefilling, none waiting), decode steps wait at a gate, so the
  # slots stay full while the test looks.
  gate, step = threading.Event(), engine.runner.packed_step  # the paged engine's one program

  def gated(*args, **kwargs):
    if not engine.num_waiting and all(s is not None and s.decoding for s in engine._slots):
      gate.wait()
    return step(*args, **kwargs)

  engine.runner.packed_step = gated
  streams, waiting = [], []
  try:
    with httpx.Client(timeout=60) as http:
      for _ in range(4):  # fill the 4 slots with streams
        s = http.stream("POST", f"{url}/completions", json=long, headers=headers)
        s.__enter__()
        streams.append(s)
      _wait_for(lambda: all(s is not None and s.decoding for s in engine._slots))
      waiting = [threading.Thread(target=_raw, args=(url, "/completions", {**long, "stream": False})) for _ in range(4)]
      for t in waiting:
        t.start()
      _wait_for(lambda: engine.num_waiting == 4)
      r = _raw(url, "/completions", {"model": "tiny", "prompt": "one more", "max_tokens": 2})
      assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
      for s in streams:  # the clients go away mid-stream
        s.__exit__(None, None, None)
      # Their requests are cancelled before the gate opens: no decode step ran since.
      _wait_for(lambda: sum(s.request.cancelled for s in engine._slots if s is not None) == 4)
  finally:
    gate.set()
    engine.runner.packed_step = step
    for t in waiting:
      t.join(60)
  _wait_for(lambda: engine.totals.requests_finished["cancelled"] >= cancelled + 4)
  _wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0)
  assert engine.totals.requests_finished["length"] >= 4  # the waiting ones ran to their end
  metrics = _raw(url.replace("/v1", ""), "/metrics", method="GET").text
  assert 'jaxeff_requests_finished_total{reason="cancelled"}' in metrics
  assert "jaxeff_time_to_first_token_seconds_count" in metrics and "jaxeff_requests_running 0.0" in metrics


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(server, client, reference):
  """A step that raises fails the requests in it (500 naming the error); the engine serves the
  next ones. (The paged engine packs prefill and decode rows into one step, so a failure there is
  not one request's; the dense engine's per-request isolation is in test_serve_engine.py.)"""
  url, engine = server
  step = engine.runner.packed_step

  def failing(tokens, **kwargs):
    if b"BOOM" in np.asarray(tokens).astype(np.uint8).tobytes():
      raise RuntimeError("injected failure")
    return step(tokens, **kwargs)

  engine.runner.packed_step = failing
  try:
    with pytest.raises(openai.InternalServerError, match="injected failure"):
      client.completions.create(model="tiny", prompt=[*b"BOOM", 1], max_tokens=20)
    good = client.completions.create(model="tiny", prompt="fine", max_tokens=20, temperature=0)
  finally:
    engine.runner.packed_step = step
  assert good.choices[0].text == _greedy_text(reference, byte_tokenizer().encode("fine"), 20)
  assert engine.failure is None
