"""Selective fine-tuning: train only chosen experts (and optionally the router) on new data.

Expert-specialised fine-tuning in the spirit of ESFT (Wang et al. 2024, "Let the Expert Stick to
His Last"): the experts that matter for the new data are tuned, everything else stays. The
stacked expert tensors hold every expert, so the whole tensor trains and the others' rows are
frozen by ``MoE.freeze_experts`` (zero gradient). Zero gradients alone do not keep AdamW's
decoupled weight decay off those rows, so ``freeze_except`` also restores the frozen rows after
every optimizer step: untouched experts stay bit-identical whatever the optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data.corpus import TokenData
from ..lm.model import LM
from ..train.trainer import TrainConfig, Trainer
from .common import moe_blocks


def _chosen(model: LM, experts: Sequence[int] | dict[int, Sequence[int]]) -> dict[int, list[int]]:
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layers")
    if isinstance(experts, dict):
        known = {i for i, _ in blocks}
        unknown = sorted(set(int(k) for k in experts) - known)
        if unknown:
            raise KeyError(f"blocks {unknown} have no MoE layer; MoE blocks are {sorted(known)}")
        chosen = {i: sorted(set(int(e) for e in experts.get(i, []))) for i, _ in blocks}
    else:
        chosen = {i: sorted(set(int(e) for e in experts)) for i, _ in blocks}
    for i, layer in blocks:
        bad = [e for e in chosen[i] if not 0 <= e < layer.num_experts]
        if bad:
            raise IndexError(f"block {i}: expert ids {bad} out of range [0, {layer.num_experts})")
    return chosen


def freeze_except(model: LM, experts: Sequence[int] | dict[int, Sequence[int]],
                  optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Freeze every expert but ``experts`` (same ids in every MoE block, or {block: ids}) and keep
    the frozen rows bit-identical across ``optimizer`` steps. Returns a function that undoes it."""
    chosen = _chosen(model, experts)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for i, layer in moe_blocks(model):
        frozen = [e for e in range(layer.num_experts) if e not in chosen[i]]
        layer.unfreeze_experts()
        if frozen:
            layer.freeze_experts(frozen)
        rows = torch.tensor(frozen, dtype=torch.long)
        for p in layer.experts.parameters():
            if p.dim() >= 1 and p.shape[0] == layer.num_experts and frozen:
                saved.append((p, rows, p.detach()[rows].clone()))

    def restore(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for p, rows, value in saved:
                p[rows] = value

    handle = optimizer.register_step_post_hook(restore)

    def undo() -> None:
        handle.remove()
        for _, layer in moe_blocks(model):
            layer.unfreeze_experts()

    return undo


def expert_param_filter(train_router: bool, train_shared: bool = False) -> Callable[[str, torch.nn.Parameter], bool]:
    """Trainer ``param_filter`` selecting routed experts (and optionally routers / shared experts)."""
    def keep(name: str, p: torch.nn.Parameter) -> bool:
        if ".mlp.experts." in name:
            return True
        if train_router and ".mlp.router." in name:
            return True
        return train_shared and ".mlp.shared_experts." in name
    return keep


def finetune_experts(model: LM, cfg: TrainConfig, data: TokenData, experts: Sequence[int] | dict[int, Sequence[int]],
                     train_router: bool = False, steps: int | None = None) -> Trainer:
    """Fine-tune only ``experts`` (and the routers if ``train_router``) of ``model`` on ``data``
    with the Trainer configured by ``cfg`` (cfg.model is replaced by the model's config).
    Returns the finished Trainer (``trainer.model`` is ``model``, trained in place; afterwards
    every parameter's requires_grad is as it was before)."""
    cfg = dataclasses.replace(cfg, model=model.config, steps=steps or cfg.steps)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    trainer = Trainer(cfg, data, model=model, param_filter=expert_param_filter(train_router))
    undo = freeze_except(model, experts, trainer.optimizer)
    try:
        trainer.fit()
    finally:
        undo()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return trainer


def most_used_experts(counts_NE: list[list[float]], label: int, n: int) -> list[int]:
    """The ``n`` experts that serve label ``label`` most, from (labels, E) routing counts."""
    row = torch.tensor(counts_NE[label], dtype=torch.float64)
    return sorted(row.topk(n).indices.tolist())
