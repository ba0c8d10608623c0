"""`moekit serve CHECKPOINT`: serve a trained checkpoint over an OpenAI-compatible HTTP API with
continuous batching, Prometheus /metrics, live expert masking and a /dashboard page."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from .common import POSITIVE_INT, int_at_least


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as err:
        raise ImportError(f"`moekit serve` needs the serve extra ({err}); install it with "
                          f"pip install 'moekit[serve]'") from None
    import torch

    from ..config import ConfigError
    from ..serve.engine import ServeLimits
    from ..serve.server import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_batch=args.max_batch, queue_size=args.queue_size, max_tokens=args.max_tokens or 256,
                         max_prompt_tokens=args.max_prompt_tokens, retry_after_s=args.retry_after,
                         admin_token=admin_token(args), protect_stats=args.protect_stats,
                         max_body_bytes=args.max_body_bytes)
    engine = load_engine(args.checkpoint, limits, model_name=args.model_name, tokenizer=args.tokenizer,
                         max_context=args.max_context, adapter=args.adapter)
    context = engine.model.config.max_seq_len
    if args.max_tokens is not None and args.max_tokens >= context:
        raise ConfigError(f"--max-tokens {args.max_tokens} must be below the model's context of {context} tokens")
    engine.limits.max_tokens = min(engine.limits.max_tokens, context - 1)
    app = create_app(engine)
    print(f"moekit serve: {engine.model_name} on http://{args.host}:{args.port} "
          f"(dashboard: /dashboard, metrics: /metrics)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(args: argparse.Namespace) -> str | None:
    """The admin token from --admin-token-file, else $MOEKIT_ADMIN_TOKEN, else None (admin endpoints off).
    A token on the command line would show in `ps`; none is accepted there. Without a token, a
    --host other than loopback is refused."""
    from ..config import ConfigError

    token = None
    if args.admin_token_file is not None:
        path = Path(args.admin_token_file)
        if not path.is_file():
            raise ConfigError(f"--admin-token-file {path} is not a file")
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ConfigError(f"--admin-token-file {path} is empty")
    elif os.environ.get("MOEKIT_ADMIN_TOKEN"):
        token = os.environ["MOEKIT_ADMIN_TOKEN"].strip()
    if token is not None and len(token) < 8:
        raise ConfigError("the admin token must hold at least 8 characters")
    if token is None and not is_loopback(args.host):
        raise ConfigError(f"--host {args.host} is not loopback: give an admin token (--admin-token-file FILE or "
                          "MOEKIT_ADMIN_TOKEN) before serving beyond this machine")
    if args.protect_stats and token is None:
        raise ConfigError("--protect-stats needs an admin token (--admin-token-file FILE or MOEKIT_ADMIN_TOKEN)")
    return token


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI-style /v1/completions)")
    p.add_argument("checkpoint", help="checkpoint file, a run folder (uses its latest checkpoint), a folder from "
                                      "`moekit convert --from-hf`, or a Hugging Face checkpoint folder")
    p.add_argument("--tokenizer", default=None, help="'byte', or a tokenizer folder / tokenizer.json (default: the "
                                                     "run's tokenizer, or the model folder's own)")
    p.add_argument("--adapter", default=None,
                   help="LoRA adapter file (from `moekit recipe lora`), merged into the weights before serving")
    p.add_argument("--max-context", type=int_at_least(2), default=None,
                   help="positions served per sequence (default: the model's; KV caches for --max-batch sequences "
                        "are preallocated at this length)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_at_least(0, 65535), default=8000)
    p.add_argument("--max-batch", type=POSITIVE_INT, default=8, help="running sequences per decode step (1: no batching)")
    p.add_argument("--queue-size", type=POSITIVE_INT, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=None,
                   help="largest max_tokens a request may ask for (default: 256, or the context - 1 if smaller)")
    p.add_argument("--max-prompt-tokens", type=POSITIVE_INT, default=None,
                   help="longest prompt (default: the context - 1)")
    p.add_argument("--retry-after", type=POSITIVE_INT, default=1, help="seconds sent in Retry-After with a 429")
    p.add_argument("--admin-token-file", default=None,
                   help="file holding the bearer token the /admin endpoints require (else $MOEKIT_ADMIN_TOKEN; "
                        "without either the admin endpoints are off)")
    p.add_argument("--protect-stats", action="store_true",
                   help="require the admin token for /v1/stats and /metrics too (they show masked experts)")
    p.add_argument("--max-body-bytes", type=POSITIVE_INT, default=1 << 20,
                   help="largest request body; a larger one is answered 413 before it is read")
    p.add_argument("--model-name", default=None, help="name reported in responses (default: the checkpoint's)")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
