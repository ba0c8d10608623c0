"""Token-choice routers: each token picks its top-k experts.

One module covers the token-choice family, selected by ``RouterConfig.kind``:
  softmax_topk  Mixtral / Qwen / OLMoE: p = softmax(x W^T); top-k of p; optional renormalisation.
  noisy_topk    Shazeer et al. 2017, "Outrageously Large Neural Networks": in training,
                H = x W_g^T + N(0,1) * softplus(x W_noise^T); weights = softmax over the kept top-k
                of H (the same as renormalising softmax(H) over the top-k).
  switch        Fedus et al. 2021, "Switch Transformers": top-1, weight = p of the chosen expert.
  sigmoid_topk  DeepSeek-V3 (arXiv 2412.19437): s = sigmoid(x W^T); selection on s + b (b the
                aux-loss-free bias), optionally group-limited; weights from the unbiased s,
                normalised over the top-k, times routed_scaling_factor.
Group-limited selection (DeepSeek-V2/V3) applies to any score function: experts are split into
n_group groups, each group scored by its top-2 sum (V3) or max (V2), and only the best
topk_group groups are eligible.

Router math runs in float32 whatever the input dtype: softmax/top-k over bf16 logits flips
near-ties and loses small probabilities, which changes which experts are chosen.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RouterConfig
from .routing import Routing, router_logits, routing_dtype


def group_limited_mask(choice_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Bool (T, E): True for experts in each token's best ``topk_group`` groups."""
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.view(T, n_group, E // n_group)
    if group_score == "top2_sum":
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_TG = grouped_TGe.amax(dim=-1)
    best_TG = group_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


class TopKRouter(nn.Module):
    """x (T, D) -> Routing with ``topk_idx_TK`` and float32 ``topk_weight_TK``."""

    def __init__(self, dim: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.top_k = config.top_k
        self.score_func = config.effective_score_func
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if config.logit_bias else None
        # Shazeer et al. initialise both gating matrices to zero.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, dim)) if config.kind == "noisy_topk" else None
        has_selection_bias = config.kind == "sigmoid_topk" or config.bias_update_rate is not None
        # Aux-loss-free balancing bias: used only to choose experts, moved by a rule, not gradients.
        self.register_buffer("selection_bias", torch.zeros(num_experts) if has_selection_bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def gate_weights(self, scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """The chosen experts' weights (T, K): their scores, normalised over the k (unless switch or
        norm_topk_prob is off), times routed_scaling_factor."""
        cfg = self.config
        weight_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob and cfg.kind != "switch":
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weight_TK = weight_TK * cfg.routed_scaling_factor
        return weight_TK

    def replay(self, routing: Routing, topk_idx_TK: torch.Tensor) -> Routing:
        """``routing`` with the given experts (router replay, ``moekit.replay``) instead of its own
        top-k; their weights come from this forward's scores, so gradients reach the router."""
        return dataclasses.replace(routing, topk_idx_TK=topk_idx_TK,
                                   topk_weight_TK=self.gate_weights(routing.scores_TE, topk_idx_TK))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # The selection bias moves by steps of bias_update_rate (~1e-3): in bfloat16 such steps
        # round away, so it keeps its precision when the module is cast to a 16-bit dtype.
        bias = self.selection_bias
        super()._apply(fn, recurse)
        if bias is not None and self.selection_bias.dtype in (torch.float16, torch.bfloat16):
            self.selection_bias = bias.to(self.selection_bias.device)
        return self

    def forward(self, x_TD: torch.Tensor, available_E: torch.Tensor | None = None) -> Routing:
        cfg = self.config
        if (self.training and cfg.jitter_eps > 0) or self.noise_weight is not None:
            x_TD = x_TD.to(routing_dtype(x_TD.dtype))  # jitter and the noise product need it upcast
        if self.training and cfg.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits_TE = router_logits(x_TD, self.weight, self.bias)

        noise_std_TE = noisy_TE = None
        select_logits_TE = logits_TE
        if self.noise_weight is not None and self.training:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(x_TD.dtype))) + 1e-2
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
            select_logits_TE = noisy_TE
        if available_E is not None:
            select_logits_TE = select_logits_TE.masked_fill(~available_E, float("-inf"))
            if noisy_TE is not None:
                # Masked experts take no part in the smooth load estimate's thresholds.
                noisy_TE = select_logits_TE

        if self.score_func == "softmax":
            scores_TE = torch.softmax(select_logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(select_logits_TE)

        choice_TE = scores_TE if self.selection_bias is None else scores_TE + self.selection_bias
        if available_E is not None:
            choice_TE = choice_TE.masked_fill(~available_E, float("-inf"))
        if cfg.n_group > 1:
            keep_TE = group_limited_mask(choice_TE, cfg.n_group, cfg.topk_group, cfg.group_score)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        lse_T = None
        if self.score_func == "softmax" and choice_TE is scores_TE and select_logits_TE is logits_TE:
            lse_T = _softmax_logsumexp(logits_TE, scores_TE, topk_idx_TK[:, :1])
        return Routing(
            logits_TE=logits_TE,
            scores_TE=scores_TE,
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=self.gate_weights(scores_TE, topk_idx_TK),
            noise_std_TE=noise_std_TE,
            noisy_logits_TE=noisy_TE,
            score_func=self.score_func,
            logsumexp_T=lse_T,
        )


@torch.no_grad()
def _softmax_logsumexp(logits_TE: torch.Tensor, probs_TE: torch.Tensor, top_T1: torch.Tensor) -> torch.Tensor:
    """(T,) logsumexp of the logits from their softmax, without another pass over (T, E):
    log p_j = l_j - lse for every j, taken at each token's most probable expert j (p_j >= 1/E,
    so its log is well conditioned; error a few ulp of lse)."""
    return (logits_TE.gather(1, top_T1) - probs_TE.gather(1, top_T1).log()).squeeze(1)
