"""Run experts on a dispatch plan: permute -> grouped expert products -> combine.

This is the layer's hot path, behind one function so a fused implementation can replace it
and tests can compare it with the plain composition. An experts module that has
``fused_weights(x_TD)`` says itself which kernel runs it, by the weights it returns (dispatch
never imports ``moekit.experts``; both build on ``moekit.ops``):
  ``ops.fused.FusedWeights`` (stacked SwiGLU/MLP experts whose backend is not ``reference``): the
      custom op ``moekit.ops.fused`` (gather, both products, activation and combine, with a
      hand-written backward), or, when a dropless token-choice batch has few routed slots against
      the experts (decode), the sort-free gather path (``use_gather_path``).
  ``ops.int8.Int8Weights`` (weight-only int8 experts, ``moekit.experts.int8``): ``moekit.ops.int8``'s
      loop or gather kernel.
  None, or no such method (any other experts module, ``backend="reference"``): the plain composition.

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

from ..ops.cuda_kernels import gather_max_bytes
from ..ops.finite import all_finite
from ..ops.fused import FusedWeights, fused_experts, gather_experts
from ..ops.int8 import Int8Weights, int8_experts, int8_gather_experts
from .combine import combine, permute
from .plan import DispatchPlan

# Sort-free path on the CPU: at most this many bytes of gathered expert weights (T*K copies of one
# expert's weights). Past it the copy (a read and a write of every chosen expert) costs more than the
# loop schedule's per-expert ops, which read each distinct expert once: 16 MiB at ~10 GB/s is
# ~1.6 ms, about 16 experts x 6 ops x 15 us of per-op latency. On CUDA the limit is a share of the
# device's memory (``moekit.ops.cuda_kernels.gather_max_bytes``): there the copy streams at
# memory bandwidth while the sorted path pays a kernel launch per op.
GATHER_MAX_BYTES = 16 * 2**20


@torch.compiler.assume_constant_result
def _cuda_gather_max_bytes(index: int) -> int:
    return gather_max_bytes(torch.device("cuda", index))


def gather_limit_bytes(x_TD: torch.Tensor) -> int:
    """The most bytes of gathered expert weights ``use_gather_path`` allows on x's device."""
    if x_TD.device.type == "cuda":
        index = x_TD.device.index
        return _cuda_gather_max_bytes(torch.cuda.current_device() if index is None else index)
    return GATHER_MAX_BYTES


def use_gather_path(plan: DispatchPlan, w1: torch.Tensor, w2: torch.Tensor, x_TD: torch.Tensor) -> bool:
    """Sort-free decode path: dropless token choice whose T*K slots are at most half the experts
    (most slots then hit distinct experts and grouping buys nothing), within ``gather_limit_bytes``."""
    if plan.topk_idx_TK is None or not plan.dropless:
        return False
    E = w1.shape[0]
    slots = plan.num_tokens * plan.top_k
    if 2 * slots > E:
        return False
    nbytes = slots * (w1[0].numel() + w2[0].numel()) * x_TD.element_size()
    return nbytes <= gather_limit_bytes(x_TD)


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
    weights = kernel_weights(experts, x_TD)
    if isinstance(weights, Int8Weights):  # weight-only int8 experts: inference kernels
        q1, s1, q2, s2, act, gated = weights
        with stage("experts"):
            if use_gather_path(plan, q1, q2, x_TD):
                out_TD = int8_gather_experts(x_TD, q1, s1, q2, s2, plan.topk_idx_TK, plan.topk_weight_TK, act, gated)
            else:
                out_TD = int8_experts(x_TD, q1, s1, q2, s2, plan.weight_R, plan.token_idx_R, plan.counts_E, act,
                                      gated, plan.inverse_S)
        if check_rows is not None and not all_finite(out_TD):
            check_rows(experts(permute(x_TD, plan), plan.counts_E), plan)
        return out_TD
    if isinstance(weights, FusedWeights):
        w1, w2, act, gated, schedule = weights
        if use_gather_path(plan, w1, w2, x_TD):
            with stage("experts"):
                out_TD = gather_experts(x_TD, w1, w2, plan.topk_idx_TK, plan.topk_weight_TK, act, gated)
            if check_rows is not None and not all_finite(out_TD):
                check_rows(experts(permute(x_TD, plan), plan.counts_E), plan)
            return out_TD
        with stage("experts"):
            out_TD, y_RD = fused_experts(x_TD, w1, w2, plan.weight_R, plan.token_idx_R, plan.counts_E, act, gated,
                                         schedule, plan.inverse_S)
        if check_rows is not None and not all_finite(out_TD):
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


def kernel_weights(experts: nn.Module, x_TD: torch.Tensor) -> FusedWeights | Int8Weights | None:
    """What ``experts.fused_weights(x_TD)`` returns, or None for a module without that method."""
    fused_weights = getattr(experts, "fused_weights", None)
    if fused_weights is None:
        return None
    weights = fused_weights(x_TD)
    if weights is not None and not isinstance(weights, (FusedWeights, Int8Weights)):
        raise TypeError(f"{type(experts).__name__}.fused_weights returned {type(weights).__name__}; expected "
                        f"moekit.ops.FusedWeights, moekit.ops.Int8Weights or None")
    return weights
