"""Validation during and after training: loss overall and per document label, routing health of
the evaluation passes, and optionally how often each label picks each expert.

Evaluation routes tokens too, so it counts its routing apart: the training statistics are set
aside before the first batch and put back after the last (``routing_stats_set_aside``).

Shape legend: B batch, S sequence, V vocabulary, T tokens (B*S), K top-k, E experts, N labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ..data.batches import Batch
from ..model_ops import capture_routing, moe_layers, reset_routing_stats, routing_report

EVAL_ROUTING_KEYS = ("utilization", "dropped_fraction", "mean_entropy", "max_entropy", "max_over_mean_load",
                     "dead_experts")


@contextmanager
def routing_stats_set_aside(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with every MoE layer's routing statistics zeroed; the earlier ones come back after."""
    saved = [(layer, layer.stats.snapshot()) for _, layer in moe_layers(model)]
    reset_routing_stats(model)
    try:
        yield
    finally:
        for layer, snapshot in saved:
            layer.stats.restore(snapshot)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[Batch], label_names: list[str],
                     device: torch.device, autocast: Callable[[], AbstractContextManager[Any]],
                     routing_by_label: bool = False) -> dict[str, Any]:
    """Mean next-token loss over the target tokens of ``batches``, overall and per label, in eval mode.

    Sums are float64 on ``device`` and read once at the end. With ``routing_by_label``, also
    ``routing_by_label[layer] = (N labels, E) counts`` of top-k picks."""
    was_training = model.training
    model.eval()
    n_labels = len(label_names)
    loss_sum_N = torch.zeros(n_labels, dtype=torch.float64, device=device)
    count_N = torch.zeros(n_labels, dtype=torch.float64, device=device)
    layers = moe_layers(model)
    by_label_NE = {name: torch.zeros(n_labels, layer.num_experts, dtype=torch.float64, device=device)
                   for name, layer in layers}
    try:
        with routing_stats_set_aside(model), capture_routing(model) if routing_by_label else nullcontext() as cap:
            for b in batches:
                b = b.to(device)
                with autocast():
                    logits_BSV = model(b.input_ids)
                nll_T = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), b.targets.reshape(-1),
                                        reduction="none").double()
                labels_T = b.labels.reshape(-1)
                loss_sum_N.index_add_(0, labels_T, nll_T)
                count_N.index_add_(0, labels_T, torch.ones_like(nll_T))
                if cap is not None:
                    for name, layer in layers:
                        idx_TK = cap.last(name).routing.topk_idx_TK
                        if idx_TK is None:
                            continue
                        K = idx_TK.shape[1]
                        flat = labels_T.repeat_interleave(K) * layer.num_experts + idx_TK.reshape(-1)
                        by_label_NE[name].view(-1).index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float64,
                                                                                  device=device))
                    cap.clear()  # keep one batch's routing at a time
            eval_routing = {name: r.to_dict() for name, r in routing_report(model, warn=False).items()}
    finally:
        model.train(was_training)
    loss_sum, count = loss_sum_N.cpu(), count_N.cpu()
    seen = count > 0
    result: dict[str, Any] = {
        "loss": float(loss_sum.sum() / count.sum()),
        "per_label": {label_names[i]: float(loss_sum[i] / count[i]) for i in range(n_labels) if seen[i]},
        "tokens_per_label": {label_names[i]: int(count[i]) for i in range(n_labels) if seen[i]},
        "routing": {name: {k: r[k] for k in EVAL_ROUTING_KEYS} for name, r in eval_routing.items()},
    }
    if routing_by_label:
        result["routing_by_label"] = {name: m.tolist() for name, m in by_label_NE.items()}
    return result
