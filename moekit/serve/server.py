"""Loading a checkpoint into an engine, and running the app with uvicorn in a background thread
(used by tests and benchmarks/serve_load.py; ``moekit serve`` runs uvicorn in the foreground)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from .engine import Engine, ServeLimits


def load_engine(checkpoint: str | Path, limits: ServeLimits | None = None, model_name: str | None = None) -> Engine:
    """Engine over a trained checkpoint (file or run folder) with its tokenizer; not started yet.

    The weights are scanned on load (``moekit.health.load_checked``): experts with NaN/Inf weights
    are quarantined (masked) before the first request and reported as such.
    """
    from ..data.tokenizer import load_tokenizer
    from ..health import load_checked

    model, cfg, findings = load_checked(checkpoint, quarantine=True)
    name = model_name or Path(checkpoint).resolve().name
    engine = Engine(model, load_tokenizer(cfg.tokenizer), limits, model_name=name)
    for finding in findings:
        engine.quarantined[finding.layer].add(finding.expert)
    return engine


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving ``app`` on ``host``:``port`` (a free port by default) in a daemon thread.

    Use as a context manager; ``url`` is the base address. Startup errors re-raise here.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30.0) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.timeout_s = timeout_s
        self._thread = threading.Thread(target=self.server.run, name="moekit-serve-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self.timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"uvicorn failed to start on {self.url}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start on {self.url} within {self.timeout_s} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(self.timeout_s)
