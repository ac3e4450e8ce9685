"""The OpenAI-compatible HTTP layer over an `Engine`: a thin FastAPI shell (the `serve` extra).

  app = create_app(engine, tokenizer, ServerSettings(model_name="smollm2"))
  uvicorn.run(app, host="127.0.0.1", port=8000)            # what `python -m jaxeff.serve` does

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the tokenizer's chat template),
both with `stream: true` as server-sent events ending in `data: [DONE]`; `GET /v1/models`,
`GET /health`, `GET /metrics` (Prometheus text). Every response carries `usage`; a stream carries it
on the chunk that finishes each choice (and in a last chunk with no choices, when the client asks
with `stream_options.include_usage`, as OpenAI does).

Request fields, each honoured or refused, never silently dropped (a dropped field would change the
answer without telling the client):
- Honoured: OpenAI's `model`, `prompt` (a string, a list of token ids, or a list of either) or
  `messages` (system, developer, user, assistant with `tool_calls`, tool), `max_tokens` (chat: or
  `max_completion_tokens`; completions with `echo`: 0 scores the prompt only), `temperature`
  (default 1, as OpenAI's), `top_p`, `n`, `stop` (strings), `seed`, `stream`,
  `stream_options.include_usage`, `presence_penalty`, `frequency_penalty`, `logit_bias`,
  `logprobs` (chat: with `top_logprobs`; completions: the number of top ones, up to 20), and on
  completions `echo` and `best_of` (the n answers of best mean logprob per token; not streamed);
  `response_format` (text, json_object, json_schema) on both endpoints; on chat `tools`,
  `tool_choice` (auto, none, required, a named function: then the call is constrained to that
  tool's parameter schema) and `parallel_tool_calls`; and, as vLLM takes them, `top_k`, `min_p`,
  `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids` (ids that end the choice
  besides the model's own end-of-sequence ids; like those, not returned), `guided_json`,
  `guided_regex`, `guided_grammar` (llguidance's Lark dialect) and `return_tokens_as_token_ids`
  (logprobs name tokens "token_id:<id>").
- Accepted only at the value that changes nothing (`_NEUTRAL`), else 400: `suffix` "",
  `functions` [], `function_call` "none" or "auto" (the legacy names of tools).
- Accepted and ignored, as they never change the answer: `_IGNORED` (`user`, `metadata`, `store`,
  `service_tier`, `prompt_cache_key`, `safety_identifier`).
- Any other field: 400, its message and `param` naming it.

Logprobs are those of the distribution each token was drawn from (after penalties, bias, grammar
mask, temperature and filters; `jaxeff.inference.logits`); the prompt's, with `echo`, are the
model's own (nothing was sampled there; the first token's is null, as OpenAI's). One output
constraint per request (a schema, a regex, a grammar or a forced tool call): its masks are applied
in the step, so the answer parses unless `max_tokens` cuts it. Tools are rendered by the chat
template where it has a tools section, else in `jaxeff.data.tools`' documented default format;
replies with `<tool_call>` blocks come back as `tool_calls` (finish reason "tool_calls"), streamed
as one delta per call.

A choice's `finish_reason` is OpenAI's "stop" (an end-of-sequence or stop id, or a `stop` string)
or "length" (`max_tokens`); a request that cannot finish is an error instead. `usage.completion_tokens`
counts the tokens the answer consumed: every token generated, except that after a `stop` string
counting ends at the token whose text completed it (tokens the engine generated past it are not
counted), and a stop id is not counted (it is not returned either).

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 bad input (one
message naming the field), 401 a missing or wrong API key (every path but /health, when the server
has one), 404 an unknown model or path, 413 a body over the size limit, 429 the waiting queue is
full, 503 the server is shutting down or its engine has failed (then /health answers 503 too, and
in-flight requests fail with 503), 500 an error inside this one request (others go on). A stream
that fails once begun ends with an error event (OpenAI's error body) instead. A client that disconnects
cancels its request; the engine frees its slot before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

import fastapi
import prometheus_client
from fastapi import responses
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from jaxeff.data import tools as tools_lib
from jaxeff.errors import GenerationError, HFError
from jaxeff.generate.tokenizer import StreamDecoder, TextTokenizer
from jaxeff.inference.logits import MAX_LOGPROBS, Penalties
from jaxeff.serve.engine import Engine, EngineStoppedError, QueueFullError, Request
from jaxeff.serve.grammar import GrammarCompiler

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
  """What the server allows and calls itself.

  Args:
    model_name: the id clients pass as `model` (and `/v1/models` lists).
    api_key: when set, every endpoint but /health needs `Authorization: Bearer <api_key>`.
    max_tokens: the most new tokens one choice may ask for (None: whatever fits the cache).
    max_n: the most choices (`n`) per request.
    max_body_bytes: larger request bodies get 413.
    default_completion_tokens: `max_tokens` of a /v1/completions request that gives none (OpenAI: 16).
  """

  model_name: str = "jaxeff"
  api_key: str | None = None
  max_tokens: int | None = None
  max_n: int = 4
  max_body_bytes: int = 1 << 20
  default_completion_tokens: int = 16


class APIError(Exception):
  """An error answered as OpenAI's error body with `status`."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind=None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
      status, "server_error" if status >= 500 else "invalid_request_error"
    )

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_response(error: APIError) -> responses.JSONResponse:
  return responses.JSONResponse(error.body(), status_code=error.status)


# ---------------------------------------------------------------------- request bodies


class _Sampling(BaseModel):
  model_config = ConfigDict(extra="allow")  # unknown fields are refused by name (`_check`)

  model: str
  max_tokens: int | None = None
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's convention)
  min_p: float = Field(0.0, ge=0, le=1)
  n: int = Field(1, ge=1)
  stop: str | list[str] | None = None
  stop_token_ids: list[int] | None = None
  seed: int | None = Field(None, ge=0, lt=2**32)
  stream: bool = False
  stream_options: dict | None = None
  ignore_eos: bool = False
  presence_penalty: float = Field(0.0, ge=-2, le=2)
  frequency_penalty: float = Field(0.0, ge=-2, le=2)
  repetition_penalty: float = Field(1.0, gt=0)
  min_tokens: int = Field(0, ge=0)
  logit_bias: dict[str, float] | None = None
  response_format: dict | None = None
  # Structured output as vLLM's extension fields name it.
  guided_json: dict | str | None = None
  guided_regex: str | None = None
  guided_grammar: str | None = None
  return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:<id>"


class CompletionBody(_Sampling):
  prompt: str | list[int] | list[str] | list[list[int]]
  best_of: int | None = Field(None, ge=1)
  echo: bool = False
  suffix: str | None = None
  logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")

  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: str | list[dict] | None = None


class ChatBody(_Sampling):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = None
  logprobs: bool | None = None
  top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
  tools: list | None = None
  tool_choice: Any = None
  functions: list | None = None
  function_call: Any = None
  parallel_tool_calls: bool | None = None  # any value: "auto" may call several, a forced call is one


# Fields accepted only at the values that change nothing.
_NEUTRAL = {
  "suffix": (None, ""),
  "functions": (None, []),
  "function_call": (None, "none", "auto"),
}
# Fields that never change the answer: accepted and ignored.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


# ---------------------------------------------------------------------- text out


class TextStream:
  """New text per token, with `stop` strings: a tail that could still become a stop string is held
  back until it cannot; on a stop, the text before it is all that is returned. Constant work per
  token: only the held-back tail and the new text are searched."""

  def __init__(self, tokenizer: TextTokenizer, stop: list[str]):
    self.decoder = StreamDecoder(tokenizer)
    self.stop = [s for s in stop if s]
    self.hold = max((len(s) for s in self.stop), default=1) - 1
    self.pieces: list[str] = []  # the text returned so far
    self.tail = ""  # decoded, not returned yet: it could begin a stop string
    self.tokens = 0  # tokens consumed: up to the one that completed a stop string
    self.stopped = False

  @property
  def text(self) -> str:
    """The text so far (all of it, once `finish` has returned), cut before a stop string."""
    return "".join(self.pieces) + self.tail

  def push(self, token: int) -> str:
    self.tokens += 1
    return self._add(self.decoder.push(token), final=False)

  def finish(self) -> str:
    """The rest of the text once the tokens end (an incomplete character decodes as U+FFFD)."""
    return "" if self.stopped else self._add(self.decoder.finish(), final=True)

  def _add(self, new: str, final: bool) -> str:
    text = self.tail + new
    found = [at for s in self.stop if (at := text.find(s)) >= 0]
    if found:
      self.stopped, text, final = True, text[: min(found)], True
    # Hold back the longest tail that a stop string could still start with.
    keep = 0 if final else next((k for k in range(min(self.hold, len(text)), 0, -1) if self._could_stop(text[-k:])), 0)
    out, self.tail = text[: len(text) - keep], text[len(text) - keep :]
    if out:
      self.pieces.append(out)
    return out

  def _could_stop(self, tail: str) -> bool:
    return any(s.startswith(tail) for s in self.stop)


@dataclasses.dataclass
class _Choice:
  index: int
  request: Request
  text: TextStream
  calls: tools_lib.ToolCallStream | None = None  # a chat with tools: replies parsed for calls
  called: int = 0  # tool calls streamed so far
  scored: int = 0  # tokens whose logprobs were streamed so far


def _finish_reason(choice: _Choice, calls: bool = False) -> str:
  """OpenAI's finish reason of a choice that ended (one that failed or was cancelled raised instead)."""
  if calls:
    return "tool_calls"
  return "length" if not choice.text.stopped and choice.request.finish_reason == "length" else "stop"


# ---------------------------------------------------------------------- metrics


class _Metrics:
  """Prometheus metrics on a registry of this app's own (no process-global state)."""

  LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

  def __init__(self, engine: Engine):
    self.registry = prometheus_client.CollectorRegistry()
    r = self.registry
    running = prometheus_client.Gauge("jaxeff_requests_running", "Requests in a decode slot", registry=r)
    running.set_function(lambda: engine.num_running)
    waiting = prometheus_client.Gauge("jaxeff_requests_waiting", "Requests waiting for a slot", registry=r)
    waiting.set_function(lambda: engine.num_waiting)
    peak = prometheus_client.Gauge("jaxeff_requests_running_peak", "Most requests running at once", registry=r)
    peak.set_function(lambda: engine.totals.running_peak)
    if engine.blocks is not None:
      blocks = engine.blocks
      used = prometheus_client.Gauge("jaxeff_kv_blocks_used", "Paged cache blocks held by requests", registry=r)
      used.set_function(lambda: blocks.num_blocks - blocks.num_free)
      total = prometheus_client.Gauge("jaxeff_kv_blocks", "Paged cache blocks in the pool", registry=r)
      total.set(blocks.num_blocks)
      cached = prometheus_client.Gauge("jaxeff_kv_blocks_cached", "Blocks keyed in the prefix cache", registry=r)
      cached.set_function(lambda: blocks.num_cached)
    self.ttft = prometheus_client.Histogram(
      "jaxeff_time_to_first_token_seconds", "Submit to first token", buckets=self.LATENCY_BUCKETS, registry=r
    )
    self.itl = prometheus_client.Histogram(
      "jaxeff_inter_token_latency_seconds", "Between consecutive tokens", buckets=self.LATENCY_BUCKETS, registry=r
    )
    cache = prometheus_client.Gauge(
      "jaxeff_kv_cache_bytes", "Bytes of the KV cache (and the speculator's state)", ["policy"], registry=r
    )
    cache.labels(engine.kv_cache.name).set(engine.cache_bytes)
    self.speculating = engine.speculator is not None
    self.tokens_per_forward = prometheus_client.Histogram(
      "jaxeff_request_tokens_per_forward",
      "Per request: new tokens per target forward after prefill (speculative decoding; 1 without)",
      buckets=(1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 12, 16),
      registry=r,
    )
    self.accepted = prometheus_client.Histogram(
      "jaxeff_request_accepted_draft_tokens",
      "Per request: draft tokens accepted per verification (speculative decoding)",
      buckets=(0, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16),
      registry=r,
    )
    r.register(_EngineCounters(engine))

  def observe(self, request: Request) -> None:
    times = request.token_times
    if times:
      self.ttft.observe(times[0] - request.submitted_at)
    for a, b in zip(times, times[1:]):
      self.itl.observe(b - a)
    if self.speculating and request.forwards:
      self.tokens_per_forward.observe((len(request.tokens) - 1) / request.forwards)
      self.accepted.observe(request.accepted / request.forwards)


class _EngineCounters:
  def __init__(self, engine: Engine):
    self.engine = engine

  def collect(self):
    from prometheus_client.core import CounterMetricFamily

    totals = self.engine.totals
    yield CounterMetricFamily("jaxeff_generated_tokens", "New tokens generated", value=totals.generated_tokens)
    yield CounterMetricFamily("jaxeff_prompt_tokens", "Prompt tokens prefilled", value=totals.prompt_tokens)
    yield CounterMetricFamily(
      "jaxeff_prompt_tokens_computed",
      "Prompt tokens the model ran (not taken from the prefix cache or shared by n samples)",
      value=totals.computed_prompt_tokens,
    )
    yield CounterMetricFamily("jaxeff_grammar_masks", "Grammar masks computed (structured output)", value=totals.masks)
    yield CounterMetricFamily(
      "jaxeff_grammar_mask_seconds", "Host time computing grammar masks", value=totals.mask_seconds
    )
    finished = CounterMetricFamily("jaxeff_requests_finished", "Requests ended, by reason", labels=["reason"])
    for reason, count in sorted(totals.requests_finished.items()):
      finished.add_metric([reason], count)
    yield finished
    blocks = self.engine.blocks
    if blocks is not None:
      yield CounterMetricFamily(
        "jaxeff_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache", value=blocks.queried_tokens
      )
      yield CounterMetricFamily(
        "jaxeff_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", value=blocks.hit_tokens
      )
      yield CounterMetricFamily(
        "jaxeff_preemptions", "Requests whose blocks were taken back (recomputed later)", value=totals.preemptions
      )
    if self.engine.speculator is not None:
      yield CounterMetricFamily("jaxeff_draft_tokens", "Draft tokens proposed to live rows", value=totals.draft_tokens)
      yield CounterMetricFamily("jaxeff_accepted_tokens", "Draft tokens accepted", value=totals.accepted_tokens)


# ---------------------------------------------------------------------- the app


class _Guard:
  """ASGI middleware: API key (401) and body size (413) before anything is parsed."""

  def __init__(self, app, settings: ServerSettings):
    self.app, self.settings = app, settings

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    if self.settings.api_key is not None and scope["path"] != "/health":
      auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
      if not hmac.compare_digest(auth.encode(), f"Bearer {self.settings.api_key}".encode()):
        error = APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)", code="invalid_api_key")
        return await _error_response(error)(scope, receive, send)
    limit = self.settings.max_body_bytes
    too_big = APIError(413, f"request body over {limit} bytes", code="request_too_large")
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
      return await _error_response(too_big)(scope, receive, send)
    if scope["method"] not in ("POST", "PUT", "PATCH"):
      return await self.app(scope, receive, send)
    # Read the body here (up to the limit), then hand it on: a chunked upload is bounded too.
    body, more = b"", True
    while more:
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      body += message.get("body", b"")
      more = message.get("more_body", False)
      if len(body) > limit:
        return await _error_response(too_big)(scope, receive, send)
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}
      return await receive()

    return await self.app(scope, replay, send)


def create_app(engine: Engine, tokenizer: TextTokenizer, settings: ServerSettings | None = None) -> fastapi.FastAPI:
  """The ASGI app serving `engine`; `tokenizer` turns text into ids and back (and has the chat
  template). The app's lifespan starts the engine and, at shutdown, stops it: running requests get
  until the server's graceful-shutdown deadline, then are cancelled."""
  settings = settings or ServerSettings()
  metrics = _Metrics(engine)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.start()
    yield
    await asyncio.to_thread(engine.stop, 0.0)

  app = fastapi.FastAPI(title="jaxeff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
  app.state.engine, app.state.metrics = engine, metrics
  app.add_middleware(_Guard, settings=settings)

  @app.exception_handler(APIError)
  async def api_error(request, error: APIError):
    return _error_response(error)

  @app.exception_handler(RequestValidationError)
  async def bad_body(request, error: RequestValidationError):
    first = error.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
      return _error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return _error_response(APIError(400, f"{where}{first.get('msg', 'invalid value')}", param=param))

  @app.exception_handler(Exception)
  async def internal(request, error: Exception):
    log.exception("unexpected error")
    return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", code="internal_error"))

  @app.exception_handler(404)
  async def not_found(request, error):
    return _error_response(APIError(404, f"no such endpoint: {request.method} {request.url.path}"))

  @app.exception_handler(405)
  async def wrong_method(request, error):
    return _error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

  def _engine_failed() -> APIError:
    return APIError(503, str(engine.failure), code="engine_failed")

  def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="unavailable")

  @app.get("/health")
  async def health():
    if engine.failure is not None:
      return _error_response(_engine_failed())
    return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

  @app.get("/metrics")
  async def metrics_text():
    return responses.Response(
      prometheus_client.generate_latest(metrics.registry), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )

  @app.get("/v1/models")
  async def models():
    model = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "jaxeff"}
    return {"object": "list", "data": [model]}

  # Made on the first constrained request: a tokenizer the grammar engine cannot read fails only those.
  _compiler = functools.cache(lambda: GrammarCompiler(tokenizer, engine.cfg.vocab_size))

  @app.post("/v1/completions")
  async def completions(body: CompletionBody, http: fastapi.Request):
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
      prompts = [prompts]
    if not prompts:
      raise APIError(400, "prompt is empty", param="prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    return await _respond(body, ids, http, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatBody, http: fastapi.Request):
    if body.max_completion_tokens is not None and body.max_tokens is None:
      body.max_tokens = body.max_completion_tokens
    messages = [m.model_dump(exclude_none=True) | {"content": m.content} for m in body.messages]
    for i, m in enumerate(messages):
      if isinstance(m["content"], list) and any(part.get("type") != "text" for part in m["content"]):
        raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
    try:
      text = tools_lib.render_messages(tokenizer, messages, body.tools or None, body.tool_choice)
    except GenerationError as e:
      raise APIError(400, str(e), param=getattr(e, "param", None) or "messages") from e
    except HFError as e:
      raise APIError(400, str(e), param="messages") from e
    # The template writes the special tokens itself (BOS included).
    return await _respond(body, [tokenizer.encode(text, add_special_tokens=False)], http, chat=True)

  def _grammar_spec(body: _Sampling, chat: bool) -> tuple[str, dict] | None:
    """(the field that asked, the structured-output spec) of a request, if one asks; 400 when
    several do, or one is malformed."""
    specs = []
    rf = body.response_format
    if rf is not None:
      kind = rf.get("type") if isinstance(rf, dict) else None
      if kind == "json_object":
        specs.append(("response_format", {"type": "json_object"}))
      elif kind == "json_schema":
        specs.append(("response_format", {"type": "json_schema", "json_schema": rf.get("json_schema")}))
      elif kind != "text":
        raise APIError(
          400, "response_format: type must be text, json_object or json_schema, got " + json.dumps(kind),
          param="response_format",
        )  # fmt: skip
    if body.guided_json is not None:
      schema = body.guided_json
      if isinstance(schema, str):
        try:
          schema = json.loads(schema)
        except json.JSONDecodeError as e:
          raise APIError(400, f"guided_json: not valid JSON ({e})", param="guided_json") from e
      specs.append(("guided_json", {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": schema}}))
    if body.guided_regex is not None:
      specs.append(("guided_regex", {"type": "regex", "pattern": body.guided_regex}))
    if body.guided_grammar is not None:
      specs.append(("guided_grammar", {"type": "grammar", "grammar": body.guided_grammar}))
    if chat and body.tools:
      try:
        forced = tools_lib.call_grammar(body.tools, body.tool_choice)
      except GenerationError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None) or "tools") from e
      if forced is not None:
        specs.append(("tool_choice", forced))
    if len(specs) > 1:
      names = " and ".join(name for name, _ in specs)
      raise APIError(400, f"{specs[1][0]}: one output constraint per request, got {names}", param=specs[1][0])
    return specs[0] if specs else None

  def _check(body: _Sampling, ids: list[list[int]], chat: bool) -> int:
    """Validates what pydantic cannot; the max_tokens to use (0: an echo that generates nothing)."""
    if body.model != settings.model_name:
      raise APIError(
        404,
        f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
        param="model",
        code="model_not_found",
      )
    for name in body.model_extra or {}:
      if name not in _IGNORED:
        raise APIError(400, f"{name} is not supported by this server", param=name)
    for name, neutral in _NEUTRAL.items():
      value = getattr(body, name) if name in type(body).model_fields else neutral[0]
      if not any(type(value) is type(n) and value == n for n in neutral):
        allowed = " or ".join(json.dumps(n) for n in neutral)
        raise APIError(400, f"{name} is not supported by this server (only {allowed})", param=name)
    vocab = engine.cfg.vocab_size
    for key in body.logit_bias or {}:
      if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
        raise APIError(400, f"logit_bias: keys must be token ids in [0, {vocab}), got {key!r}", param="logit_bias")
      if not -100 <= body.logit_bias[key] <= 100:
        raise APIError(
          400, f"logit_bias: values must lie in [-100, 100], got {body.logit_bias[key]}", param="logit_bias"
        )
    if getattr(body, "echo", False) and body.stream:
      raise APIError(400, "echo: not supported with stream (ask without streaming)", param="echo")
    if chat and body.top_logprobs and not body.logprobs:
      raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    best_of = getattr(body, "best_of", None) or body.n
    if best_of < body.n:
      raise APIError(400, f"best_of ({best_of}) must be at least n ({body.n})", param="best_of")
    if best_of > body.n and body.stream:
      raise APIError(400, "best_of: a stream cannot choose the best of several answers", param="best_of")
    if any(not 0 <= t < vocab for t in body.stop_token_ids or ()):
      raise APIError(400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids")
    if best_of > settings.max_n:
      which = "n" if best_of == body.n else "best_of"
      raise APIError(400, f"{which}={best_of} is over this server's limit of {settings.max_n}", param=which)
    if len(ids) * best_of > max(settings.max_n, engine.max_waiting):
      raise APIError(400, f"{len(ids)} prompts x n={best_of} is more than this server takes at once", param="prompt")
    longest = max(len(p) for p in ids)
    if any(len(p) == 0 for p in ids):
      raise APIError(400, "the prompt encodes to no tokens", param="prompt")
    if any(min(p) < 0 or max(p) >= vocab for p in ids):
      raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    # What the cache policy leaves (a bounded cache: any number; then a request with no max_tokens
    # ends at max_seq_len new tokens unless the server caps them).
    room = engine.room(longest)
    cap = engine.max_seq_len if room is None else room
    cap = cap if settings.max_tokens is None else min(cap, settings.max_tokens)
    if room is not None and room < 1:
      raise APIError(
        400,
        f"the prompt has {longest} tokens; this server's context is {engine.max_seq_len} tokens, prompt and "
        "completion together",
        param="messages" if chat else "prompt",
        code="context_length_exceeded",
      )
    max_tokens = body.max_tokens
    if max_tokens is None:
      return cap if chat else min(cap, settings.default_completion_tokens)
    if max_tokens == 0 and getattr(body, "echo", False):
      return 0  # scoring the prompt (its logprobs), nothing new
    if max_tokens < 1:
      raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if settings.max_tokens is not None and max_tokens > settings.max_tokens:
      raise APIError(
        400, f"max_tokens={max_tokens} is over this server's limit of {settings.max_tokens}", param="max_tokens"
      )
    if room is not None and max_tokens > room:
      raise APIError(
        400,
        f"the prompt has {longest} tokens and max_tokens is {max_tokens}: {longest + max_tokens} is more than "
        f"this server's context of {engine.max_seq_len} tokens",
        param="max_tokens",
        code="context_length_exceeded",
      )
    return max_tokens

  def _top(body: _Sampling, chat: bool) -> int | None:
    """Top logprobs per token the answer carries (None: no logprobs)."""
    if chat:
      return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs

  def _submit(body: _Sampling, ids: list[list[int]], max_tokens: int, chat: bool) -> list[_Choice]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
      raise APIError(400, f"at most 4 stop strings, got {len(stops)}", param="stop")
    stop_ids = () if body.ignore_eos else tokenizer.stop_tokens
    stop_ids = tuple(dict.fromkeys([*stop_ids, *(body.stop_token_ids or ())]))
    spec = _grammar_spec(body, chat)
    grammar = None
    if spec is not None:
      try:
        grammar = _compiler().compile(spec[1])
      except GenerationError as e:
        raise APIError(400, f"{spec[0]}: {e}", param=spec[0]) from e
    best_of = getattr(body, "best_of", None) or body.n
    top = _top(body, chat)
    echo = getattr(body, "echo", False)
    penalties = Penalties(
      presence=body.presence_penalty,
      frequency=body.frequency_penalty,
      repetition=body.repetition_penalty,
      min_tokens=body.min_tokens,
      logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
    )
    with_calls = chat and bool(body.tools) and body.tool_choice != "none"
    choices: list[_Choice] = []
    try:
      for p in ids:
        requests = engine.submit_many(
          p,
          best_of,
          max_tokens=max(max_tokens, 1),
          temperature=body.temperature,
          top_k=body.top_k if body.top_k and body.top_k > 0 else None,
          top_p=body.top_p if body.top_p < 1 else None,
          min_p=body.min_p if body.min_p > 0 else None,
          seed=body.seed,
          stop_tokens=stop_ids,
          penalties=penalties,
          logprobs=top if best_of == body.n else (top or 0),  # best_of ranks by logprob
          prompt_logprobs=echo and top is not None,
          grammar=grammar,
        )
        for request in requests:
          calls = tools_lib.ToolCallStream() if with_calls else None
          choices.append(_Choice(len(choices), request, TextStream(tokenizer, stops), calls))
    except (QueueFullError, EngineStoppedError, GenerationError) as e:
      for c in choices:
        c.request.cancel()
      if isinstance(e, QueueFullError):
        raise APIError(429, f"server busy: {e}", code="rate_limit_exceeded", kind="rate_limit_error") from e
      if isinstance(e, EngineStoppedError):
        raise (_engine_failed() if engine.failure else _shutting_down()) from e
      raise APIError(400, str(e)) from e
    return choices

  def _usage(choices: list[_Choice], prompt: int) -> dict:
    completion = sum(c.text.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

  def _piece(token: int, as_ids: bool = False) -> str:
    return f"token_id:{token}" if as_ids else tokenizer.decode([token], skip_special_tokens=False)

  def _chat_logprobs(entries, top: int, as_ids: bool) -> list[dict]:
    """OpenAI's chat `logprobs.content` items of (token, (logprob, top alternatives)) pairs."""

    def item(token, logprob):  # bytes: the token's own, so pieces of a UTF-8 character join up
      return {"token": _piece(token, as_ids), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    return [item(t, lp) | {"top_logprobs": [item(a, v) for a, v in alts[:top]]} for t, (lp, alts) in entries]

  def _completion_logprobs(entries, top: int, as_ids: bool, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` of (token, entry or None) pairs; text offsets from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in entries:
      out["tokens"].append(_piece(token, as_ids))
      out["text_offset"].append(offset)
      offset += len(_piece(token))
      out["token_logprobs"].append(None if entry is None else entry[0])
      out["top_logprobs"].append(None if entry is None else {_piece(a, as_ids): v for a, v in entry[1][:top]})
    return out

  def _scored(choice: _Choice, start: int, stop: int) -> list:
    r = choice.request
    return [(r.tokens[k], r.logprobs[k]) for k in range(start, min(stop, len(r.logprobs)))]

  async def _respond(body: _Sampling, ids: list[list[int]], http: fastapi.Request, chat: bool):
    max_tokens = _check(body, ids, chat)
    choices = _submit(body, ids, max_tokens, chat)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    kind = "chat.completion" if chat else "text_completion"
    top, as_ids = _top(body, chat), body.return_tokens_as_token_ids
    if body.stream:
      include_usage = bool((body.stream_options or {}).get("include_usage"))
      return responses.StreamingResponse(
        _stream(choices, ids, rid, kind, chat, include_usage, top, max_tokens, as_ids),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
      )
    try:
      await _collect(choices, http, max_tokens)
    except asyncio.CancelledError:
      for c in choices:
        c.request.cancel()
      raise
    usage = _usage(choices, sum(len(p) for p in ids))
    if len(choices) > len(ids) * body.n:  # best_of: per prompt, the n with the best mean logprob per token
      per = len(choices) // len(ids)

      def mean(c):
        lps = [lp for lp, _ in c.request.logprobs[: c.text.tokens]]
        return sum(lps) / max(len(lps), 1)

      choices = [
        c for k in range(len(ids)) for c in sorted(choices[k * per : (k + 1) * per], key=mean, reverse=True)[: body.n]
      ]
      for index, c in enumerate(choices):
        c.index = index
    out = []
    for c in choices:
      c.text.finish()
      text = c.text.text
      if chat:
        message, calls = {"role": "assistant", "content": text}, []
        if c.calls is not None:
          content, calls = tools_lib.parse_tool_calls(text)
          if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
        item = {"index": c.index, "message": message, "finish_reason": _finish_reason(c, bool(calls))}
        if top is not None:
          item["logprobs"] = {"content": _chat_logprobs(_scored(c, 0, c.text.tokens), top, as_ids)}
        else:
          item["logprobs"] = None
      else:
        logprobs = None
        if getattr(body, "echo", False):
          prompt = c.request.prompt.tolist()
          prompt_text = tokenizer.decode(prompt)
          text = prompt_text + text
          if top is not None:
            scored = list(zip(prompt, c.request.prompt_logprobs)) + _scored(c, 0, c.text.tokens)
            logprobs = _completion_logprobs(scored, top, as_ids)
        elif top is not None:
          logprobs = _completion_logprobs(_scored(c, 0, c.text.tokens), top, as_ids)
        item = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(c)}
      out.append(item)
    return {
      "id": rid,
      "object": kind,
      "created": int(time.time()),
      "model": settings.model_name,
      "choices": out,
      "usage": usage,
    }

  async def _run_choice(choice: _Choice, on_text=None, max_tokens: int = 1) -> None:
    """Feeds the choice's tokens through its text stream until it ends (or hits a stop string);
    raises an `APIError` if it cannot end so. max_tokens 0 (an echo that scores the prompt): the
    token generated to get there is dropped."""
    try:
      async for token in choice.request:
        if max_tokens == 0:
          choice.request.cancel()
          break
        piece = choice.text.push(token)
        if on_text is not None and piece:
          await on_text(choice, piece)
        if choice.text.stopped:
          choice.request.cancel()
          break
    except EngineStoppedError as e:  # the engine failed (and logged why) or is stopping
      raise (_engine_failed() if engine.failure else _shutting_down()) from e
    except Exception as e:  # this request failed (in the engine or here); the others go on
      log.warning("request %d failed: %s", choice.request.id, e)
      raise APIError(500, f"generation failed: {e}", code="internal_error") from e
    finally:
      metrics.observe(choice.request)
    stopped_here = choice.text.stopped or max_tokens == 0
    if choice.request.finish_reason == "cancelled" and not stopped_here:  # the engine stopped under it
      raise _shutting_down()

  async def _collect(choices: list[_Choice], http: fastapi.Request, max_tokens: int) -> None:
    work = asyncio.gather(*(_run_choice(c, max_tokens=max_tokens) for c in choices))
    watch = asyncio.ensure_future(_watch_disconnect(http))
    try:
      done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
      if work not in done:  # the client went away
        for c in choices:
          c.request.cancel()
        work.cancel()
        raise APIError(499, "client disconnected")
      work.result()
    finally:
      watch.cancel()
      for c in choices:
        c.request.cancel()  # no-op for ended ones; frees the others if one failed

  async def _watch_disconnect(http: fastapi.Request) -> None:
    while not await http.is_disconnected():
      await asyncio.sleep(0.05)

  async def _stream(choices, ids, rid, kind, chat, include_usage, top, max_tokens, as_ids):
    created_at = int(time.time())
    events: asyncio.Queue = asyncio.Queue()
    tasks: list[asyncio.Future] = []

    def chunk(choice_list, usage=None):
      data = {
        "id": rid,
        "object": f"{kind}.chunk",
        "created": created_at,
        "model": settings.model_name,
        "choices": choice_list,
      }
      if usage is not None:
        data["usage"] = usage
      return f"data: {json.dumps(data)}\n\n"

    def logprobs(choice, upto):
      if top is None:
        return None
      entries = _scored(choice, choice.scored, upto)
      choice.scored = max(choice.scored, min(upto, len(choice.request.logprobs)))
      return {"content": _chat_logprobs(entries, top, as_ids)} if chat else _completion_logprobs(entries, top, as_ids)

    def deltas(choice, text, finish=None) -> list[dict]:
      lp = logprobs(choice, choice.text.tokens)
      if not chat:
        return [{"index": choice.index, "text": text, "logprobs": lp, "finish_reason": finish}]
      parts = [{"content": text}] if choice.calls is None else choice.calls.push(text)
      if finish is not None and choice.calls is not None:
        parts += choice.calls.finish()
      out = []
      for part in parts:
        if "tool_calls" in part:
          calls = []
          for call in part["tool_calls"]:
            calls.append(call | {"index": choice.called})
            choice.called += 1
          part = {"tool_calls": calls}
        elif not part.get("content"):
          continue
        out.append({"index": choice.index, "delta": part, "logprobs": None, "finish_reason": None})
      if finish is not None:
        reason = "tool_calls" if choice.called else finish
        out.append({"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": reason})
      if lp is not None and lp["content"]:
        if not out:
          out.append({"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": None})
        out[0]["logprobs"] = lp
      return out

    async def on_text(choice, piece):
      parts = deltas(choice, piece)
      if parts:
        await events.put(chunk(parts))

    async def run(choice):
      try:
        await _run_choice(choice, on_text, max_tokens)
      except APIError as e:
        await events.put(f"data: {json.dumps(e.body())}\n\n")
        return
      rest = choice.text.finish()
      usage = _usage([choice], choice.request.prompt.size)
      await events.put(chunk(deltas(choice, rest, _finish_reason(choice)), usage))

    try:
      if chat:
        yield chunk(
          [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for c in choices]
        )
      tasks += [asyncio.ensure_future(run(c)) for c in choices]
      # Every choice's events are queued before its task ends, so None comes last.
      asyncio.gather(*tasks).add_done_callback(lambda _: events.put_nowait(None))
      while (event := await events.get()) is not None:
        yield event
      if include_usage:
        yield chunk([], _usage(choices, sum(len(p) for p in ids)))
      yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects and the response is cancelled
      for c in choices:
        c.request.cancel()
      for t in tasks:
        t.cancel()

  return app
