"""Permute tokens into expert order, and combine expert outputs back into token order.

Shape legend: T tokens, D dim, K top-k, S = T*K slots, R kept rows.
"""

from __future__ import annotations

import torch

from .plan import DispatchPlan


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x (T, D) -> rows (R, D) grouped by expert."""
    return x_TD.index_select(0, plan.token_idx_R)


def combine(y_RD: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: (R, D) -> (T, D), accumulated in the routing
    dtype (float32, or float64). Token choice gathers each token's K rows back by the plan's
    inverse permutation and sums them (deterministic, no atomics; dropped slots read a zero row);
    expert choice, where tokens have varying row counts, adds rows with ``index_add_``."""
    T, D = plan.num_tokens, y_RD.shape[-1]
    weighted_RD = y_RD.to(plan.weight_R.dtype) * plan.weight_R.unsqueeze(-1)
    if plan.inverse_S is None:
        out_TD = weighted_RD.new_zeros(T, D).index_add_(0, plan.token_idx_R, weighted_RD)
    else:
        if plan.inverse_S.shape[0] != weighted_RD.shape[0]:
            weighted_RD = torch.cat((weighted_RD, weighted_RD.new_zeros(1, D)))
        out_TD = weighted_RD.index_select(0, plan.inverse_S).view(T, plan.top_k, D).sum(dim=1)
    return out_TD.to(out_dtype)
