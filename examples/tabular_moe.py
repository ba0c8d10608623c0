"""A tabular MoE classifier: each row is one token, routed to its top-k experts (the per-example
routing of recommendation and ranking MoEs, e.g. Ma et al. 2018, "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts"), on a real data set that ships inside
scikit-learn (nothing is downloaded): the Wisconsin breast cancer data (569 rows, 30 features,
2 classes) by default, or the wine data (178 rows, 13 features, 3 classes).

Features are standardised with the training split's mean and deviation. The network is an input
projection, residual MoE blocks (x + MoE(norm(x))), and a linear head; the dense baseline has one
MLP of hidden size top_k * expert_hidden per block, the same parameters per row.

    python examples/tabular_moe.py                # under a minute on a laptop CPU
    python examples/tabular_moe.py --tiny         # a few seconds (what the tests run)

Needs scikit-learn (pip install 'moekit[examples]').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import compare, feed_forward, print_report, split  # noqa: E402

DATASETS = ("breast_cancer", "wine")


def load_table(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) float32 and labels (N,) long of a data set shipped with scikit-learn."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    return torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)


class ResidualFFN(nn.Module):
    def __init__(self, dim: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm, self.ffn = nn.LayerNorm(dim), ffn

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD + self.ffn(self.norm(x_BD))


class TabularNet(nn.Module):
    """Rows (B, F) -> class logits (B, classes)."""

    def __init__(self, features: int, classes: int, dim: int, depth: int, make_ffn: Any) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.blocks = nn.Sequential(*(ResidualFFN(dim, make_ffn()) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x_BF: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x_BF))))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="breast_cancer")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=32)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=5, help="train each model this many times (seeds 0..n-1)")
    p.add_argument("--tiny", action="store_true", help="a few seconds: small model, 15 epochs, 1 seed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.depth, args.experts, args.expert_hidden, args.epochs, args.seeds = 16, 1, 4, 16, 15, 1

    x, y = load_table(args.dataset)
    train, test = split(len(y), 0.25, seed=0)
    mean, std = x[train].mean(dim=0), x[train].std(dim=0).clamp_min(1e-6)
    x = (x - mean) / std
    data = (x[train], y[train], x[test], y[test])
    classes = int(y.max()) + 1

    def build(kind: str, seed: int) -> nn.Module:
        def ffn() -> nn.Module:
            return feed_forward(kind, args.dim, args.experts, args.expert_hidden, args.top_k)
        return TabularNet(x.shape[1], classes, args.dim, args.depth, ffn)

    results = compare(build, data, list(range(args.seeds)), args.epochs, args.batch_size, args.lr)
    results["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    print_report(f"{args.dataset} (sklearn), {len(train)} train / {len(test)} test rows, {x.shape[1]} features; "
                 f"MoE: top-{args.top_k} of {args.experts} experts per block", results, args.json)
    return results


if __name__ == "__main__":
    main()
