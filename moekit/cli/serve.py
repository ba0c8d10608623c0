"""`moekit serve CHECKPOINT`: serve a trained checkpoint over an OpenAI-compatible HTTP API with
continuous batching, Prometheus /metrics, live expert masking and a /dashboard page."""

from __future__ import annotations

import argparse
import sys

from .common import POSITIVE_INT, int_at_least


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as err:
        raise ImportError(f"`moekit serve` needs the serve extra ({err}); install it with "
                          f"pip install 'moekit[serve]'") from None
    import torch

    from ..serve.engine import ServeLimits
    from ..serve.server import load_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_batch=args.max_batch, queue_size=args.queue_size, max_tokens=args.max_tokens,
                         max_prompt_tokens=args.max_prompt_tokens, retry_after_s=args.retry_after,
                         admin_token=args.admin_token)
    engine = load_engine(args.checkpoint, limits, model_name=args.model_name, tokenizer=args.tokenizer,
                         max_context=args.max_context)
    app = create_app(engine)
    print(f"moekit serve: {engine.model_name} on http://{args.host}:{args.port} "
          f"(dashboard: /dashboard, metrics: /metrics)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI-style /v1/completions)")
    p.add_argument("checkpoint", help="checkpoint file, a run folder (uses its latest checkpoint), a folder from "
                                      "`moekit convert --from-hf`, or a Hugging Face checkpoint folder")
    p.add_argument("--tokenizer", default=None, help="'byte', or a tokenizer folder / tokenizer.json (default: the "
                                                     "run's tokenizer, or the model folder's own)")
    p.add_argument("--max-context", type=int_at_least(2), default=None,
                   help="positions served per sequence (default: the model's; KV caches for --max-batch sequences "
                        "are preallocated at this length)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_at_least(0, 65535), default=8000)
    p.add_argument("--max-batch", type=POSITIVE_INT, default=8, help="running sequences per decode step (1: no batching)")
    p.add_argument("--queue-size", type=POSITIVE_INT, default=64, help="waiting requests before answering 429")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=POSITIVE_INT, default=None,
                   help="longest prompt (default: the context - 1)")
    p.add_argument("--retry-after", type=POSITIVE_INT, default=1, help="seconds sent in Retry-After with a 429")
    p.add_argument("--admin-token", default=None, help="bearer token the /admin endpoints require")
    p.add_argument("--model-name", default=None, help="name reported in responses (default: the checkpoint's)")
    p.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)
