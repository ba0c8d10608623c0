"""A small Vision Transformer whose feed-forward layers are moekit MoE layers, on scikit-learn's
handwritten digits (1,797 8x8 images that ship inside the package: nothing is downloaded).

Each image is cut into 16 patches of 2x2 pixels (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words"); every patch is a token, routed to its top-k experts as in V-MoE (Riquelme et al. 2021,
"Scaling Vision with Sparse Mixture of Experts"). The dense baseline replaces each MoE layer with
one MLP of hidden size top_k * expert_hidden, so both use the same parameters per token.

    python examples/vision_moe.py                 # ~1 minute on a laptop CPU
    python examples/vision_moe.py --tiny          # a few seconds (what the tests run)

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

PATCH = 2  # 8x8 images -> 16 tokens of 2x2 pixels


def load_digits_patches() -> tuple[torch.Tensor, torch.Tensor]:
    """Images as patch tokens (N, 16, 4) in [0, 1], and labels (N,) long."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8), pixel values 0..16
    n = x.shape[0]
    x = x.view(n, 8 // PATCH, PATCH, 8 // PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, -1, PATCH * PATCH)
    return x, torch.tensor(digits.target, dtype=torch.long)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is MoE or dense."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x_BND)
        x_BND = x_BND + self.attn(h, h, h, need_weights=False)[0]
        return x_BND + self.ffn(self.norm2(x_BND))


class PatchViT(nn.Module):
    """Patch tokens (B, N, P) -> class logits (B, classes), mean-pooled over the tokens."""

    def __init__(self, tokens: int, patch_dim: int, classes: int, dim: int, depth: int, heads: int,
                 make_ffn: Any) -> None:
        super().__init__()
        self.embed = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, make_ffn()) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x_BNP: torch.Tensor) -> torch.Tensor:
        x = self.embed(x_BNP) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=48)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=48)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3, help="train each model this many times (seeds 0..n-1)")
    p.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tiny", action="store_true", help="a few seconds: small model, 400 images, 12 epochs, 1 seed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.depth, args.experts, args.expert_hidden, args.epochs, args.seeds = 24, 1, 4, 24, 12, 1
        args.train_size = args.train_size or 400

    x, y = load_digits_patches()
    train, test = split(len(y), 0.25, seed=0)
    if args.train_size:
        train = train[:args.train_size]
    data = (x[train], y[train], x[test], y[test])

    def build(kind: str, seed: int) -> nn.Module:
        def ffn() -> nn.Module:
            return feed_forward(kind, args.dim, args.experts, args.expert_hidden, args.top_k)
        return PatchViT(x.shape[1], x.shape[2], 10, args.dim, args.depth, heads=4, make_ffn=ffn)

    results = compare(build, data, list(range(args.seeds)), args.epochs, args.batch_size, args.lr)
    results["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    print_report(f"digits (sklearn), {len(train)} train / {len(test)} test images, {x.shape[1]} patch tokens each; "
                 f"MoE: top-{args.top_k} of {args.experts} experts per block", results, args.json)
    return results


if __name__ == "__main__":
    main()
