"""`moekit generate RUN --prompt TEXT`: sample from a trained checkpoint with a KV cache."""

from __future__ import annotations

import argparse

from .data import friendly_errors


@friendly_errors
def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..lm.generate import generate
    from ..train.trainer import load_trained

    model, cfg, _ = load_trained(args.checkpoint)
    tok = load_tokenizer(cfg.tokenizer)
    ids = tok.encode(args.prompt) or [tok.eos_id]
    prompt = torch.tensor([ids], dtype=torch.long)
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed, stop_token=tok.eos_id if args.stop_at_eos else None)
    print(tok.decode(out[0].tolist()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (greedy or sampled)")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (uses its latest checkpoint)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eos", action="store_true")
    p.set_defaults(func=run)
