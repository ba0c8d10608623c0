"""What the examples share: parameter counts, a small training loop that adds moekit's balancing
loss, accuracy, and the routing summary (from ``moekit.routing_report``) they print."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import moekit


def feed_forward(kind: str, dim: int, num_experts: int, expert_hidden: int, top_k: int) -> nn.Module:
    """The block's feed-forward: an MoE of GELU experts ("moe"), or the dense MLP with the same active
    width, top_k * expert_hidden ("dense")."""
    if kind == "moe":
        return moekit.MoE(dim=dim, num_experts=num_experts, expert_hidden=expert_hidden, top_k=top_k,
                          expert_kind="mlp", activation="gelu", aux_loss_coef=0.01)
    hidden = top_k * expert_hidden
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))


def active_params(model: nn.Module) -> int:
    """Parameters one input token uses: all but the unchosen routed experts (top_k of E per layer)."""
    inactive = 0
    for _, layer in moekit.moe_layers(model):
        routed = sum(p.numel() for p in layer.experts.parameters())
        inactive += routed - routed * layer.top_k // layer.num_experts
    return sum(p.numel() for p in model.parameters()) - inactive


def train_classifier(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, epochs: int, batch_size: int,
                     lr: float, seed: int) -> float:
    """AdamW on cross-entropy plus every MoE layer's balancing loss; returns the last epoch's mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=gen)
        total, n = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            total, n = total + loss.item() * len(idx), n + len(idx)
            opt.zero_grad(set_to_none=True)
            (loss + moekit.aux_loss(model)).backward()
            opt.step()
        mean = total / n
    return mean


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=-1) == y).float().mean())


def routing_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per MoE layer, from ``moekit.routing_report``: each expert's share of the routed tokens, the
    dead experts, the busiest expert's load over the mean, and the mean routing entropy."""
    out = {}
    for name, rep in moekit.routing_report(model, warn=False).items():
        total = sum(rep.tokens_per_expert) or 1.0
        out[name] = {"share": [round(t / total, 3) for t in rep.tokens_per_expert], "dead": rep.dead_experts,
                     "max_over_mean_load": round(rep.max_over_mean_load, 3),
                     "entropy": round(rep.mean_entropy, 3), "max_entropy": round(rep.max_entropy, 3)}
    return out


def compare(build: Callable[[str, int], nn.Module], data: tuple[torch.Tensor, ...], seeds: list[int], epochs: int,
            batch_size: int, lr: float) -> dict[str, Any]:
    """Train the MoE and the dense model of the same active size once per seed; test accuracy of each,
    parameter counts, and the last MoE model's routing on the test set."""
    x_train, y_train, x_test, y_test = data
    results: dict[str, Any] = {}
    for kind in ("moe", "dense"):
        accs = []
        for seed in seeds:
            torch.manual_seed(seed)
            model = build(kind, seed)
            train_classifier(model, x_train, y_train, epochs, batch_size, lr, seed)
            moekit.reset_routing_stats(model)
            accs.append(accuracy(model, x_test, y_test))
        results[kind] = {"accuracy": accs, "mean_accuracy": statistics.fmean(accs),
                         "active_params": active_params(model), "total_params": sum(p.numel() for p in model.parameters())}
        if kind == "moe":
            results["routing"] = routing_summary(model)
    return results


def print_report(title: str, results: dict[str, Any], json_path: str | None) -> None:
    print(title)
    print(f"{'model':<6} {'test accuracy (per seed)':<34} {'mean':>6} {'active params':>14} {'total params':>13}")
    for kind in ("moe", "dense"):
        r = results[kind]
        per_seed = " ".join(f"{a:.3f}" for a in r["accuracy"])
        print(f"{kind:<6} {per_seed:<34} {r['mean_accuracy']:>6.3f} {r['active_params']:>14,} {r['total_params']:>13,}")
    print("expert utilisation on the test set (share of routed tokens per expert; moekit.routing_report):")
    for name, s in results["routing"].items():
        shares = " ".join(f"{v:.2f}" for v in s["share"])
        print(f"  {name:<10} [{shares}]  max/mean load {s['max_over_mean_load']:.2f}  "
              f"entropy {s['entropy']:.2f}/{s['max_entropy']:.2f}  dead {s['dead']}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")


def split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random train/test split of n rows: (train indices, test indices)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]
