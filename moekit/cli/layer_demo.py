"""`moekit layer-demo`: train one MoE layer on a toy regression and print its routing health.

A quick look at the layer on its own: a small mixture of linear maps, one per input cluster,
is learned by an MoE layer; the report shows utilisation, entropy and which expert each
cluster uses.
"""

from __future__ import annotations

import argparse
import time

from .common import NONNEGATIVE_INT


def run(args: argparse.Namespace) -> int:
    import torch

    import moekit

    torch.manual_seed(args.seed)
    D, E, clusters = 32, 8, 4
    centers = torch.randn(clusters, D) * 3
    maps = torch.randn(clusters, D, D) / D**0.5

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.randint(clusters, (n,))
        x = centers[c] + torch.randn(n, D)
        y = torch.einsum("nd,nde->ne", x, maps[c])
        return x, y, c

    layer = moekit.MoE(dim=D, num_experts=E, expert_hidden=64, top_k=2, router=args.router,
                       aux_loss_coef=0.01, z_loss_coef=1e-3,
                       capacity_factor=None if args.router != "expert_choice" else 2.0)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    print(f"{layer}")
    start = time.perf_counter()
    for step in range(args.steps + 1):
        x, y, _ = batch(512)
        loss = torch.nn.functional.mse_loss(layer(x), y)
        total = loss + moekit.aux_loss(layer)
        opt.zero_grad()
        total.backward()
        opt.step()
        moekit.update_router_biases(layer)
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  mse {loss.item():.4f}  balance losses "
                  + ", ".join(f"{k}={float(v):.3f}" for k, v in layer.last_losses.items()))
    print(f"trained in {time.perf_counter() - start:.1f}s")

    layer.eval()
    layer.reset_stats()
    x, _, c = batch(2048)
    with torch.no_grad(), moekit.capture_routing(layer) as cap:
        layer(x)
    report = moekit.routing_report(layer)["MoE"]
    print("utilisation per expert:", " ".join(f"{u:.2f}" for u in report.utilization))
    print(f"routing entropy {report.mean_entropy:.2f} nats (max {report.max_entropy:.2f}), "
          f"max/mean load {report.max_over_mean_load:.2f}, dropped {report.dropped_fraction:.1%}")
    idx = cap.last().routing.topk_idx_TK
    if idx is not None:
        for k in range(clusters):
            counts = torch.bincount(idx[c == k].flatten(), minlength=E)
            print(f"cluster {k} -> experts " + " ".join(f"{int(n):4d}" for n in counts))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("layer-demo", help="train one MoE layer on toy data and show its routing")
    p.add_argument("--router", default="softmax_topk",
                   choices=["softmax_topk", "noisy_topk", "sigmoid_topk", "expert_choice"])
    p.add_argument("--steps", type=NONNEGATIVE_INT, default=200)
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.set_defaults(func=run)
