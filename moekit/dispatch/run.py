"""Run experts on a dispatch plan: permute -> grouped expert products -> combine.

This is the layer's hot path, behind one function so a fused implementation can replace it
and tests can compare it with the plain composition. Stacked SwiGLU/MLP experts whose backend
is not ``reference`` run through ``moekit.dispatch.fused``: the custom op (gather, both products,
activation and combine, with a hand-written backward), or, when a dropless token-choice batch has
few routed slots against the experts (decode), the sort-free gather path (``use_gather_path``).
Weight-only int8 experts (``moekit.experts.int8``) run ``moekit.dispatch.int8``'s loop or gather
kernel. Any other experts module, and ``backend="reference"``, run the plain composition.

While a profiler runs, the MoE forward's stages are ``torch.profiler.record_function`` ranges
(``stage``): moe.router, moe.dispatch, moe.experts, moe.combine (a fused path's permute and
combine run inside moe.experts); ``moekit.explain.latency`` reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import record_function

from .combine import combine, permute
from .fused import FUSED_ACTIVATIONS, fused_experts, gather_experts
from .grouped import fused_schedule
from .int8 import int8_experts, int8_gather_experts
from .plan import DispatchPlan

# Sort-free path: at most this many bytes of gathered expert weights (T*K copies of one expert's
# weights). Past it the copy (a read and a write of every chosen expert) costs more than the
# loop schedule's per-expert ops, which read each distinct expert once: 16 MiB at ~10 GB/s is
# ~1.6 ms, about 16 experts x 6 ops x 15 us of per-op latency.
GATHER_MAX_BYTES = 16 * 2**20


def use_gather_path(plan: DispatchPlan, w1: torch.Tensor, w2: torch.Tensor, x_TD: torch.Tensor) -> bool:
    """Sort-free decode path: dropless token choice whose T*K slots are at most half the experts
    (most slots then hit distinct experts and grouping buys nothing), within GATHER_MAX_BYTES."""
    if plan.topk_idx_TK is None or not plan.dropless:
        return False
    E = w1.shape[0]
    slots = plan.num_tokens * plan.top_k
    nbytes = slots * (w1[0].numel() + w2[0].numel()) * x_TD.element_size()
    return 2 * slots <= E and nbytes <= GATHER_MAX_BYTES


def stage(name: str) -> contextlib.AbstractContextManager[object]:
    """The profiler range ``moe.<name>`` while a profiler runs, else nothing: outside a profiler a
    range still costs a dispatcher call (~10-30 us) per stage on every forward."""
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        return record_function(f"moe.{name}")
    return contextlib.nullcontext()


def run_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: nn.Module,
                check_rows: Callable[[torch.Tensor, DispatchPlan], None] | None = None) -> torch.Tensor:
    """(T, D) tokens -> (T, D) weighted sum of each token's expert outputs, in x's dtype.

    check_rows, if given, sees the expert outputs (R, D) before they are combined (on the fused
    paths only when the combined output is not finite, which any non-finite expert row makes it).
    """
    int8 = _int8_weights(experts)
    if int8 is not None:  # weight-only int8 experts (moekit.experts.int8): inference kernels
        with stage("experts"):
            if use_gather_path(plan, int8[0], int8[2], x_TD):
                out_TD = int8_gather_experts(x_TD, *int8, plan.topk_idx_TK, plan.topk_weight_TK, experts.activation,
                                             experts.gated)
            else:
                out_TD = int8_experts(x_TD, *int8, plan.weight_R, plan.token_idx_R, plan.counts_E, experts.activation,
                                      experts.gated, plan.inverse_S)
        if check_rows is not None and not bool(torch.isfinite(out_TD).all()):
            check_rows(experts(permute(x_TD, plan), plan.counts_E), plan)
        return out_TD
    fused = _fused_weights(experts, x_TD)
    if fused is not None:
        w1, w2, gated, schedule = fused
        if use_gather_path(plan, w1, w2, x_TD):
            with stage("experts"):
                out_TD = gather_experts(x_TD, w1, w2, plan.topk_idx_TK, plan.topk_weight_TK, experts.activation, gated)
            if check_rows is not None and not bool(torch.isfinite(out_TD).all()):
                check_rows(experts(permute(x_TD, plan), plan.counts_E), plan)
            return out_TD
        with stage("experts"):
            out_TD, y_RD = fused_experts(x_TD, w1, w2, plan.weight_R, plan.token_idx_R, plan.counts_E,
                                         experts.activation, gated, schedule, plan.inverse_S)
        if check_rows is not None and not bool(torch.isfinite(out_TD).all()):
            check_rows(y_RD, plan)
        return out_TD
    with stage("dispatch"):
        x_RD = permute(x_TD, plan)
    with stage("experts"):
        y_RD = experts(x_RD, plan.counts_E)
    if check_rows is not None:
        check_rows(y_RD, plan)
    with stage("combine"):
        return combine(y_RD, plan, x_TD.dtype)


def _int8_weights(experts: nn.Module) -> tuple[torch.Tensor, ...] | None:
    from ..experts.int8 import Int8Experts

    if not isinstance(experts, Int8Experts) or experts.backend == "reference":
        return None
    return experts.int8_weights()


def _fused_weights(experts: nn.Module, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, str] | None:
    from ..experts.stacked import MLPExperts, SwiGLUExperts

    if type(experts) is SwiGLUExperts:
        w1, gated = experts.gate_up_proj, True
    elif type(experts) is MLPExperts:
        w1, gated = experts.up_proj, False
    else:
        return None
    if experts.activation not in FUSED_ACTIVATIONS:
        return None
    schedule = fused_schedule(experts.backend, x_TD, (x_TD.shape[-1], w1.shape[1], experts.down_proj.shape[-1]))
    if schedule is None:
        return None
    return w1, experts.down_proj, gated, schedule
