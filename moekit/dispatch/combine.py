"""Permute tokens into expert order, and combine expert outputs back into token order.

Shape legend: T tokens, D dim, K top-k, S = T*K slots, R kept rows. The tensor steps are
``moekit.ops.permute``'s; these read them off a ``DispatchPlan``.
"""

from __future__ import annotations

import torch

from ..ops.permute import gather_rows, token_sum
from .plan import DispatchPlan


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x (T, D) -> rows (R, D) grouped by expert."""
    return gather_rows(x_TD, plan.token_idx_R)


def combine(y_RD: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: (R, D) -> (T, D), accumulated in the routing
    dtype (float32, or float64). Token choice gathers each token's K rows back by the plan's
    inverse permutation and sums them (deterministic, no atomics; dropped slots read a zero row);
    expert choice, where tokens have varying row counts, adds rows with ``index_add_``."""
    weighted_RD = y_RD.to(plan.weight_R.dtype) * plan.weight_R.unsqueeze(-1)
    return token_sum(weighted_RD, plan.inverse_S, plan.token_idx_R, plan.num_tokens, weighted_RD.dtype).to(out_dtype)
