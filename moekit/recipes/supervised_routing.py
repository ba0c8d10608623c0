"""Supervised routing: train the router to send each document label to chosen experts.

An auxiliary cross-entropy between every MoE layer's router logits and a target expert derived
from the token's document label (label i -> expert i mod E unless a map is given), weighted by a
coefficient and added to the language-model loss. This is the explicit-assignment end of
domain routing (DEMix, Gururangan et al. 2022, routes by domain outright; here the router is
only nudged, so it can still share experts across labels). Routing purity measures the effect.

Shape legend: B batch, S sequence, T = B*S tokens, E experts, N labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..lm.model import LM
from ..train.trainer import Batch
from .common import moe_blocks


class LabelRoutingLoss:
    """``coef`` * mean over MoE layers of CE(router logits, expert of the token's label).

    Use as ``trainer.add_loss("route", LabelRoutingLoss(model, coef))``; it captures the router
    logits of the forward pass with hooks (``close()`` removes them). ``label_to_expert[i]`` is
    label i's target expert (default i mod E).
    """

    def __init__(self, model: LM, coef: float, label_to_expert: Sequence[int] | None = None) -> None:
        if not coef >= 0:
            raise ValueError(f"coef={coef} must be >= 0")
        self.coef = coef
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no MoE layers to supervise")
        self.num_experts = self.blocks[0][1].num_experts
        self.label_to_expert = None if label_to_expert is None else torch.tensor(list(label_to_expert))
        if self.label_to_expert is not None:
            bad = [int(e) for e in self.label_to_expert if not 0 <= int(e) < self.num_experts]
            if bad:
                raise ValueError(f"label_to_expert has expert ids {bad} outside [0, {self.num_experts})")
        self._logits: dict[int, torch.Tensor] = {}
        self._handles = [layer.router.register_forward_hook(self._capture(i)) for i, layer in self.blocks]

    def _capture(self, i: int):
        def hook(module, args, output) -> None:
            self._logits[i] = output.logits_TE
        return hook

    def targets(self, labels_BS: torch.Tensor) -> torch.Tensor:
        """(T,) target expert of each token."""
        labels_T = labels_BS.reshape(-1)
        if self.label_to_expert is None:
            return labels_T % self.num_experts
        if int(labels_T.max()) >= len(self.label_to_expert):
            raise ValueError(f"label id {int(labels_T.max())} has no entry in label_to_expert "
                             f"(length {len(self.label_to_expert)})")
        return self.label_to_expert.to(labels_T.device)[labels_T]

    def __call__(self, model: LM, batch: Batch, logits_BSV: torch.Tensor) -> torch.Tensor:
        # batch.labels label each target; the router sees the input token, which belongs to the same
        # document except at a document's first token.
        target_T = self.targets(batch.labels)
        losses = [F.cross_entropy(self._logits[i].float(), target_T) for i, _ in self.blocks]
        return self.coef * torch.stack(losses).mean()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def routing_purity(counts_NE: list[list[float]] | torch.Tensor) -> dict[str, float]:
    """From top-k pick counts (labels N, experts E):

    purity: sum over experts of the count of its majority label / all picks (1 when every
    expert serves one label; the largest label's share when routing ignores labels).
    label_concentration: mean over labels (weighted by picks) of the share of its picks going to
    its single most-used expert.
    """
    c_NE = torch.as_tensor(counts_NE, dtype=torch.float64)
    total = float(c_NE.sum())
    if total == 0:
        return {"purity": 0.0, "label_concentration": 0.0}
    return {"purity": float(c_NE.max(dim=0).values.sum()) / total,
            "label_concentration": float(c_NE.max(dim=1).values.sum()) / total}
