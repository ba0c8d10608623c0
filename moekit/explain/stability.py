"""Routing stability and expert drift between two models (two checkpoints of one run, two runs,
or a model before and after fine-tuning), and per-expert loss attribution.

routing_change: on the same inputs, the fraction of tokens whose top-1 expert differs, and the
mean Jaccard overlap of the top-k sets, per MoE layer (the measure of routing fluctuation of
Dai et al. 2022, "StableMoE"). weight_drift: per expert, ||W_b - W_a|| / ||W_a|| over its rows of
every stacked expert tensor. per_expert_loss: the validation loss of the tokens routed to each
expert (top-1, and weighted by routing weight over all top-k picks).

Shape legend: B batch, S sequence, T tokens, K top-k, E experts, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..model_ops import capture_routing, moe_layers


def _routes(model: nn.Module, ids_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    with capture_routing(model) as cap:
        model(ids_BS)
    out = {}
    for name in cap.names:
        r = cap.last(name).routing
        if r.topk_idx_TK is None:
            raise ValueError(f"{name}: routing comparison needs a token-choice router")
        order_TK = r.topk_weight_TK.argsort(dim=-1, descending=True)
        out[name] = r.topk_idx_TK.gather(1, order_TK)
    return out


@torch.no_grad()
def routing_change(model_a: nn.Module, model_b: nn.Module,
                   batches: Iterable[torch.Tensor]) -> dict[str, dict[str, float]]:
    """{layer: {top1_changed, topk_jaccard, tokens}} over the (B, S) id batches. Layers are matched
    by name; both models must have the same MoE layers."""
    names_a = [n for n, _ in moe_layers(model_a)]
    names_b = [n for n, _ in moe_layers(model_b)]
    if names_a != names_b:
        raise ValueError(f"the models have different MoE layers: {names_a} vs {names_b}")
    if not names_a:
        raise ValueError("the models have no MoE layers")
    modes = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    changed = {n: 0.0 for n in names_a}
    jaccard = {n: 0.0 for n in names_a}
    tokens = 0
    try:
        for ids_BS in batches:
            ra, rb = _routes(model_a, ids_BS), _routes(model_b, ids_BS)
            for n in names_a:
                a_TK, b_TK = ra[n], rb[n]
                changed[n] += float((a_TK[:, 0] != b_TK[:, 0]).sum())
                inter_T = (a_TK.unsqueeze(2) == b_TK.unsqueeze(1)).any(dim=2).sum(dim=1).double()
                union_T = a_TK.shape[1] + b_TK.shape[1] - inter_T
                jaccard[n] += float((inter_T / union_T).sum())
            tokens += ids_BS.numel()
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if tokens == 0:
        raise ValueError("no batches given")
    return {n: {"top1_changed": changed[n] / tokens, "topk_jaccard": jaccard[n] / tokens, "tokens": tokens}
            for n in names_a}


@torch.no_grad()
def weight_drift(model_a: nn.Module, model_b: nn.Module) -> dict[str, list[float]]:
    """{layer: [relative L2 change of expert e's weights]}: sqrt(sum ||dW_e||^2 / sum ||W_e||^2)
    over the stacked expert tensors (0 for an untouched expert)."""
    layers_b = dict(moe_layers(model_b))
    out = {}
    for name, la in moe_layers(model_a):
        lb = layers_b.get(name)
        if lb is None or lb.num_experts != la.num_experts:
            raise ValueError(f"{name}: missing in the second model or a different expert count")
        E = la.num_experts
        diff_E = torch.zeros(E, dtype=torch.float64)
        norm_E = torch.zeros(E, dtype=torch.float64)
        params_b = dict(lb.experts.named_parameters())
        for pname, pa in la.experts.named_parameters():
            if pa.dim() >= 1 and pa.shape[0] == E:
                a_EX = pa.detach().double().reshape(E, -1)
                b_EX = params_b[pname].detach().double().reshape(E, -1)
                diff_E += (b_EX - a_EX).square().sum(dim=1)
                norm_E += a_EX.square().sum(dim=1)
        out[name] = (diff_E / norm_E.clamp_min(1e-300)).sqrt().tolist()
    return out


@torch.no_grad()
def per_expert_loss(model: nn.Module, batches: Iterable[Any]) -> dict[str, dict[str, list[float]]]:
    """{layer: {top1_loss, weighted_loss, top1_tokens}} per expert over batches with
    ``input_ids`` and ``targets`` (B, S) (e.g. ``eval_batches``). top1_loss[e]: mean next-token
    loss of the tokens whose top-1 expert is e; weighted_loss[e]: the mean weighted by every
    top-k pick's routing weight. NaN for an expert that got no token."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    was_training = model.training
    model.eval()
    acc = {n: {"top1_sum": torch.zeros(l.num_experts, dtype=torch.float64),
               "top1_n": torch.zeros(l.num_experts, dtype=torch.float64),
               "w_sum": torch.zeros(l.num_experts, dtype=torch.float64),
               "w_n": torch.zeros(l.num_experts, dtype=torch.float64)} for n, l in layers}
    try:
        for b in batches:
            with capture_routing(model) as cap:
                logits_BSV = model(b.input_ids)
            nll_T = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), b.targets.reshape(-1),
                                    reduction="none").double()
            for name, _ in layers:
                r = cap.last(name).routing
                idx_TK, w_TK = r.topk_idx_TK, r.topk_weight_TK.double()
                top1_T = idx_TK.gather(1, w_TK.argmax(dim=1, keepdim=True)).squeeze(1)
                a = acc[name]
                a["top1_sum"].index_add_(0, top1_T, nll_T)
                a["top1_n"].index_add_(0, top1_T, torch.ones_like(nll_T))
                a["w_sum"].index_add_(0, idx_TK.reshape(-1), (w_TK * nll_T[:, None]).reshape(-1))
                a["w_n"].index_add_(0, idx_TK.reshape(-1), w_TK.reshape(-1))
    finally:
        model.train(was_training)
    return {n: {"top1_loss": (a["top1_sum"] / a["top1_n"]).tolist(),
                "weighted_loss": (a["w_sum"] / a["w_n"]).tolist(),
                "top1_tokens": a["top1_n"].tolist()} for n, a in acc.items()}
