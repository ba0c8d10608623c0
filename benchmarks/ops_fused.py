"""Benchmark: the fused experts op (``moekit::fused_experts``, schedules loop / grouped / auto) and its
decode gather path against the reference composition (``moekit.ops.reference.fused_experts``: row
gather, per-row batched products, accumulate-put), forward only, at the demo's expert shapes
(16 SwiGLU experts, dim 128, hidden 128, top-4) for a training batch and a decode step.

    python benchmarks/ops_fused.py      # a few seconds; prints a table, writes results/ops_fused.json
"""

from __future__ import annotations

import torch
from opsbench import run

from moekit.ops import fused_experts, gather_experts
from moekit.ops import reference as ref


def _routing(T: int, K: int, E: int, gen: torch.Generator):
    idx_TK = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    weight_TK = torch.rand(T, K, generator=gen)
    order_R = torch.argsort(idx_TK.reshape(-1), stable=True)
    inverse_S = torch.empty_like(order_R)
    inverse_S[order_R] = torch.arange(T * K)
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
    return idx_TK, weight_TK, order_R // K, weight_TK.reshape(-1)[order_R], counts_E, inverse_S


def cases() -> list:
    gen = torch.Generator().manual_seed(0)
    E, K, D, F = 16, 4, 128, 128
    w1 = torch.randn(E, 2 * F, D, generator=gen) / D**0.5
    w2 = torch.randn(E, D, F, generator=gen) / F**0.5
    out = []
    T = 512
    x_TD = torch.randn(T, D, generator=gen)
    idx_TK, weight_TK, tok_R, w_R, counts_E, inverse_S = _routing(T, K, E, gen)
    for schedule in ("loop", "grouped", "auto"):
        out.append((f"fused {schedule} T={T} E={E} K={K} D={D} F={F}",
                    lambda s=schedule: fused_experts(x_TD, w1, w2, w_R, tok_R, counts_E, "silu", True, s, inverse_S),
                    lambda: ref.fused_experts(x_TD, w1, w2, w_R, tok_R, counts_E, "silu", True)))
    x1 = x_TD[:1]
    idx1, wt1 = idx_TK[:1], weight_TK[:1]
    out.append((f"gather (decode) T=1 E={E} K={K} D={D} F={F}",
                lambda: gather_experts(x1, w1, w2, idx1, wt1, "silu", True),
                lambda: ref.gather_experts(x1, w1, w2, idx1, wt1, "silu", True)))
    return out


if __name__ == "__main__":
    run("fused", cases(), doc=__doc__)
