"""Experts given as arbitrary nn.Modules (any small network mapping (N, D) -> (N, D))."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ModuleExperts(nn.Module):
    """forward(x_RD, counts_E) -> y_RD: expert e runs on its contiguous block of rows."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("ModuleExperts needs at least one expert module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(x_RD, counts_E.tolist(), dim=0)
        outs = []
        for e, block in enumerate(blocks):
            if block.shape[0] == 0:
                continue
            y = self.experts[e](block)
            if y.shape != block.shape:
                raise ValueError(f"expert {e} ({type(self.experts[e]).__name__}) mapped rows of shape "
                                 f"{tuple(block.shape)} to {tuple(y.shape)}; experts must keep the shape (N, D)")
            outs.append(y)
        if not outs:
            return torch.zeros_like(x_RD)
        return torch.cat(outs, dim=0)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return self.experts[e](x_ND)
