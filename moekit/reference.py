"""A plain per-token reference of the MoE layer, written from the papers' formulas.

No sorting, no grouped products: every token is routed by looping over experts, and every
(token, expert) pair runs the expert on that one row. Run it on a float64 copy of a layer to get
the output (and, through autograd, the gradients) the fast path must reproduce.
"""

from __future__ import annotations

import math

import torch

from .layer import MoE


def _choose(choice: list[float], k: int, n_group: int, topk_group: int, group_score: str) -> list[int]:
    E = len(choice)
    eligible = list(range(E))
    if n_group > 1:
        size = E // n_group
        group_vals = []
        for g in range(n_group):
            members = sorted((choice[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_vals.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
        best = sorted(range(n_group), key=lambda g: -group_vals[g])[:topk_group]
        eligible = [e for e in eligible if e // size in best]
    return sorted(eligible, key=lambda e: -choice[e])[:k]


def reference_routing(layer: MoE, x_TD: torch.Tensor) -> list[list[tuple[int, torch.Tensor]]]:
    """For each token, the (expert, weight) pairs the layer's config prescribes (eval mode)."""
    cfg = layer.config.router
    router = layer.router
    E = layer.num_experts
    available = layer.available_E.tolist()
    T = x_TD.shape[0]
    logits = x_TD @ router.weight.t()
    if router.bias is not None:
        logits = logits + router.bias
    per_token: list[list[tuple[int, torch.Tensor]]] = []
    if cfg.kind == "expert_choice":
        scores = torch.stack([_softmax_over(logits[t], available) for t in range(T)])
        C = min(T, max(1, math.ceil(T * cfg.capacity_factor / E)))
        per_token = [[] for _ in range(T)]
        for e in range(E):
            if not available[e]:
                continue
            for t in sorted(range(T), key=lambda t: -float(scores[t, e].detach()))[:C]:
                per_token[t].append((e, scores[t, e]))
        return per_token
    score_func = cfg.effective_score_func
    bias = router.selection_bias
    for t in range(T):
        if score_func == "softmax":
            s = _softmax_over(logits[t], available)
        else:
            s = torch.sigmoid(logits[t])
        choice = [float(s[e].detach()) + (float(bias[e]) if bias is not None else 0.0) if available[e] else -math.inf
                  for e in range(E)]
        picks = _choose(choice, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.group_score)
        weights = [s[e] for e in picks]
        if cfg.norm_topk_prob and cfg.kind != "switch":
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        per_token.append([(e, w * cfg.routed_scaling_factor) for e, w in zip(picks, weights)])
    if cfg.capacity_factor is not None:
        per_token = _apply_capacity(per_token, E, cfg.top_k, cfg.capacity_factor, cfg.drop_policy)
    return per_token


def _softmax_over(logits_E: torch.Tensor, available: list[bool]) -> torch.Tensor:
    exps = [torch.exp(logits_E[e]) if available[e] else logits_E[e] * 0 for e in range(len(available))]
    total = sum(exps)
    return torch.stack([v / total for v in exps])


def _apply_capacity(per_token, E: int, k: int, cf: float, policy: str):
    T = len(per_token)
    C = max(1, math.ceil(T * k / E * cf))
    kept: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(T)]
    for e in range(E):
        claims = [(t, j, w) for t in range(T) for j, (ee, w) in enumerate(per_token[t]) if ee == e]
        if policy == "probability":
            claims.sort(key=lambda c: -float(c[2].detach()))
        for t, j, w in claims[:C]:
            kept[t].append((e, w))
    return kept


def reference_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop output of ``layer`` on ``x`` (use a float64 copy of the layer, eval mode)."""
    x_TD = x.reshape(-1, layer.dim)
    rows = []
    for t, pairs in enumerate(reference_routing(layer, x_TD)):
        out = x_TD[t] * 0
        for e, w in pairs:
            out = out + w * layer.experts.expert_forward(e, x_TD[t:t + 1])[0]
        if layer.shared_experts is not None:
            out = out + layer.shared_experts(x_TD[t:t + 1])[0]
        rows.append(out)
    return torch.stack(rows).view(x.shape)
