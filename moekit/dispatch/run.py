"""Run experts on a dispatch plan: permute -> grouped expert products -> combine.

This is the layer's hot path, behind one function so a fused implementation can replace it
and tests can compare it with the plain composition. Stacked SwiGLU/MLP experts whose backend
is not ``reference`` run through ``moekit.dispatch.fused`` (one autograd Function for gather,
both products, activation and combine); any other experts module, and ``backend="reference"``,
run the plain composition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .combine import combine, permute
from .fused import FUSED_ACTIVATIONS, fused_experts
from .grouped import fused_schedule
from .plan import DispatchPlan


def run_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: nn.Module,
                check_rows: Callable[[torch.Tensor, DispatchPlan], None] | None = None) -> torch.Tensor:
    """(T, D) tokens -> (T, D) weighted sum of each token's expert outputs, in x's dtype.

    check_rows, if given, sees the expert outputs (R, D) before they are combined (on the fused
    path only when the combined output is not finite, which any non-finite expert row makes it).
    """
    fused = _fused_weights(experts, x_TD, plan)
    if fused is not None:
        w1, w2, gated, schedule = fused
        out_TD, y_RD = fused_experts(x_TD, w1, w2, plan.weight_R, plan.token_idx_R, plan.counts_E,
                                     experts.activation, gated, schedule)
        if check_rows is not None and not bool(torch.isfinite(out_TD).all()):
            check_rows(y_RD, plan)
        return out_TD
    x_RD = permute(x_TD, plan)
    y_RD = experts(x_RD, plan.counts_E)
    if check_rows is not None:
        check_rows(y_RD, plan)
    return combine(y_RD, plan, x_TD.dtype)


def _fused_weights(experts: nn.Module, x_TD: torch.Tensor,
                   plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor, bool, str] | None:
    from ..experts.stacked import MLPExperts, SwiGLUExperts

    if type(experts) is SwiGLUExperts:
        w1, gated = experts.gate_up_proj, True
    elif type(experts) is MLPExperts:
        w1, gated = experts.up_proj, False
    else:
        return None
    if experts.activation not in FUSED_ACTIVATIONS:
        return None
    schedule = fused_schedule(experts.backend, x_TD, (x_TD.shape[-1], w1.shape[1], experts.down_proj.shape[-1]),
                              rows_per_expert=plan.token_idx_R.shape[0] / w1.shape[0])
    if schedule is None:
        return None
    return w1, experts.down_proj, gated, schedule
