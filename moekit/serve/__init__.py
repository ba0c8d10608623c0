"""Serving: continuous batching behind an OpenAI-compatible HTTP API, Prometheus metrics, live
expert masking with NaN/Inf quarantine, and a dashboard page.

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); ``import moekit`` does not
import this package. Entry points: ``moekit serve CHECKPOINT`` on the command line, or
``create_app(Engine(model, tokenizer, ServeLimits(...)))`` for any ASGI server.
"""

from .engine import Engine, GenRequest, QueueFullError, ServeLimits
from .server import BackgroundServer, load_engine

__all__ = ["Engine", "GenRequest", "QueueFullError", "ServeLimits", "BackgroundServer", "load_engine", "create_app"]


def __getattr__(name: str) -> object:  # create_app is imported lazily: it needs fastapi
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'moekit.serve' has no attribute {name!r}")
