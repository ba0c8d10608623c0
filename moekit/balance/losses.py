"""Load-balancing losses, as pure functions of a layer's routing.

Shape legend: T tokens, E experts, K top-k, B sequences of S tokens (T = B*S).

* switch_aux_loss: Fedus et al. 2021 (Switch) / Lepikhin et al. 2020 (GShard):
  E * sum_i f_i * P_i, f_i the share of routing decisions that picked expert i (before capacity
  drops), P_i the mean full-distribution router probability of i (normalized_scores). The
  conventions (f from the layer's picks or from the plain top-1/top-k, per layer or pooled,
  1 or k at balance) are tabled in moekit.config.BalanceConfig.
* cv_squared_loss: Shazeer et al. 2017: CV(importance)^2 + CV(load)^2, CV^2 = var / mean^2
  (population variance), importance = sum over tokens of the sparse gates, load = the smooth
  estimator sum_t Phi((clean_ti - kth_excluding(noisy_t, k, i)) / noise_std_ti) when noise is
  on (training), else the counts of top-k picks.
* z_loss: Zoph et al. 2022 (ST-MoE): mean over tokens of logsumexp(logits)^2.
* sequence_aux_loss: DeepSeek-V3 (arXiv 2412.19437) complementary sequence-wise loss: per
  sequence, sum_i f_i * P_i with f_i = E/(K*S) * count_i, count_i over the top-K of the plain
  scores s (eq. 18: no selection bias, no group limit), and P_i the mean of the scores
  normalised per token to sum to 1; mean over the B sequences.
"""

from __future__ import annotations


import torch

from ..router.routing import Routing


def normalized_scores(routing: Routing) -> torch.Tensor:
    """Per-token probabilities over experts: softmax as is, sigmoid scores divided by their sum."""
    if routing.score_func == "sigmoid":
        return routing.scores_TE / (routing.scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return routing.scores_TE


def expert_counts(idx_TK: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(E,) number of top-k picks of each expert."""
    return torch.bincount(idx_TK.reshape(-1), minlength=num_experts).to(dtype)


def plain_topk(routing: Routing, k: int) -> torch.Tensor:
    """(T, k) the top-k experts of the plain scores, without selection bias or group limit (masked
    experts score 0). Megatron-Core, transformers and the DeepSeek-V3 sequence loss count these."""
    return routing.scores_TE.detach().topk(k, dim=-1).indices


def switch_aux_loss(routing: Routing, num_experts: int, convention: str = "moekit") -> torch.Tensor:
    """Unweighted switch/GShard loss of one layer (1 at perfect balance, k for ``mixtral``)."""
    if not routing.is_token_choice:
        raise ValueError("the switch aux loss needs a token-choice router (expert choice is balanced by design)")
    T, K = routing.topk_idx_TK.shape
    P_E = normalized_scores(routing).mean(dim=0)
    if convention == "moekit":
        counts_E = expert_counts(routing.topk_idx_TK, num_experts, P_E.dtype)
        return num_experts * (counts_E / (K * T) * P_E).sum()
    if convention == "switch":
        f_E = expert_counts(plain_topk(routing, 1), num_experts, P_E.dtype) / T
        return num_experts * (f_E * P_E).sum()
    if convention == "megatron":
        # Megatron-Core writes this as E / (K * T^2) * sum_i (sum_t p_ti) * count_i.
        counts_E = expert_counts(plain_topk(routing, K), num_experts, P_E.dtype)
        return num_experts / (K * T * T) * ((P_E * T) * counts_E).sum()
    if convention == "mixtral":
        f_E = expert_counts(plain_topk(routing, K), num_experts, P_E.dtype) / T
        return num_experts * (f_E * P_E).sum()
    raise ValueError(f"aux_loss_convention={convention!r} is not known")


def pooled_mixtral_aux_loss(routings: list[Routing], num_experts: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func: every layer's tokens pooled before f and P."""
    idx = torch.cat([plain_topk(r, r.topk_idx_TK.shape[1]) for r in routings], dim=0)
    probs = torch.cat([normalized_scores(r) for r in routings], dim=0)
    f_E = expert_counts(idx, num_experts, probs.dtype) / idx.shape[0]
    return num_experts * (f_E * probs.mean(dim=0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    mean = x_E.mean()
    return ((x_E - mean).square().mean()) / (mean.square() + eps)


def importance(routing: Routing, num_experts: int) -> torch.Tensor:
    """(E,) sum over tokens of the sparse gate values."""
    gates_TE = routing.logits_TE.new_zeros(routing.num_tokens, num_experts).scatter(1, routing.topk_idx_TK, routing.topk_weight_TK)
    return gates_TE.sum(dim=0)


def smooth_load(routing: Routing, num_experts: int, top_k: int) -> torch.Tensor:
    """(E,) Shazeer's differentiable load estimate, or plain counts when no noise was drawn.

    P(t, i) = Phi((clean_ti - kth_excluding(noisy_t, k, i)) / noise_std_ti), where the threshold is
    the k-th largest noisy logit of the other experts: the (k+1)-th if i is in the top-k, else the k-th.
    Masked experts (noisy logit -inf) have load 0; when only k experts are left, each of them is
    certain to be picked (threshold -inf, P = 1).
    """
    if routing.noise_std_TE is None or routing.noisy_logits_TE is None or top_k >= num_experts:
        return expert_counts(routing.topk_idx_TK, num_experts, routing.logits_TE.dtype)
    noisy_TE, clean_TE, std_TE = routing.noisy_logits_TE, routing.logits_TE, routing.noise_std_TE
    top_TK1 = noisy_TE.topk(top_k + 1, dim=-1).values
    kth_in_T1 = top_TK1[:, top_k:top_k + 1]
    kth_out_T1 = top_TK1[:, top_k - 1:top_k]
    is_in_TE = noisy_TE > kth_in_T1
    threshold_TE = torch.where(is_in_TE, kth_in_T1, kth_out_T1)
    # An infinite threshold would give inf/std in the forward and 0*inf = NaN in the backward.
    finite_TE = torch.isfinite(threshold_TE)
    z_TE = (clean_TE - threshold_TE.masked_fill(~finite_TE, 0.0)) / std_TE
    z_TE = z_TE.masked_fill(~finite_TE, float("inf"))
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_TE = normal.cdf(z_TE).masked_fill(noisy_TE == float("-inf"), 0.0)
    return prob_TE.sum(dim=0)


def cv_squared_loss(routing: Routing, num_experts: int, top_k: int) -> torch.Tensor:
    return cv_squared(importance(routing, num_experts)) + cv_squared(smooth_load(routing, num_experts, top_k))


def sequence_aux_loss(routing: Routing, num_experts: int, batch: int) -> torch.Tensor:
    T, K = routing.topk_idx_TK.shape
    idx_TK = plain_topk(routing, K)
    if T % batch != 0:
        raise ValueError(f"{T} tokens do not split into {batch} sequences")
    S = T // batch
    probs_BSE = normalized_scores(routing).view(batch, S, num_experts)
    onehot_BSE = probs_BSE.new_zeros(batch, S, num_experts)
    onehot_BSE.scatter_add_(2, idx_TK.view(batch, S, K), probs_BSE.new_ones(batch, S, K))
    f_BE = onehot_BSE.sum(dim=1) * (num_experts / (K * S))
    P_BE = probs_BSE.mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """(T,) entropy in nats of each token's routing distribution."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1)


def perfect_balance_value(convention: str, top_k: int) -> float:
    return float(top_k) if convention == "mixtral" else 1.0


__all__ = ["switch_aux_loss", "pooled_mixtral_aux_loss", "plain_topk", "z_loss", "cv_squared", "cv_squared_loss",
           "importance", "smooth_load", "sequence_aux_loss", "entropy", "normalized_scores",
           "perfect_balance_value"]
