"""The ``moekit`` command line. Each subcommand lives in its own module under moekit/cli/
and exposes ``register(subparsers)``; add a module to COMMANDS to add a subcommand.

``main`` is the one error handler: the known error types (bad input, bad files, a missing
package, a diverged run) become ``moekit <command>: error: <one line>`` on stderr and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

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


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``moekit eval: error: argument --tokens: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a bad environment, printed as one line; any other is a bug
    and keeps its traceback. CheckpointError (moekit.errors) is every bad checkpoint or model folder;
    ValueError also covers ConfigError, DataError and CorruptExpertError; FloatingPointError covers
    ExpertNonFiniteError and a diverged step; OSError covers missing files, full disks and network
    failures."""
    from safetensors import SafetensorError

    from ..errors import CheckpointError
    from ..parallel.errors import MoekitDistributedError

    return (ValueError, CheckpointError, FloatingPointError, OSError, ImportError, SafetensorError,
            MoekitDistributedError)


# The extra (pyproject optional-dependencies) that installs each optional package.
EXTRA_OF = {"transformers": "hf", "huggingface_hub": "hf", "tensorboard": "train", "datasets": "data",
            "tokenizers": "data", "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve"}


def one_line(err: BaseException) -> str:
    """The error's message on one line (nested lines joined); a missing optional package names its extra."""
    top = (getattr(err, "name", None) or "").split(".")[0]
    if isinstance(err, ModuleNotFoundError) and top in EXTRA_OF:
        return f"{top} is not installed; this needs pip install 'moekit[{EXTRA_OF[top]}]'"
    text = str(err)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends with one line on stderr and exit status 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        print("moekit: error: a command is required", file=sys.stderr)
        return 2
    # The action of a command with sub-commands (data build, recipe upcycle) names it fully.
    words = ["moekit", args.command] + [getattr(args, k) for k in ("data_command", "recipe") if getattr(args, k, None)]
    prog = " ".join(words)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except known_errors() as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
