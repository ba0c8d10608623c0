"""Plain-PyTorch references for every op in ``moekit.ops``: the same results from the obvious
formula, one row at a time where that is clearest, with autograd for gradients. Tests compare the
ops with these (in float64 where the op allows) and ``benchmarks/ops_*.py`` time each op against
its reference in one process.

Shape letters (docs/architecture.md): T tokens, D model dim, E experts, F expert hidden, U first-
product width (2F gated, F plain), K slots per token, S = T*K slots, R rows grouped by expert,
I and O a product's input and output widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "relu": F.relu}


def row_experts(counts_E: torch.Tensor) -> torch.Tensor:
    """(R,) the expert of each row: rows come in blocks of counts_E[e] rows of expert e."""
    return torch.repeat_interleave(torch.arange(counts_E.shape[0], device=counts_E.device), counts_E)


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y_RO[r] = x_RI[r] @ w_EIO[expert of r], as a sum over experts of dense products of the rows
    masked to that expert (no blocks, no splits; E times the FLOPs, no per-row weight copies)."""
    e_R = row_experts(counts_E)
    y_RO = x_RI.new_zeros(x_RI.shape[0], w_EIO.shape[-1])
    for e in range(w_EIO.shape[0]):
        y_RO = y_RO + (x_RI * (e_R == e).unsqueeze(-1).to(x_RI.dtype)) @ w_EIO[e]
    return y_RO


def gather_rows(x_TD: torch.Tensor, token_idx_R: torch.Tensor) -> torch.Tensor:
    """(R, D): row r is token token_idx_R[r]."""
    return torch.stack([x_TD[int(t)] for t in token_idx_R]) if len(token_idx_R) else x_TD[:0]


def token_sum(v_RD: torch.Tensor, token_idx_R: torch.Tensor, T: int, acc: torch.dtype) -> torch.Tensor:
    """(T, D) in acc: each token's rows added up (the slot order does not change the sum's terms)."""
    out_TD = torch.zeros(T, v_RD.shape[-1], dtype=acc, device=v_RD.device)
    return out_TD.index_put((token_idx_R,), v_RD.to(acc), accumulate=True)


def experts_rows(x_RD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, counts_E: torch.Tensor,
                 act_name: str, gated: bool) -> torch.Tensor:
    """(R, D) each row through its expert: down(act(gate x) * up x), or down(act(up x)) ungated."""
    h_RU = grouped_matmul(x_RD, w1_EUD.transpose(1, 2), counts_E)
    act = ACTIVATIONS[act_name]
    if gated:
        gate_RF, up_RF = h_RU.chunk(2, dim=-1)
        a_RF = act(gate_RF) * up_RF
    else:
        a_RF = act(h_RU)
    return grouped_matmul(a_RF, w2_EDF.transpose(1, 2), counts_E)


def fused_experts(x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, weight_R: torch.Tensor,
                  token_idx_R: torch.Tensor, counts_E: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """What ``moekit.ops.fused.fused_experts`` computes: (T, D), out_t = sum over t's rows of
    weight_r * expert(x_t), summed in float32 (float64 for float64 inputs), in x's dtype."""
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    y_RD = experts_rows(gather_rows(x_TD, token_idx_R), w1_EUD.to(x_TD.dtype), w2_EDF.to(x_TD.dtype), counts_E,
                        act_name, gated)
    weighted_RD = y_RD.to(acc) * weight_R.to(acc).unsqueeze(-1)
    return token_sum(weighted_RD, token_idx_R, x_TD.shape[0], acc).to(x_TD.dtype)


def gather_experts(x_TD: torch.Tensor, w1_EUD: torch.Tensor, w2_EDF: torch.Tensor, idx_TK: torch.Tensor,
                   weight_TK: torch.Tensor, act_name: str, gated: bool) -> torch.Tensor:
    """What ``moekit.ops.fused.gather_experts`` computes: every (token, choice) slot as a row of its
    expert, rows sorted by expert, then the same sum as ``fused_experts``."""
    T, K = idx_TK.shape
    order_S = torch.argsort(idx_TK.reshape(-1), stable=True)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=w1_EUD.shape[0])
    return fused_experts(x_TD, w1_EUD, w2_EDF, weight_TK.reshape(-1)[order_S], order_S // K, counts_E, act_name,
                         gated)


def quantize_per_channel(w_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 q and float32 scale (E, O), in float32 (float64 for float64): s = max_i |w_eoi| / 127
    (1 where the row is zero), q = round(w / s)."""
    w = w_EOI.detach().to(torch.float64 if w_EOI.dtype == torch.float64 else torch.float32)
    s_EO = w.abs().amax(-1) / 127
    s_EO = torch.where(s_EO > 0, s_EO, torch.ones_like(s_EO))
    q_EOI = torch.round(w / s_EO.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q_EOI, s_EO.float()


def int8_experts(x_TD: torch.Tensor, q1_EUD: torch.Tensor, s1_EU: torch.Tensor, q2_EDF: torch.Tensor,
                 s2_ED: torch.Tensor, weight_R: torch.Tensor, token_idx_R: torch.Tensor, counts_E: torch.Tensor,
                 act_name: str, gated: bool) -> torch.Tensor:
    """What ``moekit.ops.int8.int8_experts`` computes: ``fused_experts`` with weights s * q."""
    w1 = q1_EUD.to(torch.float64) * s1_EU.to(torch.float64).unsqueeze(-1)
    w2 = q2_EDF.to(torch.float64) * s2_ED.to(torch.float64).unsqueeze(-1)
    return fused_experts(x_TD, w1.to(x_TD.dtype), w2.to(x_TD.dtype), weight_R, token_idx_R, counts_E, act_name,
                         gated)


def all_finite(x: torch.Tensor) -> bool:
    """No entry of x is NaN or +-Inf, entry by entry."""
    return bool(torch.isfinite(x).all())
