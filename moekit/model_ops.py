"""Operations over every MoE layer of a model: naming, losses, bias updates, reports, masking,
the per-layer state a checkpoint keeps (``moe_state``), and ``capture_routing``, the opt-in way
to see each forward's routing and dispatch plan."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .balance.losses import PooledSums, pooled_mixtral_loss
from .errors import CheckpointError
from .layer import MoE, RoutingEvent
from .stats import LayerReport, warn_on_collapse


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name, layer) for every MoE layer, in module order; a bare layer is named by its
    ``layer_name``. Reads only: ``name_moe_layers`` sets the names errors use."""
    return [(name or module.layer_name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def name_moe_layers(model: nn.Module) -> list[str]:
    """Set every MoE layer's ``layer_name`` (used by its error messages) to its qualified name in
    ``model``; returns the names. LM and patch_model name their layers when they build them; call
    this once for a model you assemble yourself."""
    names = []
    for name, layer in moe_layers(model):
        layer.layer_name = name
        names.append(name)
    return names


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of every MoE layer's weighted balancing losses from the last forward pass.

    Add it to the task loss before backward. Each layer keeps its own losses in ``layer.aux_loss``;
    layers configured with the ``mixtral`` convention keep per-expert sums
    (``layer.pooled_loss_sums``) instead, pooled here across layers first, as transformers'
    load_balancing_loss_func does (padding left out when the layers were given a token mask, as
    with its ``attention_mask``).
    """
    total: torch.Tensor | None = None
    pooled: dict[tuple[int, float], list[PooledSums]] = {}
    for _, layer in moe_layers(model):
        total = layer.aux_loss if total is None else total + layer.aux_loss
        if layer.pooled_loss_sums is not None:
            key = (layer.num_experts, layer.config.balance.aux_loss_coef)
            pooled.setdefault(key, []).append(layer.pooled_loss_sums)
    if total is None:
        return torch.zeros(())
    for (num_experts, coef), sums in pooled.items():
        total = total + coef * pooled_mixtral_loss(sums, num_experts)
    return total


@dataclass
class RoutingCapture:
    """Each MoE layer's ``RoutingEvent`` per counted forward inside ``capture_routing``, in call order."""

    names: list[str]
    events: dict[str, list[RoutingEvent]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[RoutingEvent]:
        if name not in self.events:
            raise KeyError(f"no MoE layer named {name!r} was captured; layers are {self.names}")
        return self.events[name]

    def last(self, name: str | None = None) -> RoutingEvent:
        """The latest event of layer ``name`` (of the only layer when None)."""
        if name is None:
            if len(self.names) != 1:
                raise ValueError(f"capture_routing: {len(self.names)} layers were captured ({self.names}); "
                                 f"name one")
            name = self.names[0]
        events = self[name]
        if not events:
            raise ValueError(f"capture_routing: {name} ran no forward while capturing")
        return events[-1]

    def clear(self) -> None:
        """Drop the events captured so far (capturing goes on)."""
        for events in self.events.values():
            events.clear()


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingCapture]:
    """Record every MoE layer's routing and dispatch plan (detached) for the forwards run inside
    the block; layers are named by their qualified names in ``model``::

        with moekit.capture_routing(model) as cap:
            model(x)
        idx_TK = cap.last("layers.0.mlp").routing.topk_idx_TK

    Activation checkpointing's recomputation adds no event. Events hold T x E logits per layer
    and forward, so capture the forwards you need, not a whole training run.
    """
    layers = moe_layers(model)
    capture = RoutingCapture([name for name, _ in layers], {name: [] for name, _ in layers})
    handles = []
    try:
        for name, layer in layers:
            events = capture.events[name]
            handles.append(layer.register_routing_hook(lambda _layer, event, events=events: events.append(event)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


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


def moe_state(model: nn.Module) -> dict[str, Any]:
    """Per MoE layer, the state a checkpoint keeps beside the tensors: masked and frozen experts,
    the bias load, routing-statistics buffers (as lists; float64 values round-trip exactly through
    JSON) and the forward-pass count. Empty for a non-module snapshot."""
    if not isinstance(model, nn.Module):
        return {}
    out = {}
    for name, layer in moe_layers(model):
        out[name] = {"masked": layer.masked_experts, "frozen": layer.frozen_experts,
                     "bias_load_E": layer.bias_load_E.cpu().tolist(),
                     "stats": {k: v.cpu().tolist() for k, v in layer.stats.named_buffers(recurse=False)},
                     "forward_passes": layer.stats.forward_passes}
    return out


def restore_moe_state(state: dict[str, Any], model: nn.Module, path: str | Path, stats: bool = True) -> None:
    """Re-apply ``moe_state`` (read from checkpoint ``path``, named in errors): masked experts always;
    frozen experts and routing statistics if ``stats`` (resuming training; a model loaded for eval
    or serving starts with fresh statistics). A state that does not fit raises CheckpointError."""
    layers = dict(moe_layers(model))
    unknown = sorted(set(state) - set(layers))
    if unknown:
        raise CheckpointError(f"checkpoint {path} has MoE state for layers {unknown[:5]} that the model lacks")
    for name, s in state.items():
        layer = layers[name]
        layer.unmask_experts()
        try:
            if s["masked"]:
                layer.mask_experts(s["masked"])
            if not stats:
                continue
            layer.unfreeze_experts()
            if s["frozen"]:
                layer.freeze_experts(s["frozen"])
            with torch.no_grad():
                layer.bias_load_E.copy_(torch.tensor(s["bias_load_E"], dtype=layer.bias_load_E.dtype))
                for k, buf in layer.stats.named_buffers(recurse=False):
                    buf.copy_(torch.tensor(s["stats"][k], dtype=buf.dtype))
            layer.stats.forward_passes = int(s["forward_passes"])
        except (KeyError, IndexError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path}: MoE state of {name} does not fit the model ({err})") from None
