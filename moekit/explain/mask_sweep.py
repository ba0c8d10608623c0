"""Degradation under expert masking: validation loss with m = 0, 1, ... experts masked in every
MoE layer (``mask_sweep``, which evaluates through a ``moekit.train.Trainer``), and its curve
(``plot_mask_sweep``). ``moekit health RUN --sweep`` runs both.

Masking is ``MoE.mask_experts``: the router picks among the remaining experts and renormalises.

Shape legend: E experts, K top-k.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model_ops import moe_layers


def mask_sweep(trainer: Any, max_masked: int | None = None, strategy: str = "random", repeats: int = 3,
               max_tokens: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Validation loss with m = 0, 1, ... experts masked in every MoE layer (``trainer.evaluate``).

    strategy ``most_used`` masks each layer's m most-loaded experts (loads measured unmasked),
    ``random`` averages ``repeats`` random draws per m. Returns [{masked, loss, per_label, ...}].
    """
    if strategy not in ("random", "most_used"):
        raise ValueError(f"strategy={strategy!r} is not one of ['random', 'most_used']")
    layers = moe_layers(trainer.model)
    if not layers:
        raise ValueError("the model has no MoE layers to mask")
    E, K = layers[0][1].num_experts, layers[0][1].top_k
    limit = E - K if max_masked is None else min(max_masked, E - K)
    for _, layer in layers:
        layer.unmask_experts()
    base = trainer.evaluate(max_tokens=max_tokens)
    order = {name: sorted(range(E), key=lambda e: -base["routing"][name]["utilization"][e]) for name, _ in layers}
    gen = torch.Generator().manual_seed(seed)
    rows = [{"masked": 0, "loss": base["loss"], "loss_std": 0.0, "per_label": base["per_label"], "draws": []}]
    for m in range(1, limit + 1):
        draws = []
        for r in range(1 if strategy == "most_used" else repeats):
            chosen = {}
            for name, layer in layers:
                ids = order[name][:m] if strategy == "most_used" else torch.randperm(E, generator=gen)[:m].tolist()
                layer.unmask_experts()
                layer.mask_experts(ids)
                chosen[name] = sorted(ids)
            result = trainer.evaluate(max_tokens=max_tokens)
            draws.append({"experts": chosen, "loss": result["loss"], "per_label": result["per_label"]})
        losses = torch.tensor([d["loss"] for d in draws], dtype=torch.float64)
        labels = draws[0]["per_label"].keys()
        rows.append({"masked": m, "loss": float(losses.mean()),
                     "loss_std": float(losses.std()) if len(draws) > 1 else 0.0,
                     "per_label": {k: sum(d["per_label"][k] for d in draws) / len(draws) for k in labels},
                     "draws": draws})
    for _, layer in layers:
        layer.unmask_experts()
    return rows


def plot_mask_sweep(curves: dict[str, list[dict[str, Any]]]) -> bytes:
    """PNG: validation loss against experts masked per layer, one line per curve name."""
    from ..report.plots import new_figure, png

    fig = new_figure((6, 4))
    ax = fig.subplots()
    for name, rows in curves.items():
        xs = [r["masked"] for r in rows]
        ys = [r["loss"] for r in rows]
        ax.errorbar(xs, ys, yerr=[r["loss_std"] for r in rows], marker="o", ms=3, capsize=3, label=name)
    ax.set_xlabel("experts masked in every MoE layer")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("degradation under expert masking")
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)
