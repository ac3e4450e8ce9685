"""Shared by the serving tests: a tiny byte-level model with a chat template, and a real server
(uvicorn on 127.0.0.1, a free port) in a background thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from flax import nnx

from jaxeff import ModelConfig
from jaxeff.data.tokenizer import ByteTokenizer
from jaxeff.models import Llama

BOS, EOS = 256, 257
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
  "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_tokenizer() -> ByteTokenizer:
  """UTF-8 bytes as ids 0-255, BOS 256, EOS 257 (the stop id), and a small chat template."""
  return ByteTokenizer(
    bos_id=BOS, eod_id=EOS, chat_template=CHAT_TEMPLATE, special_tokens={"bos_token": "", "eos_token": ""}
  )


def tiny_model(seed: int = 0, **overrides) -> Llama:
  settings = dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
  cfg = ModelConfig(**(settings | overrides))
  return Llama(cfg, rngs=nnx.Rngs(seed))


@contextlib.contextmanager
def running_server(app):
  """Serves `app` on 127.0.0.1 at a free port in a thread; yields the base URL (.../v1)."""
  import uvicorn

  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 60
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start")
    time.sleep(0.01)
  try:
    yield f"http://127.0.0.1:{port}/v1"
  finally:
    server.should_exit = True
    thread.join(30)
