"""`moekit health CHECKPOINT`: each expert's state (ok, masked, corrupt weights, non-finite
outputs, dead) after a weight scan and a validation pass with run-time quarantine; and
`moekit mask-sweep CHECKPOINT`: validation loss with 0, 1, 2, ... experts masked per layer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import NONNEGATIVE_INT, POSITIVE_INT, load_run


def run_health(args: argparse.Namespace) -> int:
    import torch

    from ..health import Quarantine, findings_to_dicts, health_report, quarantine_experts, scan_weights
    from ..model_ops import reset_routing_stats
    from ..train.trainer import eval_batches

    loaded = load_run(args.checkpoint, args.data_dir, check_weights=False)
    model, cfg = loaded.model, loaded.cfg
    findings = scan_weights(model)
    events = []
    if args.tokens > 0:
        val = loaded.data().val
        if findings:
            quarantine_experts(model, findings)
        reset_routing_stats(model)
        with Quarantine(model) as q, torch.no_grad():
            for b in eval_batches(val, cfg.batch_size, cfg.seq_len, args.tokens):
                model(b.input_ids)
            events = [vars(e) for e in q.events]
    report = health_report(model, findings)
    bad = sum(r["state"] in ("corrupt_weights", "nonfinite_outputs") for rows in report.values() for r in rows)
    if args.json:
        print(json.dumps({"experts": report, "corrupt": findings_to_dicts(findings), "quarantine_events": events},
                         indent=2))
    else:
        for layer, rows in report.items():
            print(f"{layer}: " + "  ".join(f"e{r['expert']} {r['state']} {r['load']:.2f}" for r in rows))
        for f in findings:
            print(f"corrupt weights: {f.layer} expert {f.expert} in {', '.join(f.tensors)}")
        for e in events:
            print(f"quarantined at run time: {e['layer']} experts {e['experts']}")
        print("healthy" if bad == 0 else f"{bad} expert(s) unhealthy")
    return 0 if bad == 0 else 1


def run_sweep(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..explain.mask_sweep import mask_sweep, plot_mask_sweep
    from ..model_ops import moe_layers
    from ..train.trainer import Trainer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    loaded = load_run(args.checkpoint, args.data_dir)
    model, cfg = loaded.model, loaded.cfg
    layers = moe_layers(model)
    if not layers:
        raise ConfigError(f"{loaded.path} has no MoE layers to mask")
    most = layers[0][1].num_experts - layers[0][1].top_k
    if args.max_masked is not None and args.max_masked > most:
        raise ConfigError(f"--max-masked {args.max_masked} is more than num_experts - top_k = {most}, the most "
                          f"that can be masked")
    trainer = Trainer(cfg, loaded.data(), model=model)
    curves = {s: mask_sweep(trainer, args.max_masked, s, args.repeats, args.tokens) for s in args.strategy}
    out.mkdir(parents=True, exist_ok=True)
    (out / "mask_sweep.json").write_text(json.dumps(curves, indent=2))
    (out / "mask_sweep.png").write_bytes(plot_mask_sweep(curves))
    for s, rows in curves.items():
        print(f"{s}: " + ", ".join(f"{r['masked']} masked {r['loss']:.4f}" for r in rows))
    print(f"wrote {out / 'mask_sweep.json'} and {out / 'mask_sweep.png'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("health", help="report each expert's state; exit 1 if any is corrupt")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--tokens", type=NONNEGATIVE_INT, default=4096, help="validation tokens to run (0: weights only)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--data-dir", dest="data_dir")
    p.set_defaults(func=run_health)

    p = subparsers.add_parser("mask-sweep", help="validation loss with 0, 1, 2, ... experts masked per layer")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--out", required=True, help="folder for mask_sweep.json and mask_sweep.png")
    p.add_argument("--max-masked", type=NONNEGATIVE_INT, default=None, help="default (and most): num_experts - top_k")
    p.add_argument("--strategy", nargs="+", choices=["random", "most_used"], default=["random", "most_used"])
    p.add_argument("--repeats", type=POSITIVE_INT, default=3, help="random draws per point")
    p.add_argument("--tokens", type=POSITIVE_INT, default=16384, help="validation tokens per evaluation")
    p.add_argument("--data-dir", dest="data_dir")
    p.set_defaults(func=run_sweep)
