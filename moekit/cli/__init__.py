"""The ``moekit`` command line. Each subcommand lives in its own module under moekit/cli/
and exposes ``register(subparsers)``; add a module to COMMANDS to add a subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "moekit.cli.version",
    "moekit.cli.layer_demo",
    "moekit.cli.data",
    "moekit.cli.train",
    "moekit.cli.eval",
    "moekit.cli.generate",
    "moekit.cli.demo",
    "moekit.cli.convert",
    "moekit.cli.recipe",
    "moekit.cli.explain",
    "moekit.cli.health",
    "moekit.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
