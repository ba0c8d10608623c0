"""What the commands share: argparse value checks that name the flag and the bad value, and
loading a trained run for evaluation with its corpus found relative to the run, never built.

Errors are not handled here: ``moekit.cli.main`` turns the known error types into one line.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse ``type=``: an integer >= ``low`` (and <= ``high`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}" + ("" if high is None else f" and <= {high}"))
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def number_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
              ) -> Callable[[str], float]:
    """argparse ``type=``: a finite float in the interval [low, high] (ends open where asked)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {interval}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


POSITIVE_INT = int_at_least(1)
NONNEGATIVE_INT = int_at_least(0)
POSITIVE_NUMBER = number_in(0.0, low_open=True)
NONNEGATIVE_NUMBER = number_in(0.0)


def run_folder(checkpoint: Path) -> Path:
    """The run folder a resolved checkpoint file belongs to (``<run>/checkpoints/step_*.safetensors``)."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def data_dir_candidates(cfg: Any, checkpoint: Path) -> list[Path]:
    """Where a run's relative ``data_dir`` may be, best first.

    ``data_dir`` and ``out_dir`` were both relative to the folder training ran in; when the run
    folder's path ends with ``out_dir``, that folder is the run folder minus ``out_dir``. Then the
    run folder itself, then the current directory (a corpus built here by hand).
    """
    data_dir = Path(cfg.data_dir)
    if data_dir.is_absolute():
        return [data_dir]
    run = run_folder(checkpoint.resolve())
    out_parts = Path(cfg.out_dir).parts
    found: list[Path] = []
    if out_parts and not Path(cfg.out_dir).is_absolute() and run.parts[-len(out_parts):] == out_parts:
        found.append(Path(*run.parts[:-len(out_parts)]) / data_dir)
    found += [run / data_dir, Path.cwd() / data_dir]
    return list(dict.fromkeys(found))


@dataclass
class Run:
    """A trained run loaded for a read-only command; ``data()`` loads its corpus (never builds it)."""

    model: Any
    cfg: Any
    meta: dict[str, Any]
    path: Path
    data_dirs: list[Path]

    def data(self) -> Any:
        """The run's TokenData from the first of ``data_dirs`` that holds its corpus."""
        from ..data.sources import DataError
        from ..train.trainer import corpus_dir, prepare_data

        for folder in self.data_dirs:
            if (corpus_dir(self.cfg, folder) / "report.json").is_file():
                self.cfg.data_dir = str(folder)
                return prepare_data(self.cfg, build=False)
        looked = ", ".join(str(corpus_dir(self.cfg, f)) for f in self.data_dirs)
        raise DataError(f"corpus {self.cfg.corpus!r} of {self.path} is not built (looked in {looked}); "
                        f"pass --data-dir, or build it with `moekit data build`")


def load_run(checkpoint: str | Path, data_dir: str | None = None, check_weights: bool = True) -> Run:
    """A trained run (model in eval mode, TrainConfig, metadata) for a read-only command.

    Its corpus is looked for in ``data_dir`` if given (relative to the current directory), else in
    ``data_dir_candidates``. With ``check_weights``, an expert with NaN/Inf weights is a
    CorruptExpertError naming its layer and expert.
    """
    from ..data.sources import DataError
    from ..health import CorruptExpertError, scan_weights
    from ..train.checkpoint import resolve_checkpoint
    from ..train.trainer import load_trained

    path = resolve_checkpoint(checkpoint)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder")
    model, cfg, meta = load_trained(path)
    if check_weights:
        findings = scan_weights(model)
        if findings:
            raise CorruptExpertError(findings, str(path))
    dirs = [Path(data_dir)] if data_dir is not None else data_dir_candidates(cfg, path)
    return Run(model, cfg, meta, path, dirs)
