"""Serving: `Engine` (continuous batching on the inference core's model runner) and `python -m
jaxeff.serve` (an OpenAI-compatible HTTP server on it, `jaxeff.serve.app`; needs the `serve` extra)."""

from jaxeff.serve.engine import (
  Engine,
  EngineFailedError,
  EngineStoppedError,
  QueueFullError,
  Request,
  RequestParams,
)

__all__ = ["Engine", "EngineFailedError", "EngineStoppedError", "QueueFullError", "Request", "RequestParams"]
