"""`moekit eval RUN`: validation loss overall and per label of a trained checkpoint."""

from __future__ import annotations

import argparse
import json

from .common import POSITIVE_INT, load_run


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..train.trainer import Trainer

    loaded = load_run(args.checkpoint, args.data_dir)
    model, cfg = loaded.model, loaded.cfg
    if args.quantize is not None:  # weight-only int8 experts, applied after loading
        from ..experts.int8 import quantize_experts

        quantize_experts(model, args.quantize)
    if args.mask_experts:
        from ..health import parse_mask_spec
        from ..model_ops import mask_experts

        try:
            mask_experts(model, parse_mask_spec(args.mask_experts))
        except (ValueError, KeyError, IndexError) as err:
            raise ConfigError(f"--mask-experts: {err.args[0] if err.args else err}") from None
    trainer = Trainer(cfg, loaded.data(), model=model)
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
    p.add_argument("--tokens", type=POSITIVE_INT, default=None, help="validation tokens to use (default: the config's)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the run's corpus (default: found relative to the run folder; never built)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="run the experts as weight-only int8 (per-channel scales), quantised after loading")
    p.add_argument("--mask-experts", action="append", default=[], metavar="[LAYER:]IDS",
                   help="mask experts before evaluating: '3,5' in every MoE layer, or 'layers.1.mlp:3,5' (repeatable)")
    p.set_defaults(func=run)
