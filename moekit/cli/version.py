"""`moekit version`: package, torch and optional-dependency versions."""

from __future__ import annotations

import argparse
import importlib.metadata


def run(args: argparse.Namespace) -> int:
    import torch

    import moekit

    print(f"moekit {moekit.__version__}")
    print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    for extra in ("transformers", "safetensors", "matplotlib", "tensorboard"):
        try:
            print(f"{extra} {importlib.metadata.version(extra)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{extra} not installed")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("version", help="print versions")
    p.set_defaults(func=run)
