"""Serving: `Engine` (continuous batching over the static KV cache) and `python -m jaxeff.serve`
(an OpenAI-compatible HTTP server on it, `jaxeff.serve.app`; needs the `serve` extra)."""

from jaxeff.serve.engine import Engine, EngineStoppedError, QueueFullError, Request, RequestParams

__all__ = ["Engine", "EngineStoppedError", "QueueFullError", "Request", "RequestParams"]
