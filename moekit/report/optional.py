"""Optional features whose package may be missing: each is skipped with one note on stderr
naming the extra that installs it, never a crash. The base install runs the main job
(``moekit demo``, ``moekit train``) without them."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=None)
def note_missing(feature: str, package: str, extra: str) -> None:
    """Print once per process: ``note: <feature> skipped: <package> is not installed (...)``."""
    print(f"note: {feature} skipped: {package} is not installed (pip install 'moekit[{extra}]')", file=sys.stderr)


def tensorboard_writer(log_dir: str | Path, purge_step: int | None = None) -> Any:
    """A ``SummaryWriter`` for ``log_dir``, or None (with a note) when tensorboard is not installed.

    ``purge_step``: TensorBoard hides the events earlier files of ``log_dir`` hold at this step or
    later (a resumed run passes the first step it writes, so a killed run's tail is not shown twice)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        note_missing("TensorBoard logging", "tensorboard", "train")
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)
