"""PNG plots of training runs. Each function takes run records and returns PNG bytes.

Figures are ``matplotlib.figure.Figure`` objects rendered straight to PNG, without pyplot: no
global backend is chosen and no figure is registered with pyplot, so a caller's own matplotlib
setup (an interactive backend, open figures) is left as it was. matplotlib is imported lazily.

A run is a dict with ``name`` and ``evals``: the eval records of ``Trainer.run_eval`` (step,
tokens, time_s, loss, per_label, routing, train_routing, and on the last one routing_by_label).
"""

from __future__ import annotations

import io
from typing import Any


def new_figure(figsize: tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` of ``figsize`` inches, not known to pyplot (nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def png(fig: Any) -> bytes:
    """The figure as PNG bytes (matplotlib's Agg renderer, chosen by the file format)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_curves(runs: list[dict[str, Any]], x: str) -> bytes:
    """Validation loss vs ``x`` ("tokens" or "time_s") for every run."""
    fig = new_figure((6, 4))
    ax = fig.subplots()
    for run in runs:
        evals = [e for e in run["evals"] if e["step"] > 0]
        ax.plot([e[x] for e in evals], [e["loss"] for e in evals], marker="o", ms=3, label=run["name"])
    ax.set_xlabel("training tokens" if x == "tokens" else "training wall-clock (s)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss vs " + ("tokens" if x == "tokens" else "wall-clock"))
    ax.grid(alpha=0.3)
    ax.legend()
    return png(fig)


def per_label_bars(runs: list[dict[str, Any]]) -> bytes:
    """Final validation loss per label, one bar per run."""
    labels = sorted(runs[0]["evals"][-1]["per_label"])
    fig = new_figure((max(6, 0.7 * len(labels)), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        per = run["evals"][-1]["per_label"]
        ax.bar([j + i * width for j in range(len(labels))], [per.get(lab, float("nan")) for lab in labels],
               width=width, label=run["name"])
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(labels))], labels)
    ax.set_ylabel("final validation loss")
    ax.set_title("validation loss per label")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return png(fig)


def routing_heatmap(name: str, counts_NE: list[list[float]], label_names: list[str]) -> bytes:
    """Share of each label's top-k picks that go to each expert (rows sum to 1)."""
    import numpy as np

    m = np.asarray(counts_NE, dtype=float)
    keep = m.sum(axis=1) > 0
    m, labels = m[keep], [lab for lab, k in zip(label_names, keep) if k]
    share = m / m.sum(axis=1, keepdims=True)
    fig = new_figure((0.5 * m.shape[1] + 2.5, 0.4 * len(labels) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("expert")
    ax.set_title(f"{name}: expert share per label")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return png(fig)


def utilisation_over_training(run: dict[str, Any]) -> bytes:
    """Per MoE layer, each expert's share of routed tokens in the steps before each eval."""
    # The step-0 eval has no training steps before it: nothing routed yet.
    evals = [e for e in run["evals"] if e.get("train_routing") and e["step"] > 0]
    layers = sorted(evals[-1]["train_routing"]) if evals else []
    fig = new_figure((3.2 * max(1, len(layers)), 3))
    axes = fig.subplots(1, max(1, len(layers)), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        tokens = [e["tokens"] for e in evals]
        util = [e["train_routing"][layer]["utilization"] for e in evals]
        for expert in range(len(util[0])):
            ax.plot(tokens, [u[expert] for u in util], lw=1)
        ax.axhline(1 / len(util[0]), color="k", ls="--", lw=0.8)
        ax.set_title(layer, fontsize=8)
        ax.set_xlabel("tokens")
    axes[0][0].set_ylabel("expert share of assignments")
    return png(fig)


def entropy_over_training(run: dict[str, Any]) -> bytes:
    """Mean routing entropy per MoE layer over training (dashed: the uniform maximum ln E)."""
    # The step-0 eval has no training steps before it: nothing routed yet.
    evals = [e for e in run["evals"] if e.get("train_routing") and e["step"] > 0]
    fig = new_figure((6, 3.5))
    ax = fig.subplots()
    if evals:
        for layer in sorted(evals[-1]["train_routing"]):
            ax.plot([e["tokens"] for e in evals], [e["train_routing"][layer]["mean_entropy"] for e in evals],
                    label=layer)
        ax.axhline(evals[-1]["routing"][next(iter(evals[-1]["routing"]))]["max_entropy"], color="k", ls="--", lw=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("routing entropy (nats)")
    ax.set_title("router entropy over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig)
