"""Operations over every MoE layer of a model: losses, bias updates, reports, masking."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .balance.losses import pooled_mixtral_aux_loss
from .layer import MoE
from .stats import LayerReport, warn_on_collapse


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name, layer) for every MoE layer; names the layers for error messages."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            module.layer_name = name or "MoE"
            found.append((module.layer_name, module))
    return found


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every MoE layer's weighted balancing losses from the last forward pass.

    Add it to the task loss before backward. Layers configured with the ``mixtral`` convention
    are pooled across layers first, as transformers' load_balancing_loss_func does (padding
    left out when the layers were given a token mask, as with its ``attention_mask``).
    """
    total: torch.Tensor | None = None
    pooled: dict[tuple[int, float], list] = {}
    for _, layer in moe_layers(model):
        total = layer.aux_loss if total is None else total + layer.aux_loss
        if layer._pooled_routing is not None:
            key = (layer.num_experts, layer.config.balance.aux_loss_coef)
            pooled.setdefault(key, []).append((layer._pooled_routing, getattr(layer, "_pooled_valid_T", None)))
    if total is None:
        return torch.zeros(())
    for (num_experts, coef), entries in pooled.items():
        routings, valid_Ts = [r for r, _ in entries], [v for _, v in entries]
        total = total + coef * pooled_mixtral_aux_loss(routings, num_experts, valid_Ts)
    return total


def update_router_biases(model: nn.Module) -> None:
    """Apply the aux-loss-free bias rule in every layer that has it; call after optimizer.step()."""
    for _, layer in moe_layers(model):
        layer.update_selection_bias()


def routing_report(model: nn.Module, warn: bool = True) -> dict[str, LayerReport]:
    """Routing health of every MoE layer; warns (RoutingCollapseWarning) on dead or dominant experts."""
    reports = {}
    for name, layer in moe_layers(model):
        reports[name] = report = layer.report()
        if warn:
            warn_on_collapse(name, report, layer.top_k)
    return reports


def reset_routing_stats(model: nn.Module) -> None:
    for _, layer in moe_layers(model):
        layer.reset_stats()


def mask_experts(model: nn.Module, experts: Mapping[str, Iterable[int]] | Iterable[int]) -> None:
    """Mask experts by layer name ({name: ids}), or the same ids in every layer."""
    layers = dict(moe_layers(model))
    if isinstance(experts, Mapping):
        unknown = sorted(set(experts) - set(layers))
        if unknown:
            raise KeyError(f"no MoE layer named {unknown}; layers are {sorted(layers)}")
        for name, ids in experts.items():
            layers[name].mask_experts(ids)
    else:
        ids = list(experts)
        for layer in layers.values():
            layer.mask_experts(ids)
