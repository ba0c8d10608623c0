"""What a router hands to dispatch.

Shape legend: T tokens, D model dim, E experts, K top-k, C tokens per expert (expert choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in float32 at least (float64 stays float64, for reference checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None) -> torch.Tensor:
    """Logits (T, E) = x W^T + b in the routing dtype. A half-precision x is upcast inside the
    product and saved for the backward in its own dtype: a float32 copy saved instead would hold
    T x D x 4 bytes through the whole backward (16 MB of a bf16 layer's 250 MB activation peak at
    4096 tokens, D 1024). Same values and gradients as ``F.linear(x.float(), W.float(), b)``."""
    dtype = routing_dtype(x_TD.dtype)
    bias = None if bias_E is None else bias_E.to(dtype)
    if x_TD.dtype == dtype:
        return F.linear(x_TD, weight_ED.to(dtype), bias)
    return _UpcastLinear.apply(x_TD, weight_ED, bias)


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None) -> torch.Tensor:
        dtype = routing_dtype(x_TD.dtype)
        ctx.save_for_backward(x_TD, weight_ED)
        ctx.has_bias = bias_E is not None
        return F.linear(x_TD.to(dtype), weight_ED.to(dtype), bias_E)

    @staticmethod
    def backward(ctx, dlogits_TE: torch.Tensor):
        x_TD, weight_ED = ctx.saved_tensors
        dtype = dlogits_TE.dtype
        dx = dlogits_TE.mm(weight_ED.to(dtype)).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        dw = dlogits_TE.t().mm(x_TD.to(dtype)).to(weight_ED.dtype) if ctx.needs_input_grad[1] else None
        db = dlogits_TE.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


@dataclass
class Routing:
    """Routing decisions for T tokens, all float tensors in float32.

    Token choice fills ``topk_idx_TK``/``topk_weight_TK``; expert choice fills
    ``ec_token_idx_EC``/``ec_weight_EC`` instead.
    """

    logits_TE: torch.Tensor
    # Per-expert scores the balancing losses use: softmax probabilities, or sigmoid scores.
    scores_TE: torch.Tensor
    topk_idx_TK: torch.Tensor | None = None
    topk_weight_TK: torch.Tensor | None = None
    ec_token_idx_EC: torch.Tensor | None = None
    ec_weight_EC: torch.Tensor | None = None
    # Noisy top-k in training: the clean logits' noise scale and the noisy logits, for the
    # smooth load estimator of Shazeer et al. 2017.
    noise_std_TE: torch.Tensor | None = None
    noisy_logits_TE: torch.Tensor | None = None
    score_func: str = "softmax"
    # (T,) logsumexp of logits_TE (no gradient), where the scores are softmax(logits_TE) and the
    # router had it at hand; the z-loss and the statistics read it instead of recomputing it.
    logsumexp_T: torch.Tensor | None = None

    @property
    def is_token_choice(self) -> bool:
        return self.topk_idx_TK is not None

    @property
    def num_tokens(self) -> int:
        return self.logits_TE.shape[0]
