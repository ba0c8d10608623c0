"""`moekit data build|info`: build a corpus (the Debian polyglot corpus, or your folder / JSONL /
Hugging Face dataset) into the data directory and print its sizes and per-label counts."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path


def friendly_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print bad-input errors (config, data, checkpoint) as one line on stderr and return 2."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from ..config import ConfigError
        from ..data.sources import DataError
        from ..train.checkpoint import CheckpointError

        try:
            return run(args)
        except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper


def print_report(report: dict, where: Path) -> None:
    print(f"corpus {where}" + (" (cached)" if report.get("cached") else ""))
    print(f"  documents: train {report['documents']['train']}, val {report['documents']['val']};  "
          f"bytes: train {report['bytes']['train']:,}, val {report['bytes']['val']:,}")
    print(f"  {'label':<10}{'train docs':>11}{'val docs':>10}{'train bytes':>13}{'val bytes':>11}")
    for label, c in report["per_label"].items():
        print(f"  {label:<10}{c['train_docs']:>11}{c['val_docs']:>10}{c['train_bytes']:>13,}{c['val_bytes']:>11,}")
    if report.get("num_files_with_replaced_bytes"):
        print(f"  {report['num_files_with_replaced_bytes']} file(s) had bytes that are not UTF-8 (replaced with "
              f"U+FFFD), e.g. {report['files_with_replaced_bytes'][:3]}")
    if report.get("skipped_binary_files"):
        print(f"  skipped binary files: {report['skipped_binary_files'][:5]}")
    for note in report.get("notes", []):
        print(f"  note: {note}")


@friendly_errors
def run_build(args: argparse.Namespace) -> int:
    from ..data.corpus import build_from_source, build_polyglot

    data_dir = Path(args.data_dir)
    if args.source == "polyglot":
        report = build_polyglot(data_dir, max_bytes_per_label=args.max_bytes_per_label,
                                val_fraction=args.val_fraction, seed=args.seed, use_apt=not args.no_apt,
                                force=args.force)
        where = data_dir / "polyglot"
    else:
        report = build_from_source(args.source, data_dir, name=args.name, val_fraction=args.val_fraction,
                                   seed=args.seed, max_bytes_per_label=args.max_bytes_per_label,
                                   text_field=args.text_field, label_field=args.label_field)
        where = data_dir / (args.name or Path(args.source.removeprefix("hf:")).stem.replace("/", "_"))
    print_report(report, where)
    return 0


def run_info(args: argparse.Namespace) -> int:
    path = Path(args.corpus) / "report.json"
    if not path.is_file():
        print(f"error: {path} does not exist; build the corpus with `moekit data build`")
        return 2
    print_report(json.loads(path.read_text(encoding="utf-8")), Path(args.corpus))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="build or inspect a training corpus")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build a corpus into the data directory (cached)")
    b.add_argument("source", nargs="?", default="polyglot",
                   help="'polyglot' (Debian fortunes/man pages + Python stdlib), a folder with one sub-folder "
                        "per label, a .jsonl file, or hf:<dataset name>")
    b.add_argument("--data-dir", default="data_cache")
    b.add_argument("--name", default=None, help="corpus name under the data directory (default: from the source)")
    b.add_argument("--max-bytes-per-label", type=int, default=400_000)
    b.add_argument("--val-fraction", type=float, default=0.05)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-apt", action="store_true", help="polyglot: skip Debian packages (stdlib fallback)")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    b.add_argument("--text-field", default="text")
    b.add_argument("--label-field", default="label")
    b.set_defaults(func=run_build)
    i = sub.add_parser("info", help="print a built corpus's sizes and labels")
    i.add_argument("corpus", help="corpus folder, e.g. data_cache/polyglot")
    i.set_defaults(func=run_info)
