"""What a router hands to dispatch.

Shape legend: T tokens, D model dim, E experts, K top-k, C tokens per expert (expert choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in float32 at least (float64 stays float64, for reference checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
