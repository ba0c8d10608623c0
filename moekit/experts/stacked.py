"""Experts stored as stacked weight tensors, run as grouped matrix products.

Shape legend: R rows grouped by expert, D model dim, F expert hidden, E experts.
Weights use the Hugging Face transformers v5 layout, so checkpoints map without copies:
  SwiGLUExperts.gate_up_proj (E, 2F, D): rows [0, F) are the gate, [F, 2F) the up projection.
  *.down_proj (E, D, F).
Every experts module has the same narrow interface: forward(x_RD, counts_E) -> y_RD, where the
rows of x are grouped by expert in order and counts_E[e] is the size of expert e's block.
``fused_weights(x_TD)`` hands ``moekit.dispatch.run`` the fused op's inputs (``moekit.ops.fused``),
or None where this module runs the plain composition; any experts module may define it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.fused import FUSED_ACTIVATIONS, FusedWeights
from ..ops.grouped import fused_schedule, grouped_matmul
from .activations import get_activation


class SwiGLUExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "silu",
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.backend, self.activation = backend, activation
        self.act = get_activation(activation)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(self.hidden))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        w1_EDF2 = self.gate_up_proj.to(x_RD.dtype).transpose(1, 2)
        h_RF2 = grouped_matmul(x_RD, w1_EDF2, counts_E, self.backend)
        gate_RF, up_RF = h_RF2.chunk(2, dim=-1)
        a_RF = self.act(gate_RF) * up_RF
        w2_EFD = self.down_proj.to(x_RD.dtype).transpose(1, 2)
        return grouped_matmul(a_RF, w2_EFD, counts_E, self.backend)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert on its own rows (reference path)."""
        gate_NF, up_NF = (x_ND @ self.gate_up_proj[e].t().to(x_ND.dtype)).chunk(2, dim=-1)
        return (self.act(gate_NF) * up_NF) @ self.down_proj[e].t().to(x_ND.dtype)

    def fused_weights(self, x_TD: torch.Tensor) -> FusedWeights | None:
        """The fused op's inputs for tokens like x_TD, or None (backend ``reference``, an activation
        without a fused form, or a subclass such as parametrize's, whose weights are not these)."""
        return _fused_weights(self, SwiGLUExperts, self.gate_up_proj, True, x_TD)


class MLPExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "gelu",
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.backend, self.activation = backend, activation
        self.act = get_activation(activation)
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up_proj, std=1.0 / math.sqrt(self.dim))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(self.hidden))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        h_RF = grouped_matmul(x_RD, self.up_proj.to(x_RD.dtype).transpose(1, 2), counts_E, self.backend)
        return grouped_matmul(self.act(h_RF), self.down_proj.to(x_RD.dtype).transpose(1, 2), counts_E,
                              self.backend)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        return self.act(x_ND @ self.up_proj[e].t().to(x_ND.dtype)) @ self.down_proj[e].t().to(x_ND.dtype)

    def fused_weights(self, x_TD: torch.Tensor) -> FusedWeights | None:
        """The fused op's inputs for tokens like x_TD, or None (see ``SwiGLUExperts.fused_weights``)."""
        return _fused_weights(self, MLPExperts, self.up_proj, False, x_TD)


def _fused_weights(experts: SwiGLUExperts | MLPExperts, cls: type, w1_EUD: torch.Tensor, gated: bool,
                   x_TD: torch.Tensor) -> FusedWeights | None:
    if type(experts) is not cls or experts.activation not in FUSED_ACTIVATIONS:
        return None
    widths = (x_TD.shape[-1], w1_EUD.shape[1], experts.down_proj.shape[-1])
    schedule = fused_schedule(experts.backend, x_TD, widths)
    if schedule is None:
        return None
    return FusedWeights(w1_EUD, experts.down_proj, experts.activation, gated, schedule)
