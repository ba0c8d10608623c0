"""Loading a model and its tokenizer into an engine (a training run, a converted Hugging Face
folder or a Hugging Face checkpoint folder), and running the app with uvicorn in a background thread
(used by tests and benchmarks/serve_load.py; ``moekit serve`` runs uvicorn in the foreground)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..lm import LM
from .engine import Engine, ServeLimits


def load_engine(checkpoint: str | Path, limits: ServeLimits | None = None, model_name: str | None = None,
                tokenizer: str | Path | None = None, max_context: int | None = None,
                adapter: str | Path | None = None) -> Engine:
    """Engine over a model with its tokenizer (see ``load_model``); not started yet.

    ``max_context`` caps the positions served per sequence below the model's ``max_seq_len``: the
    KV caches of ``max_batch`` sequences are preallocated at that length, and Hugging Face models
    declare 32k-160k positions.

    The weights are scanned on load (``moekit.health.scan_weights``): experts with NaN/Inf weights
    are quarantined (masked) before the first request and reported as such.

    ``adapter``: a LoRA adapter file (``moekit recipe lora``) merged into the weights before
    serving, so requests run the plain model at its own speed.
    """
    model, tok, findings = load_model(checkpoint, tokenizer)
    if adapter is not None:
        from ..adapters import load_adapter

        load_adapter(model, adapter, merge=True)
    if max_context is not None:
        if not isinstance(max_context, int) or max_context < 2:
            raise ValueError(f"max_context={max_context!r} must be an int >= 2")
        model.config = dataclasses.replace(model.config, max_seq_len=min(max_context, model.config.max_seq_len))
    name = model_name or Path(checkpoint).resolve().name
    engine = Engine(model, tok, limits, model_name=name)
    for finding in findings:
        engine.quarantined[finding.layer].add(finding.expert)
    return engine


def load_model(path: str | Path, tokenizer: str | Path | None = None) -> tuple[LM, Any, list[Any]]:
    """(model in eval mode, serving tokenizer, corrupt-expert findings) from any of

    - a training run folder or checkpoint file: its TrainConfig's tokenizer (prompts encoded as
      in training: no special tokens added);
    - a folder written by ``moekit convert --from-hf`` (moekit_lm.json + model.safetensors);
    - a Hugging Face checkpoint folder (config.json + safetensors, e.g. a hub snapshot).

    The last two are served with the folder's own tokenizer (tokenizer.json, tokenizer_config.json
    with its chat template, generation_config.json's end ids). ``tokenizer`` overrides it: "byte",
    or a tokenizer folder or tokenizer.json.
    """
    from ..hf.convert import MOEKIT_CONFIG, from_hf, load_moekit
    from ..health import quarantine_experts, scan_weights
    from .text import HFServeTokenizer, load_serve_tokenizer

    path = Path(path)
    run_folder = (path / "checkpoints").is_dir()  # a training run's config.json is its TrainConfig
    if path.is_dir() and ((path / MOEKIT_CONFIG).is_file() or ((path / "config.json").is_file() and not run_folder)):
        model = load_moekit(path) if (path / MOEKIT_CONFIG).is_file() else from_hf(path)
        findings = scan_weights(model)
        if findings:
            quarantine_experts(model, findings)
        if tokenizer is None and not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(f"{path} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
                                    f"name one with --tokenizer PATH")
        tok = load_serve_tokenizer(path if tokenizer is None else tokenizer)
    else:
        from ..data.tokenizer import ByteTokenizer, load_tokenizer
        from ..train import load_checked

        model, cfg, findings = load_checked(path, quarantine=True)
        if tokenizer is not None:
            tok = load_serve_tokenizer(tokenizer)
        else:
            trained = load_tokenizer(cfg.tokenizer)
            if isinstance(trained, ByteTokenizer):
                tok = trained
            else:  # the ids the model was trained on: no special tokens, the training end id
                tok = HFServeTokenizer.load(cfg.tokenizer, add_special_tokens=False)
                tok.eos_id, tok.eos_ids = trained.eos_id, frozenset([trained.eos_id])
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {getattr(tok, 'name', '')} has {tok.vocab_size} ids but the model at {path} "
                         f"embeds {model.config.vocab_size} (vocab_size); pass the model's own tokenizer")
    return model, tok, findings


# Files that make a folder a tokenizer folder (one is enough; transformers' AutoTokenizer reads the rest).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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
