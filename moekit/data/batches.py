"""Batches of token windows for language-model training and evaluation.

Training batches are a pure function of a seed (the trainer derives it from run seed, step and
micro-step), so the data position is the step count and a resumed run reads the same windows.
Evaluation batches are fixed, non-overlapping windows spread evenly over the validation split.
Windows are cut on the host (numpy); ``Batch.to`` moves them to the training device.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .corpus import TokenSplit


@dataclass
class Batch:
    """input_ids (B, S) and targets (B, S) long; labels (B, S) long: document label of each target."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor

    @property
    def seq_labels(self) -> torch.Tensor:
        """(B,) the most frequent label of each sequence."""
        return torch.mode(self.labels, dim=1).values

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device`` (itself when it is already there). Host batches go to a GPU
        through pinned memory without blocking: a copy from pageable memory would sync the host."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        pin = device.type == "cuda" and self.input_ids.device.type == "cpu"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

        return Batch(move(self.input_ids), move(self.targets), move(self.labels))


def _windows(split: TokenSplit, idx_BW: np.ndarray) -> Batch:
    """The batch whose rows are the windows of token positions ``idx_BW`` (W = S + 1)."""
    toks_BW = torch.from_numpy(split.tokens[idx_BW].astype(np.int64))
    labels_BS = torch.from_numpy(split.labels[idx_BW[:, 1:]].astype(np.int64))
    return Batch(toks_BW[:, :-1], toks_BW[:, 1:], labels_BS)


def train_batch_seed(run_seed: int, step: int, micro: int) -> int:
    """The seed of micro-batch ``micro`` of optimizer step ``step`` (up to 64 micro-batches apart)."""
    return (run_seed * 1_000_003 + step) * 64 + micro


def random_batch(split: TokenSplit, batch_size: int, seq_len: int, seed: int) -> Batch:
    """``batch_size`` windows of seq_len + 1 tokens at offsets drawn from ``seed`` alone."""
    n = len(split.tokens) - seq_len - 1
    if n <= 0:
        raise ValueError(f"the training split has {len(split.tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    offsets_B = np.random.default_rng(seed).integers(0, n, size=batch_size)
    return _windows(split, offsets_B[:, None] + np.arange(seq_len + 1)[None, :])


def eval_batches(split: TokenSplit, batch_size: int, seq_len: int, max_tokens: int) -> list[Batch]:
    """Non-overlapping windows spread evenly over the split (every label is seen), up to ``max_tokens`` targets."""
    available = (len(split.tokens) - 1) // seq_len
    if available < 1:
        raise ValueError(f"the validation split has {len(split.tokens)} tokens, fewer than seq_len + 1")
    n_windows = min(available, max(1, max_tokens // seq_len))
    starts = (np.arange(n_windows) * available // n_windows) * seq_len
    return [_windows(split, starts[first:first + batch_size, None] + np.arange(seq_len + 1)[None, :])
            for first in range(0, n_windows, batch_size)]
