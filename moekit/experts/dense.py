"""Dense feed-forward blocks: the unit an expert computes, and the shared expert.

SwiGLU follows Shazeer 2020 ("GLU Variants Improve Transformer"): down(act(gate(x)) * up(x)).
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import get_activation


class GatedMLP(nn.Module):
    """(..., D) -> (..., D) with down(act(gate(x)) * up(x)); parameter names follow HF."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """(..., D) -> (..., D) with down(act(up(x)))."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class SharedExperts(nn.Module):
    """Experts every token uses, fused into one gated MLP; optionally scaled by
    sigmoid(x @ gate) per token (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, dim: int, hidden: int, activation: str, gated: bool) -> None:
        super().__init__()
        self.mlp = GatedMLP(dim, hidden, activation)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.mlp(x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD
