"""Sort-based dispatch plan: which token rows go to which expert, grouped by expert.

Shape legend: T tokens, E experts, K top-k, S = T*K routing slots, R kept rows (R <= S).

Token choice: the S slots (token t, choice j) are stably sorted by expert id, so every expert's
rows are one contiguous block and the experts run as one grouped matrix product. With a capacity
C = ceil(T*K/E * capacity_factor), an expert keeps at most C rows; the drop policy decides which:
  ``position``     earlier tokens first (the order of the batch, as in GShard/Switch).
  ``probability``  highest routing weight first (batch-prioritised routing, Riquelme et al. 2021).
A dropped slot contributes zero; the token keeps its residual path and is counted as dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..router.routing import Routing


def token_choice_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(T*k/E * capacity_factor)."""
    return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


@dataclass
class DispatchPlan:
    """Rows grouped by expert.

    token_idx_R   source token of each kept row, rows sorted by expert.
    weight_R      float32 combine weight of each kept row.
    counts_E      kept rows per expert (long); offsets are its cumulative sum.
    slot_idx_R    for token choice: the flat slot (t*K + j) of each kept row, else None.
    routed_E      rows each expert was chosen for before capacity (long).
    num_dropped   slots dropped by capacity (0-dim long tensor).
    inverse_S     for token choice: the row of each slot t*K + j, R for a dropped slot; the combine
                  gathers each token's K rows back with it (deterministic, no atomics).
    topk_idx_TK, topk_weight_TK   for token choice: the routing's choices, for the sort-free
                  decode path (``moekit.ops.fused.gather_experts``).
    """

    token_idx_R: torch.Tensor
    weight_R: torch.Tensor
    counts_E: torch.Tensor
    slot_idx_R: torch.Tensor | None
    routed_E: torch.Tensor
    num_dropped: torch.Tensor
    num_tokens: int
    top_k: int
    inverse_S: torch.Tensor | None = None
    topk_idx_TK: torch.Tensor | None = None
    topk_weight_TK: torch.Tensor | None = None

    @property
    def dropless(self) -> bool:
        return self.slot_idx_R is not None and self.slot_idx_R.shape[0] == self.num_tokens * self.top_k


def plan_token_choice(routing: Routing, num_experts: int, capacity_factor: float | None,
                      drop_policy: str = "probability") -> DispatchPlan:
    idx_TK = routing.topk_idx_TK
    w_TK = routing.topk_weight_TK
    assert idx_TK is not None and w_TK is not None
    T, K = idx_TK.shape
    expert_S = idx_TK.reshape(-1)
    # scatter_add_ rather than bincount: a fixed output size, so torch.compile keeps one graph.
    routed_E = torch.zeros(num_experts, dtype=torch.long, device=idx_TK.device).scatter_add_(
        0, expert_S, torch.ones_like(expert_S))
    if capacity_factor is None:
        slot_R = torch.argsort(expert_S, stable=True)
        return DispatchPlan(
            token_idx_R=torch.div(slot_R, K, rounding_mode="floor"),
            weight_R=w_TK.reshape(-1)[slot_R],
            counts_E=routed_E,
            slot_idx_R=slot_R,
            routed_E=routed_E,
            num_dropped=torch.zeros((), dtype=torch.long, device=idx_TK.device),
            num_tokens=T,
            top_k=K,
            inverse_S=_inverse(slot_R, T * K),
            topk_idx_TK=idx_TK,
            topk_weight_TK=w_TK,
        )

    C = token_choice_capacity(T, K, num_experts, capacity_factor)
    if drop_policy == "probability":
        # Sort by weight (desc) first, then stably by expert: each expert's block is by weight.
        by_weight_S = torch.argsort(w_TK.reshape(-1).detach(), descending=True, stable=True)
        slot_S = by_weight_S[torch.argsort(expert_S[by_weight_S], stable=True)]
    else:
        slot_S = torch.argsort(expert_S, stable=True)
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    rank_S = torch.arange(slot_S.shape[0], device=slot_S.device) - starts_E[expert_S[slot_S]]
    keep_S = rank_S < C
    slot_R = slot_S[keep_S]
    counts_E = torch.clamp(routed_E, max=C)
    return DispatchPlan(
        token_idx_R=torch.div(slot_R, K, rounding_mode="floor"),
        weight_R=w_TK.reshape(-1)[slot_R],
        counts_E=counts_E,
        slot_idx_R=slot_R,
        routed_E=routed_E,
        num_dropped=(routed_E - counts_E).sum(),
        num_tokens=T,
        top_k=K,
        inverse_S=_inverse(slot_R, T * K),
    )


def _inverse(slot_R: torch.Tensor, S: int) -> torch.Tensor:
    """(S,) row of each slot; R (one past the last row) for slots that were dropped."""
    R = slot_R.shape[0]
    inverse_S = torch.full((S,), R, dtype=torch.long, device=slot_R.device)
    return inverse_S.index_put_((slot_R,), torch.arange(R, device=slot_R.device))


def plan_expert_choice(routing: Routing, available_E: torch.Tensor | None) -> DispatchPlan:
    token_idx_EC = routing.ec_token_idx_EC
    weight_EC = routing.ec_weight_EC
    assert token_idx_EC is not None and weight_EC is not None
    E, C = token_idx_EC.shape
    counts_E = torch.full((E,), C, dtype=torch.long, device=token_idx_EC.device)
    token_R, weight_R = token_idx_EC.reshape(-1), weight_EC.reshape(-1)
    if available_E is not None:
        keep_R = available_E.repeat_interleave(C)
        token_R, weight_R = token_R[keep_R], weight_R[keep_R]
        counts_E = counts_E * available_E
    return DispatchPlan(
        token_idx_R=token_R,
        weight_R=weight_R,
        counts_E=counts_E,
        slot_idx_R=None,
        routed_E=counts_E,
        num_dropped=torch.zeros((), dtype=torch.long, device=token_idx_EC.device),
        num_tokens=routing.num_tokens,
        top_k=C,
    )
