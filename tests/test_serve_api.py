"""The server's OpenAI semantics and robustness: every request field honoured or refused by name,
`finish_reason` and `usage` as OpenAI defines them, a failed or stopped engine answered with 503
(no request hangs), and incremental detokenization (constant work per token, exactly a full decode)."""

import concurrent.futures
import random
import threading
import time

import httpx2 as httpx
import openai
import pytest
from serving import EOS, byte_tokenizer, running_server, tiny_model
from smollm2 import smollm2_path

from jaxeff.generate import Generator
from jaxeff.generate.tokenizer import StreamDecoder, TextTokenizer, load_tokenizer
from jaxeff.inference.cache import Paged
from jaxeff.serve import Engine, EngineStoppedError
from jaxeff.serve.app import ServerSettings, TextStream, create_app
from jaxeff.serve.engine import EngineFailedError

MAX_LEN = 256
TIMEOUT = 60  # seconds any one request may take: none may hang


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _engine(model, **overrides):
  """test_serve's server's settings: the session's compile cache has the programs once either ran."""
  settings = {"max_batch": 4, "max_seq_len": MAX_LEN, "prefill_chunk": 32, "kv_cache": Paged(), **overrides}
  return Engine(model, byte_tokenizer(), **settings)


# The module server's text decoding waits while this is clear (it holds its event loop), so a test
# can let the engine run ahead of the server's reading of the tokens.
DECODING = threading.Event()
DECODING.set()


class _Wrapped:
  """`tok` with its own decode(ids) (everything else delegated)."""

  def __init__(self, tok, decode):
    self._tok, self._decode = tok, decode

  def __getattr__(self, name):
    return getattr(self._tok, name)

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._decode(ids)


def _gated_tokenizer():
  tok = byte_tokenizer()

  def decode(ids):
    assert DECODING.wait(TIMEOUT)
    return tok.decode(ids)

  return _Wrapped(tok, decode)


@pytest.fixture(scope="module")
def engine(model):
  return _engine(model)


@pytest.fixture(scope="module")
def server(engine):
  with running_server(create_app(engine, _gated_tokenizer(), ServerSettings(model_name="tiny"))) as url:
    yield url


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(model):
  return Generator(model, max_batch=1, max_seq_len=MAX_LEN)


def _greedy(reference, prompt: str, n: int) -> list[int]:
  tok = byte_tokenizer()
  return reference.generate([tok.encode(prompt)], max_new_tokens=n, stop_tokens=tok.stop_tokens)[0]


# ---------------------------------------------------------------------- request fields

# (endpoint, field, value): accepted, and the answer is the one without the field.
ACCEPTED = [
  ("chat", "user", "someone"),
  ("chat", "metadata", {"k": "v"}),
  ("chat", "store", False),
  ("completions", "service_tier", "auto"),
  ("chat", "prompt_cache_key", "k"),
  ("completions", "safety_identifier", "s"),
  ("chat", "response_format", {"type": "text"}),
  ("chat", "tools", []),
  ("chat", "tool_choice", "auto"),
  ("chat", "parallel_tool_calls", True),
  ("chat", "logprobs", True),
  ("completions", "logprobs", 2),
  ("completions", "repetition_penalty", 1),
  ("completions", "min_tokens", 0),
  ("completions", "presence_penalty", 0),
  ("completions", "logit_bias", {}),
  ("completions", "logit_bias", {"7": 0.0}),
  ("completions", "echo", False),
  ("completions", "suffix", ""),
  ("completions", "best_of", 1),
  ("completions", "return_tokens_as_token_ids", True),
]
# (endpoint, field, value): 400 naming the field.
REFUSED = [
  ("chat", "response_format", {"type": "xml"}),
  ("chat", "tool_choice", "required"),  # no tools to call
  ("chat", "functions", [{"name": "f", "parameters": {"type": "object"}}]),
  ("chat", "function_call", {"name": "f"}),
  ("chat", "top_logprobs", 2),  # without logprobs
  ("chat", "repetition_penalty", -1),
  ("chat", "min_tokens", -4),
  ("chat", "echo", True),  # a completions field (vLLM's chat has one): unknown here
  ("completions", "logprobs", 25),
  ("completions", "logit_bias", {"65": 101}),
  ("completions", "frequency_penalty", 2.5),
  ("completions", "suffix", "x"),
  ("completions", "best_of", 0),
  ("completions", "stop_token_ids", [9999]),
  ("completions", "tools", []),  # a chat field
  ("completions", "guided_json", "{not json"),
  ("completions", "reasoning_effort", "high"),
  ("completions", "messages", []),
]


def _post(url, endpoint, field=None, value=None):
  body = {"model": "tiny", "max_tokens": 4, "temperature": 0}
  if endpoint == "chat":
    body["messages"] = [{"role": "user", "content": "Fields"}]
  else:
    body["prompt"] = "Fields"
  if field is not None:
    body[field] = value
  path = "/chat/completions" if endpoint == "chat" else "/completions"
  return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT)


def _answer(response):
  choice = response.json()["choices"][0]
  return choice["message"]["content"] if "message" in choice else choice["text"]


def test_request_fields_are_honoured_or_refused_by_name(server):
  plain = {endpoint: _answer(_post(server, endpoint)) for endpoint in ("chat", "completions")}
  for endpoint, field, value in ACCEPTED:
    r = _post(server, endpoint, field, value)
    assert r.status_code == 200, (field, value, r.text)
    assert _answer(r) == plain[endpoint], (field, value)
  for endpoint, field, value in REFUSED:
    r = _post(server, endpoint, field, value)
    assert r.status_code == 400, (field, value, r.text)
    error = r.json()["error"]
    assert error["param"] == field and error["message"].startswith(field), (field, value, error)


def test_stop_token_ids_end_the_answer(client, reference):
  tokens = _greedy(reference, "Count me", 30)
  stop = next(t for t in tokens[3:] if t < 256)
  cut = tokens[: tokens.index(stop)]
  text = byte_tokenizer().decode(cut)
  r = client.completions.create(
    model="tiny", prompt="Count me", max_tokens=30, temperature=0, extra_body={"stop_token_ids": [stop]}
  )
  assert r.choices[0].text == text and r.choices[0].finish_reason == "stop"
  assert r.usage.completion_tokens == len(cut)
  # With ignore_eos the model's end-of-sequence id no longer stops it, but the request's ids still do.
  r = client.completions.create(
    model="tiny",
    prompt="Count me",
    max_tokens=30,
    temperature=0,
    extra_body={"stop_token_ids": [stop], "ignore_eos": True},
  )
  assert r.choices[0].text == text


# ---------------------------------------------------------------------- finish_reason and usage


def _run_ahead(engine, call):
  """`call()`'s answer, read by the server only once the engine has generated all of it."""
  finished = engine.totals.requests_finished["length"]
  DECODING.clear()
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      answer = pool.submit(call)
      _wait_for(lambda: engine.totals.requests_finished["length"] > finished)
      DECODING.set()
      return answer.result(TIMEOUT)
  finally:
    DECODING.set()


def test_usage_counts_tokens_up_to_the_one_that_completed_the_stop_string(client, engine, reference):
  tok = byte_tokenizer()
  tokens = _greedy(reference, "Count me", 30)
  # Two printable ASCII bytes in a row: the stop string; the token of its second byte completes it.
  i = next(i for i in range(len(tokens) - 1) if all(32 <= t < 127 for t in tokens[i : i + 2]))
  stop = tok.decode(tokens[i : i + 2])
  used = next(k for k in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:k]))
  full = tok.decode(tokens)
  assert used < len(tokens) - 2  # tokens after the stop exist (and must not count)
  # The engine generates all 30 tokens before the server reads them: those after the stop don't count.
  kwargs = dict(model="tiny", prompt="Count me", max_tokens=30, temperature=0, stop=[stop])
  r = _run_ahead(engine, lambda: client.completions.create(**kwargs))
  assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
  assert r.usage.completion_tokens == used and r.usage.total_tokens == r.usage.prompt_tokens + used
  stream = dict(kwargs, stream=True, stream_options={"include_usage": True})
  chunks = _run_ahead(engine, lambda: list(client.completions.create(**stream)))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == full[: full.index(stop)]
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
  assert chunks[-1].usage.completion_tokens == used
  # Without a stop string: every token counts, and max_tokens ends it with "length".
  r = client.completions.create(model="tiny", prompt="Count me", max_tokens=30, temperature=0)
  assert r.choices[0].text == full and r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "length"


def _gate_decoding(engine):
  """Steps wait at the returned event once a request decodes: (entered, release). (The paged
  engine's steps are `runner.packed_step`, prefill and decode together; the dense one's `runner.decode`.)"""
  entered, release = threading.Event(), threading.Event()
  name = "packed_step" if engine.packed else "step" if engine.blocks is not None else "decode"
  run = getattr(engine.runner, name)

  def gated(*args, **kwargs):
    if any(s is not None and s.decoding for s in engine._slots):
      entered.set()
      release.wait(TIMEOUT)
    return run(*args, **kwargs)

  setattr(engine.runner, name, gated)
  return entered, release


def test_a_request_the_engine_cancels_is_a_503_not_a_finish_reason(model):
  engine = _engine(model)
  with running_server(create_app(engine, byte_tokenizer(), ServerSettings(model_name="tiny"))) as url:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=TIMEOUT)
    entered, release = _gate_decoding(engine)
    results = {}

    def whole():
      try:
        client.completions.create(model="tiny", prompt="a", max_tokens=50, extra_body={"ignore_eos": True})
      except openai.APIStatusError as e:
        results["whole"] = e

    def stream():
      messages = [{"role": "user", "content": "b"}]
      chunks = results["chunks"] = []
      try:
        for c in client.chat.completions.create(model="tiny", messages=messages, max_tokens=50, stream=True):
          chunks.append(c)
      except openai.APIError as e:
        results["stream"] = e

    threads = [threading.Thread(target=whole), threading.Thread(target=stream)]
    threads[0].start()
    assert entered.wait(TIMEOUT)  # one request decodes; the stream waits for a slot
    threads[1].start()
    _wait_for(lambda: engine.num_waiting == 1)
    stopping = threading.Thread(target=engine.stop, args=(0.0,))  # as the server's shutdown does
    stopping.start()
    release.set()
    for t in [stopping, *threads]:
      t.join(TIMEOUT)
      assert not t.is_alive()
  assert results["whole"].status_code == 503 and "shutting down" in results["whole"].message
  assert "shutting down" in results["stream"].message
  assert all(c.choices[0].finish_reason is None for c in results["chunks"])


# ---------------------------------------------------------------------- a failed engine


def test_a_failed_engine_answers_503_everywhere_and_nothing_hangs(model, caplog):
  engine = _engine(model, max_batch=1)
  with running_server(create_app(engine, byte_tokenizer(), ServerSettings(model_name="tiny"))) as url:
    health = url.replace("/v1", "/health")
    assert httpx.get(health).status_code == 200
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=TIMEOUT)
    entered, release = threading.Event(), threading.Event()

    def broken_step():
      entered.set()
      release.wait(TIMEOUT)
      raise RuntimeError("injected scheduler failure")

    # The scheduler's own code fails (the paged engine's planning, the dense one's decode step),
    # not one request's program.
    setattr(engine, "_plan" if engine.blocks is not None else "_decode_step", broken_step)
    results = {}

    def whole(name):
      body = {"model": "tiny", "prompt": name, "max_tokens": 20, "ignore_eos": True}  # it reaches decoding
      results[name] = httpx.post(f"{url}/completions", json=body, timeout=TIMEOUT)

    def stream():
      try:
        s = client.chat.completions.create(
          model="tiny", messages=[{"role": "user", "content": "s"}], max_tokens=20, stream=True
        )
        results["chunks"] = list(s)
      except openai.APIError as e:
        results["stream"] = e

    running = threading.Thread(target=whole, args=("running",))
    running.start()
    assert entered.wait(TIMEOUT)  # it holds the slot; the next two wait for it
    waiting = [threading.Thread(target=whole, args=("waiting",)), threading.Thread(target=stream)]
    for t in waiting:
      t.start()
    _wait_for(lambda: engine.num_waiting == 2)
    release.set()
    for t in [running, *waiting]:
      t.join(TIMEOUT)
      assert not t.is_alive()
    for name in ("running", "waiting"):
      r = results[name]
      assert r.status_code == 503, r.text
      error = r.json()["error"]
      assert error["code"] == "engine_failed" and "RuntimeError: injected scheduler failure" in error["message"]
    assert "chunks" not in results and "injected scheduler failure" in results["stream"].message
    # Later requests and /health: 503 at once, naming the cause.
    with pytest.raises(openai.InternalServerError, match="injected scheduler failure") as later:
      client.completions.create(model="tiny", prompt="later", max_tokens=2)
    assert later.value.status_code == 503
    r = httpx.get(health)
    assert r.status_code == 503 and "injected scheduler failure" in r.json()["error"]["message"]
    # The library's view: the engine holds the failure (caused by the error) and takes nothing more.
    assert isinstance(engine.failure, EngineFailedError) and isinstance(engine.failure.__cause__, RuntimeError)
    with pytest.raises(EngineStoppedError):
      engine.submit([1, 2], max_tokens=2)
    assert engine.num_running == 0 and engine.num_waiting == 0
  # One log line names the cause (not one per request).
  lines = [r for r in caplog.records if "injected scheduler failure" in r.getMessage()]
  assert len(lines) == 1 and lines[0].levelname == "ERROR", [r.getMessage() for r in lines]


def _wait_for(condition):
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.01)


# ---------------------------------------------------------------------- incremental detokenization


def _counting(tok: TextTokenizer) -> tuple[TextTokenizer, list[int]]:
  """`tok`, counting the ids passed to its decode."""
  count = [0]

  def decode(ids):
    count[0] += len(ids)
    return tok.decode(ids)

  return _Wrapped(tok, decode), count


def _streamed(tok: TextTokenizer, ids: list[int]) -> tuple[list[str], str]:
  decoder = StreamDecoder(tok)
  pieces = [decoder.push(i) for i in ids]
  return pieces, "".join(pieces) + decoder.finish()


SMOLLM2_VOCAB = 49152
MULTI_BYTE = "日本語のテキスト, 中文字符 🎉🎊👩‍👩‍👧 über naïve — Ελληνικά. "


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  return load_tokenizer(smollm2_path())


def test_stream_decoding_equals_a_full_decode(smollm2_tokenizer):
  for tok in (byte_tokenizer(), smollm2_tokenizer):
    ids = tok.encode(MULTI_BYTE * 3, add_special_tokens=False)
    pieces, text = _streamed(tok, ids)
    assert text == tok.decode(ids) == MULTI_BYTE * 3
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # a character waited for its other bytes
  # Invalid UTF-8 (a random model's bytes): still exactly the full decode, U+FFFD where it has them.
  rng = random.Random(0)
  awkward = [0x41, 0x80, 0xBF, 0xC3, 0xE4, 0xE0, 0xED, 0xF0, 0xF4, 0xF5, 0xFF, EOS]
  for _ in range(2000):
    ids = [rng.choice(awkward) for _ in range(rng.randrange(1, 30))]
    assert _streamed(byte_tokenizer(), ids)[1] == byte_tokenizer().decode(ids), ids
  ids = [rng.randrange(SMOLLM2_VOCAB) for _ in range(500)]
  assert _streamed(smollm2_tokenizer, ids)[1] == smollm2_tokenizer.decode(ids)


def test_stream_decoding_does_constant_work_per_token(smollm2_tokenizer):
  rng = random.Random(1)
  cases = {
    "text": smollm2_tokenizer.encode(MULTI_BYTE * 200, add_special_tokens=False)[:4096],
    "random ids": [rng.randrange(SMOLLM2_VOCAB) for _ in range(4096)],
  }
  for name, ids in cases.items():
    assert len(ids) == 4096
    tok, count = _counting(smollm2_tokenizer)
    stream = TextStream(tok, ["never in the text"])
    text = "".join(stream.push(i) for i in ids) + stream.finish()
    assert text == smollm2_tokenizer.decode(ids), name
    assert count[0] <= 16 * len(ids), (name, count[0])  # a whole decode per token: ~8M ids
  # Invalid bytes for a long stretch (no complete character to anchor on): still linear.
  tok, count = _counting(byte_tokenizer())
  ids = [rng.randrange(0x80, 0x100) for _ in range(4096)]
  assert _streamed(tok, ids)[1] == byte_tokenizer().decode(ids) and count[0] <= 16 * len(ids), count[0]
