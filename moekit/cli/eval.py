"""`moekit eval RUN`: validation loss overall and per label of a trained checkpoint."""

from __future__ import annotations

import argparse
import json

from .data import friendly_errors


@friendly_errors
def run(args: argparse.Namespace) -> int:
    from ..train.trainer import Trainer, load_trained, prepare_data

    model, cfg, _ = load_trained(args.checkpoint)
    if args.mask_experts:
        from ..config import ConfigError
        from ..health import parse_mask_spec
        from ..model_ops import mask_experts

        try:
            mask_experts(model, parse_mask_spec(args.mask_experts))
        except (ValueError, KeyError, IndexError) as err:
            raise ConfigError(f"--mask-experts: {err}") from None
    if args.data_dir:
        cfg.data_dir = args.data_dir
    trainer = Trainer(cfg, prepare_data(cfg), model=model)
    result = trainer.evaluate(max_tokens=args.tokens, routing_by_label=False)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"validation loss {result['loss']:.4f} nats/token over {sum(result['tokens_per_label'].values()):,} tokens")
    for label, loss in result["per_label"].items():
        print(f"  {label:<10}{loss:.4f}  ({result['tokens_per_label'][label]:,} tokens)")
    for layer, r in result["routing"].items():
        print(f"  {layer}: utilisation " + " ".join(f"{u:.2f}" for u in r["utilization"])
              + f", dropped {r['dropped_fraction']:.1%}, entropy {r['mean_entropy']:.2f}/{r['max_entropy']:.2f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="validation loss overall and per label of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (uses its latest checkpoint)")
    p.add_argument("--tokens", type=int, default=None, help="validation tokens to use (default: the config's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--mask-experts", action="append", default=[], metavar="[LAYER:]IDS",
                   help="mask experts before evaluating: '3,5' in every MoE layer, or 'layers.1.mlp:3,5' (repeatable)")
    p.set_defaults(func=run)
