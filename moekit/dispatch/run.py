"""Run experts on a dispatch plan: permute -> grouped expert products -> combine.

This is the layer's hot path, behind one function so a fused implementation can replace it
and tests can compare it with the plain composition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .combine import combine, permute
from .plan import DispatchPlan


def run_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: nn.Module,
                check_rows: Callable[[torch.Tensor, DispatchPlan], None] | None = None) -> torch.Tensor:
    """(T, D) tokens -> (T, D) weighted sum of each token's expert outputs, in x's dtype.

    check_rows, if given, sees the expert outputs (R, D) before they are combined.
    """
    x_RD = permute(x_TD, plan)
    y_RD = experts(x_RD, plan.counts_E)
    if check_rows is not None:
        check_rows(y_RD, plan)
    return combine(y_RD, plan, x_TD.dtype)
