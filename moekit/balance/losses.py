"""Load-balancing losses, as pure functions of a layer's routing.

Shape legend: T tokens, E experts, K top-k, B sequences of S tokens (T = B*S).

* switch_aux_loss: Fedus et al. 2021 (Switch) / Lepikhin et al. 2020 (GShard):
  E * sum_i f_i * P_i, f_i the share of routing decisions that picked expert i (before capacity
  drops), P_i the mean full-distribution router probability of i (normalized_scores). The
  conventions (f from the layer's picks or from the plain top-1/top-k, per layer, per sequence
  or pooled, 1 or k at balance) are tabled in moekit.config.BalanceConfig.
* cv_squared_loss: Shazeer et al. 2017: CV(importance)^2 + CV(load)^2, CV^2 = var / mean^2,
  importance = sum over tokens of the sparse gates, load = the smooth estimator
  sum_t Phi((clean_ti - kth_excluding(noisy_t, k, i)) / noise_std_ti) when noise is on
  (training), else the counts of top-k picks. The paper does not say which variance: its
  authors' code (tensor2tensor's cv_squared) divides by E (population, the default here); the
  PyTorch port most projects copy calls ``x.var()``, which divides by E - 1 (``unbiased=True``).
* z_loss: Zoph et al. 2022 (ST-MoE): mean over tokens of logsumexp(logits)^2.
* sequence_aux_loss: DeepSeek-V3 (arXiv 2412.19437) complementary sequence-wise loss: per
  sequence, sum_i f_i * P_i with f_i = E/(K*S) * count_i, count_i over the top-K of the plain
  scores s (eq. 18: no selection bias, no group limit), and P_i the mean of the scores
  normalised per token to sum to 1; mean over the B sequences.

Padding: every function takes an optional ``valid_T`` (bool or 0/1, shape (T,)); tokens where it
is 0 count nowhere: means, counts, T and S become sums over the valid tokens only, as in
transformers' ``load_balancing_loss_func(..., attention_mask=...)``. A sequence with no valid
token is left out of the per-sequence means. Without ``valid_T`` no extra op runs.

Batches split over processes: every loss is a formula over per-expert counts, per-expert score
sums and token counts. Each per-layer loss takes an optional ``reduce`` (a ``Reduce``: the sum of
a tensor over every process's share of the batch, e.g. ``parallel.all_to_all.global_sum``), applied
to those sums before the formula, so the value is the loss of the whole batch on every process.
Without ``reduce`` no extra op runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..router.routing import Routing

# The sum of a tensor over every process's share of the batch (differentiable); None: one process.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def batch_total(x: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
    """x summed over the batch's shares (``reduce``), or x itself in one process."""
    return x if reduce is None else reduce(x)


def normalized_scores(routing: Routing) -> torch.Tensor:
    """Per-token probabilities over experts: softmax as is, sigmoid scores divided by their sum."""
    if routing.score_func == "sigmoid":
        return routing.scores_TE / (routing.scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return routing.scores_TE


def token_weights(valid_T: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """(T,) float weights (1 valid, 0 padding) in ``like``'s dtype and device, or None."""
    if valid_T is None:
        return None
    if valid_T.dim() != 1 or valid_T.shape[0] != like.shape[0]:
        raise ValueError(f"valid_T of shape {tuple(valid_T.shape)} does not match {like.shape[0]} tokens")
    return valid_T.to(device=like.device, dtype=like.dtype)


def token_mean(x_TX: torch.Tensor, w_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over the (valid) tokens of x (T, ...) -> (...); 0 when no token is valid."""
    if w_T is None:
        return x_TX.mean(dim=0)
    w = w_T.view(-1, *([1] * (x_TX.dim() - 1)))
    return (x_TX * w).sum(dim=0) / w_T.sum().clamp_min(1.0)


def num_valid(idx_TK: torch.Tensor, w_T: torch.Tensor | None) -> torch.Tensor | int:
    """T, or the number of valid tokens (a tensor: no host sync)."""
    return idx_TK.shape[0] if w_T is None else w_T.sum().clamp_min(1.0)


def batch_mean(x_TX: torch.Tensor, w_T: torch.Tensor | None, reduce: Reduce | None = None) -> torch.Tensor:
    """``token_mean`` over every share of the batch: with ``reduce`` the sum and the token count are
    reduced before dividing; without, exactly ``token_mean``."""
    if reduce is None:
        return token_mean(x_TX, w_T)
    if w_T is None:
        return reduce(x_TX.sum(dim=0)) / reduce(x_TX.new_tensor(float(x_TX.shape[0])))
    w = w_T.view(-1, *([1] * (x_TX.dim() - 1)))
    return reduce((x_TX * w).sum(dim=0)) / reduce(w_T.sum()).clamp_min(1.0)


def batch_num_valid(idx_TK: torch.Tensor, w_T: torch.Tensor | None, like: torch.Tensor,
                    reduce: Reduce | None = None) -> torch.Tensor | int:
    """``num_valid`` over every share of the batch (a tensor in ``like``'s dtype under ``reduce``)."""
    if reduce is None:
        return num_valid(idx_TK, w_T)
    n = like.new_tensor(float(idx_TK.shape[0])) if w_T is None else w_T.sum()
    return reduce(n).clamp_min(1.0)


def expert_counts(idx_TK: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32,
                  w_T: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) number of top-k picks of each expert (of valid tokens when weights ``w_T`` are given)."""
    # scatter_add_ rather than bincount: bincount on CUDA reads the ids' max back to the host (a sync).
    w_TK = (idx_TK.new_ones((), dtype=dtype) if w_T is None else w_T.to(dtype).unsqueeze(1)).expand(idx_TK.shape)
    return torch.zeros(num_experts, dtype=dtype, device=idx_TK.device).scatter_add_(0, idx_TK.reshape(-1),
                                                                                  w_TK.reshape(-1))


def plain_topk(routing: Routing, k: int) -> torch.Tensor:
    """(T, k) the top-k experts of the plain scores, without selection bias or group limit (masked
    experts score 0). Megatron-Core, transformers and the DeepSeek-V3 sequence loss count these."""
    return routing.scores_TE.detach().topk(k, dim=-1).indices


def switch_aux_loss(routing: Routing, num_experts: int, convention: str = "moekit",
                    valid_T: torch.Tensor | None = None, batch: int = 1,
                    reduce: Reduce | None = None) -> torch.Tensor:
    """Unweighted switch/GShard loss of one layer (1 at perfect balance, k for ``mixtral``).

    ``batch`` splits the T tokens into sequences, used by ``switch_group`` only; ``reduce``: see
    the module docstring."""
    if not routing.is_token_choice:
        raise ValueError("the switch aux loss needs a token-choice router (expert choice is balanced by design)")
    T, K = routing.topk_idx_TK.shape
    probs_TE = normalized_scores(routing)
    w_T = token_weights(valid_T, probs_TE)
    if convention == "switch_group":
        return _per_sequence(routing, probs_TE, plain_topk(routing, 1), num_experts, batch, w_T, 1, reduce)
    P_E = batch_mean(probs_TE, w_T, reduce)
    n = batch_num_valid(routing.topk_idx_TK, w_T, P_E, reduce)

    def counts(idx_TK: torch.Tensor) -> torch.Tensor:
        return batch_total(expert_counts(idx_TK, num_experts, P_E.dtype, w_T), reduce)

    if convention == "moekit":
        return num_experts * (counts(routing.topk_idx_TK) / (K * n) * P_E).sum()
    if convention == "switch":
        f_E = counts(plain_topk(routing, 1)) / n
        return num_experts * (f_E * P_E).sum()
    if convention == "megatron":
        # Megatron-Core writes this as E / (K * T^2) * sum_i (sum_t p_ti) * count_i.
        counts_E = counts(plain_topk(routing, K))
        return num_experts / (K * n * n) * ((P_E * n) * counts_E).sum()
    if convention == "mixtral":
        f_E = counts(plain_topk(routing, K)) / n
        return num_experts * (f_E * P_E).sum()
    raise ValueError(f"aux_loss_convention={convention!r} is not known")


@dataclass
class PooledSums:
    """One layer's share of a loss pooled over layers (the ``mixtral`` convention).

    counts_E   (E,) top-k picks of the plain scores per expert, over the valid tokens (no gradient).
    scores_E   (E,) sum over the valid tokens of the normalized scores (differentiable).
    tokens     number of valid tokens (an int, or a 0-dim tensor when a token mask was given).
    """

    counts_E: torch.Tensor
    scores_E: torch.Tensor
    tokens: torch.Tensor | int


def mixtral_sums(routing: Routing, num_experts: int, valid_T: torch.Tensor | None = None,
                 reduce: Reduce | None = None) -> PooledSums:
    """The per-expert sums ``pooled_mixtral_loss`` adds up over layers, for one token-choice routing;
    with ``reduce``, summed over every share of the batch (the token count becomes a tensor)."""
    probs_TE = normalized_scores(routing)
    w_T = token_weights(valid_T, probs_TE)
    idx_TK = plain_topk(routing, routing.topk_idx_TK.shape[1])
    counts_E = expert_counts(idx_TK, num_experts, probs_TE.dtype, w_T)
    if w_T is None:
        sums = PooledSums(counts_E, probs_TE.sum(dim=0), probs_TE.shape[0])
    else:
        sums = PooledSums(counts_E, (probs_TE * w_T.unsqueeze(1)).sum(dim=0), w_T.sum())
    if reduce is None:
        return sums
    tokens = sums.tokens if isinstance(sums.tokens, torch.Tensor) else probs_TE.new_tensor(float(sums.tokens))
    return PooledSums(reduce(sums.counts_E), reduce(sums.scores_E), reduce(tokens))


def pooled_mixtral_loss(sums: Sequence[PooledSums], num_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i with f and P taken over every layer's tokens at once (transformers'
    load_balancing_loss_func): f_i = sum counts_i / n, P_i = sum scores_i / n, n all valid tokens."""
    if not sums:
        raise ValueError("pooled_mixtral_loss needs the sums of at least one layer")
    counts_E = torch.stack([s.counts_E for s in sums]).sum(dim=0)
    scores_E = torch.stack([s.scores_E for s in sums]).sum(dim=0)
    n = sum(s.tokens for s in sums)
    n = n.clamp_min(1.0) if isinstance(n, torch.Tensor) else max(n, 1)
    return num_experts * (counts_E / n * (scores_E / n)).sum()


def pooled_mixtral_aux_loss(routings: list[Routing], num_experts: int,
                            valid_Ts: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """transformers' load_balancing_loss_func: every layer's tokens pooled before f and P.

    ``valid_Ts`` gives each routing's token mask (its ``attention_mask`` flattened), or None."""
    if valid_Ts is None:
        valid_Ts = [None] * len(routings)
    if len(valid_Ts) != len(routings):
        raise ValueError(f"got {len(valid_Ts)} token masks for {len(routings)} routings")
    return pooled_mixtral_loss([mixtral_sums(r, num_experts, v) for r, v in zip(routings, valid_Ts)], num_experts)


def z_loss(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None, reduce: Reduce | None = None) -> torch.Tensor:
    return batch_mean(torch.logsumexp(logits_TE, dim=-1).square(), token_weights(valid_T, logits_TE), reduce)


class _LogsumexpSquare(torch.autograd.Function):
    """lse_T^2 (T,) as a function of logits_TE, given lse_T and p_TE = softmax(logits_TE): the
    gradient 2 lse_t p_te in one pass, with no logsumexp forward or backward over (T, E)."""

    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, lse_T: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lse_T, probs_TE)
        return lse_T.square()

    @staticmethod
    def backward(ctx, grad_T: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        lse_T, probs_TE = ctx.saved_tensors
        return (grad_T * 2.0 * lse_T).unsqueeze(1) * probs_TE, None, None


def routing_z_loss(routing: Routing, valid_T: torch.Tensor | None = None, reduce: Reduce | None = None) -> torch.Tensor:
    """``z_loss(routing.logits_TE, ...)``, from the router's logsumexp where it has one."""
    lse_T = routing.logsumexp_T
    if lse_T is None:
        return z_loss(routing.logits_TE, valid_T, reduce)
    z_T = _LogsumexpSquare.apply(routing.logits_TE, lse_T, routing.scores_TE.detach())
    return batch_mean(z_T, token_weights(valid_T, routing.logits_TE), reduce)


def cv_squared(x_E: torch.Tensor, eps: float = 1e-10, unbiased: bool = False) -> torch.Tensor:
    """var(x) / mean(x)^2; var divides by E, or by E - 1 when ``unbiased`` (torch.var's default)."""
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    mean = x_E.mean()
    sq = (x_E - mean).square()
    var = sq.sum() / (x_E.numel() - 1) if unbiased else sq.mean()
    return var / (mean.square() + eps)


def importance(routing: Routing, num_experts: int, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) sum over (valid) tokens of the sparse gate values."""
    w_TK = routing.topk_weight_TK
    w_T = token_weights(valid_T, w_TK)
    if w_T is not None:
        w_TK = w_TK * w_T.unsqueeze(1)
    gates_TE = routing.logits_TE.new_zeros(routing.num_tokens, num_experts).scatter(1, routing.topk_idx_TK, w_TK)
    return gates_TE.sum(dim=0)


def smooth_load(routing: Routing, num_experts: int, top_k: int, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) Shazeer's differentiable load estimate, or plain counts when no noise was drawn.

    P(t, i) = Phi((clean_ti - kth_excluding(noisy_t, k, i)) / noise_std_ti), where the threshold is
    the k-th largest noisy logit of the other experts: the (k+1)-th if i is in the top-k, else the k-th.
    Masked experts (noisy logit -inf) have load 0; when only k experts are left, each of them is
    certain to be picked (threshold -inf, P = 1). Padding tokens (``valid_T`` 0) add nothing.
    """
    w_T = token_weights(valid_T, routing.logits_TE)
    if routing.noise_std_TE is None or routing.noisy_logits_TE is None or top_k >= num_experts:
        return expert_counts(routing.topk_idx_TK, num_experts, routing.logits_TE.dtype, w_T)
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
    if w_T is not None:
        prob_TE = prob_TE * w_T.unsqueeze(1)
    return prob_TE.sum(dim=0)


def cv_squared_loss(routing: Routing, num_experts: int, top_k: int, valid_T: torch.Tensor | None = None,
                    unbiased: bool = False, reduce: Reduce | None = None) -> torch.Tensor:
    importance_E = batch_total(importance(routing, num_experts, valid_T), reduce)
    load_E = batch_total(smooth_load(routing, num_experts, top_k, valid_T), reduce)
    return cv_squared(importance_E, unbiased=unbiased) + cv_squared(load_E, unbiased=unbiased)


def sequence_aux_loss(routing: Routing, num_experts: int, batch: int,
                      valid_T: torch.Tensor | None = None, reduce: Reduce | None = None) -> torch.Tensor:
    K = routing.topk_idx_TK.shape[1]
    probs_TE = normalized_scores(routing)
    return _per_sequence(routing, probs_TE, plain_topk(routing, K), num_experts, batch,
                         token_weights(valid_T, probs_TE), K, reduce)


def _per_sequence(routing: Routing, probs_TE: torch.Tensor, idx_TK: torch.Tensor, num_experts: int, batch: int,
                  w_T: torch.Tensor | None, k: int, reduce: Reduce | None = None) -> torch.Tensor:
    """Mean over sequences of E/k * sum_i (count_i / S) * P_i, counts of ``idx_TK`` and P over
    each sequence's (valid) tokens; sequences without a valid token are left out. Under ``reduce``
    the mean runs over every share's sequences."""
    T, K = idx_TK.shape
    if T % batch != 0:
        raise ValueError(f"{T} tokens do not split into {batch} sequences")
    S = T // batch
    E = num_experts
    probs_BSE = probs_TE.view(batch, S, E)
    hits_BSK = probs_BSE.new_ones(batch, S, K)
    if w_T is None:
        counts_BE = probs_BSE.new_zeros(batch, E).scatter_add_(1, idx_TK.view(batch, S * K), hits_BSK.view(batch, -1))
        per_seq_B = (counts_BE * (E / (k * S)) * probs_BSE.mean(dim=1)).sum(dim=-1)
        if reduce is None:
            return per_seq_B.mean()
        return reduce(per_seq_B.sum()) / reduce(per_seq_B.new_tensor(float(batch)))
    w_BS = w_T.view(batch, S)
    hits_BSK = hits_BSK * w_BS.unsqueeze(-1)
    counts_BE = probs_BSE.new_zeros(batch, E).scatter_add_(1, idx_TK.view(batch, S * K), hits_BSK.view(batch, -1))
    n_B = w_BS.sum(dim=1)
    P_BE = (probs_BSE * w_BS.unsqueeze(-1)).sum(dim=1) / n_B.clamp_min(1.0).unsqueeze(-1)
    per_seq_B = (counts_BE * P_BE).sum(dim=-1) * E / (k * n_B.clamp_min(1.0))
    has_B = (n_B > 0).to(per_seq_B.dtype)
    return batch_total((per_seq_B * has_B).sum(), reduce) / batch_total(has_B.sum(), reduce).clamp_min(1.0)


def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """(T,) entropy in nats of each token's routing distribution."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(dim=-1)


def perfect_balance_value(convention: str, top_k: int) -> float:
    return float(top_k) if convention == "mixtral" else 1.0


__all__ = ["switch_aux_loss", "pooled_mixtral_aux_loss", "plain_topk", "z_loss", "routing_z_loss", "cv_squared",
           "cv_squared_loss", "importance", "smooth_load", "sequence_aux_loss", "entropy", "normalized_scores",
           "perfect_balance_value", "token_weights", "token_mean", "expert_counts", "Reduce", "batch_total",
           "batch_mean", "batch_num_valid"]
