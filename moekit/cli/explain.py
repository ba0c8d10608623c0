"""`moekit explain CHECKPOINT TEXT`: each token's experts and weights per MoE layer (terminal
colours, optional HTML), with the labels each expert mostly serves; and `moekit diagnose`:
routing stability between checkpoints, expert weight drift, per-expert loss, latency breakdown."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import POSITIVE_INT, Run, load_run


def run_explain(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..data.tokenizer import load_tokenizer
    from ..explain import explain_text, label_affinity, render_html, render_terminal
    from ..train.trainer import Trainer

    if args.html and not Path(args.html).parent.is_dir():
        raise ConfigError(f"--html {args.html}: folder {Path(args.html).parent} does not exist")
    loaded = load_run(args.checkpoint, args.data_dir)
    model, cfg = loaded.model, loaded.cfg
    if not args.text:
        raise ConfigError("TEXT is empty; give the text to explain")
    expl = explain_text(model, load_tokenizer(cfg.tokenizer), args.text)
    if args.labels:
        data = loaded.data()
        counts = Trainer(cfg, data, model=model).evaluate(max_tokens=args.tokens, routing_by_label=True)
        expl.affinity = label_affinity(counts["routing_by_label"], data.label_names)
    if args.json:
        cells = [{"text": text, "tokens": idx} for text, idx in expl.cells()]
        print(json.dumps({**expl.to_dict(), "cells": cells}, indent=2, ensure_ascii=False))
    else:
        print(render_terminal(expl, color=not args.no_color and sys.stdout.isatty() or args.color))
    if args.html:
        Path(args.html).write_text(render_html(expl, title=f"moekit explain: {args.checkpoint}"), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _val_batches(loaded: Run, tokens: int) -> list:
    from ..train.trainer import eval_batches

    cfg = loaded.cfg
    return eval_batches(loaded.data().val, cfg.batch_size, cfg.seq_len, tokens)


def run_diagnose(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..explain import format_latency, latency_breakdown, per_expert_loss, routing_change, weight_drift
    from ..model_ops import moe_layers

    if args.what == "stability" and not args.other:
        raise ConfigError("diagnose stability needs --other CHECKPOINT to compare with")
    loaded = load_run(args.checkpoint, args.data_dir)
    model = loaded.model
    if not moe_layers(model):
        raise ConfigError(f"{loaded.path} has no MoE layers to diagnose")
    batches = _val_batches(loaded, args.tokens)
    if args.what == "stability":
        other = load_run(args.other).model
        result = {"routing_change": routing_change(model, other, [b.input_ids for b in batches]),
                  "weight_drift": weight_drift(model, other)}
        lines = [f"{layer}: top-1 changed for {r['top1_changed']:.1%} of {r['tokens']} tokens, "
                 f"top-k Jaccard {r['topk_jaccard']:.3f}; expert drift "
                 + " ".join(f"{d:.3f}" for d in result["weight_drift"][layer])
                 for layer, r in result["routing_change"].items()]
    elif args.what == "expert-loss":
        result = per_expert_loss(model, batches)
        lines = []
        for layer, r in result.items():
            lines.append(f"{layer}: loss of tokens by top-1 expert (tokens)")
            lines += [f"  e{e}: {loss:.4f} ({n:.0f})"
                      for e, (loss, n) in enumerate(zip(r["top1_loss"], r["top1_tokens"]))]
    else:
        result = latency_breakdown(model, batches[0].input_ids, repeats=args.repeats)
        lines = [format_latency(result)]
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="show each token's experts and weights per MoE layer")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("text")
    p.add_argument("--html", help="also write an HTML view to this file")
    p.add_argument("--labels", action="store_true", help="also show which labels each expert serves (runs eval)")
    p.add_argument("--tokens", type=POSITIVE_INT, default=16384, help="validation tokens for --labels")
    p.add_argument("--no-color", action="store_true")
    p.add_argument("--color", action="store_true", help="colour even when stdout is not a terminal")
    p.add_argument("--json", action="store_true")
    p.add_argument("--data-dir", dest="data_dir")
    p.set_defaults(func=run_explain)

    p = subparsers.add_parser("diagnose", help="routing stability, per-expert loss, latency breakdown")
    p.add_argument("what", choices=["stability", "expert-loss", "latency"])
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--other", help="stability: the checkpoint to compare with")
    p.add_argument("--tokens", type=POSITIVE_INT, default=8192, help="validation tokens to use")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="latency: timed repeats")
    p.add_argument("--json", action="store_true")
    p.add_argument("--data-dir", dest="data_dir")
    p.set_defaults(func=run_diagnose)
