"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

S = softmax(x W^T) over experts, shape (T, E). Each expert takes the C tokens with the highest
score in its column, C = ceil(T * capacity_factor / E); a token may be taken by zero or many
experts. The gate value of (token t, expert e) is S[t, e].

Not causal: whether a token is taken depends on every other token in the batch, including
later positions, so it must not be used for autoregressive decoding as-is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RouterConfig
from .routing import Routing, router_logits


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    return min(num_tokens, max(1, math.ceil(num_tokens * capacity_factor / num_experts)))


class ExpertChoiceRouter(nn.Module):
    """x (T, D) -> Routing with ``ec_token_idx_EC`` and ``ec_weight_EC``."""

    def __init__(self, dim: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if config.logit_bias else None
        self.register_buffer("selection_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor, available_E: torch.Tensor | None = None) -> Routing:
        logits_TE = router_logits(x_TD, self.weight, self.bias)
        masked_TE = logits_TE if available_E is None else logits_TE.masked_fill(~available_E, float("-inf"))
        scores_TE = torch.softmax(masked_TE, dim=-1)
        assert self.config.capacity_factor is not None
        C = expert_choice_capacity(x_TD.shape[0], self.num_experts, self.config.capacity_factor)
        weight_EC, token_idx_EC = scores_TE.t().topk(C, dim=-1)
        if available_E is not None:
            # A masked expert takes no tokens: its picks get weight 0 and are dropped at dispatch.
            weight_EC = weight_EC * available_E.unsqueeze(-1)
        return Routing(logits_TE=logits_TE, scores_TE=scores_TE,
                       ec_token_idx_EC=token_idx_EC, ec_weight_EC=weight_EC)
