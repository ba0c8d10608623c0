"""`moekit generate RUN --prompt TEXT`: sample from a trained checkpoint with a KV cache."""

from __future__ import annotations

import argparse
import contextlib
import sys

from .common import NONNEGATIVE_INT, NONNEGATIVE_NUMBER, POSITIVE_INT, load_run, number_in


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import ConfigError
    from ..data.tokenizer import load_tokenizer
    from ..lm.generate import generate
    from ..replay import record_routing

    loaded = load_run(args.checkpoint)
    model, cfg = loaded.model, loaded.cfg
    if args.quantize is not None:  # weight-only int8 experts, applied after loading
        from ..experts.int8 import quantize_experts

        quantize_experts(model, args.quantize)
    tok = load_tokenizer(cfg.tokenizer)
    ids = tok.encode(args.prompt) or [tok.eos_id]
    if len(ids) >= model.config.max_seq_len:
        raise ConfigError(f"--prompt is {len(ids)} tokens; the model's context max_seq_len="
                          f"{model.config.max_seq_len} leaves no room for a new token")
    prompt = torch.tensor([ids], dtype=torch.long)
    with contextlib.ExitStack() as stack:
        recorder = stack.enter_context(record_routing(model)) if args.record_routing else None
        out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, stop_token=tok.eos_id if args.stop_at_eos else None)
    print(tok.decode(out[0].tolist()))
    if recorder is not None:
        # The last token was sampled, never fed: the record covers a training forward's input.
        record = recorder.record(tokens=out[:, :-1])
        record.save(args.record_routing)
        print(f"routing of {record.shape[1]} tokens in {len(record.layers)} MoE layers written to "
              f"{args.record_routing}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (greedy or sampled)")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (uses its latest checkpoint)")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=200,
                   help="at most this many (fewer where the context ends)")
    p.add_argument("--temperature", type=NONNEGATIVE_NUMBER, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=number_in(0.0, 1.0, low_open=True), default=0.95)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="run the experts as weight-only int8 (per-channel scales), quantised after loading")
    p.add_argument("--stop-at-eos", action="store_true")
    p.add_argument("--record-routing", metavar="FILE", default=None,
                   help="write each token's experts per MoE layer (safetensors) for router replay in training")
    p.set_defaults(func=run)
