"""`moekit data build|info`: build a corpus (the Debian polyglot corpus, or your folder / JSONL /
Hugging Face dataset) into the data directory and print its sizes and per-label counts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import NONNEGATIVE_INT, POSITIVE_INT, number_in


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


def run_build(args: argparse.Namespace) -> int:
    from ..data.corpus import build_from_source, build_polyglot
    from ..data.sources import DataError

    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")
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
    from ..data.sources import DataError

    path = Path(args.corpus) / "report.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; build the corpus with `moekit data build`")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        print_report(report, Path(args.corpus))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a corpus report ({type(err).__name__}: {err}); rebuild the corpus") from None
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
    b.add_argument("--max-bytes-per-label", type=POSITIVE_INT, default=400_000)
    b.add_argument("--val-fraction", type=number_in(0.0, 1.0, low_open=True, high_open=True), default=0.05)
    b.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    b.add_argument("--no-apt", action="store_true", help="polyglot: skip Debian packages (stdlib fallback)")
    b.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    b.add_argument("--text-field", default="text")
    b.add_argument("--label-field", default="label")
    b.set_defaults(func=run_build)
    i = sub.add_parser("info", help="print a built corpus's sizes and labels")
    i.add_argument("corpus", help="corpus folder, e.g. data_cache/polyglot")
    i.set_defaults(func=run_info)
