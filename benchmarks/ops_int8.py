"""Benchmark: the int8 expert ops (``moekit::int8_experts``, ``moekit::int8_gather_experts``) against
the reference (``moekit.ops.reference.int8_experts``: dequantise every expert, then the reference
composition), at the demo's expert shapes (16 SwiGLU experts, dim 128, hidden 128, top-4), a prefill
batch in float32 and a decode step in float32 and bfloat16.

    python benchmarks/ops_int8.py       # a few seconds; prints a table, writes results/ops_int8.json
"""

from __future__ import annotations

import torch
from ops_fused import _routing
from opsbench import run

from moekit.ops import int8_experts, int8_gather_experts, quantize_per_channel
from moekit.ops import reference as ref


def cases() -> list:
    gen = torch.Generator().manual_seed(0)
    E, K, D, F = 16, 4, 128, 128
    q1, s1 = quantize_per_channel(torch.randn(E, 2 * F, D, generator=gen) / D**0.5)
    q2, s2 = quantize_per_channel(torch.randn(E, D, F, generator=gen) / F**0.5)
    out = []
    T = 512
    x_TD = torch.randn(T, D, generator=gen)
    idx_TK, weight_TK, tok_R, w_R, counts_E, inverse_S = _routing(T, K, E, gen)
    out.append((f"int8_experts T={T} E={E} K={K} D={D} F={F} float32",
                lambda: int8_experts(x_TD, q1, s1, q2, s2, w_R, tok_R, counts_E, "silu", True, inverse_S),
                lambda: ref.int8_experts(x_TD, q1, s1, q2, s2, w_R, tok_R, counts_E, "silu", True)))
    for dtype in (torch.float32, torch.bfloat16):
        x1 = x_TD[:1].to(dtype)
        idx1, wt1 = idx_TK[:1], weight_TK[:1]
        tok1, order1 = torch.sort(idx1.reshape(-1), stable=True)
        counts1 = torch.bincount(idx1.reshape(-1), minlength=E)
        out.append((f"int8_gather (decode) T=1 {str(dtype)[6:]}",
                    lambda x1=x1, idx1=idx1, wt1=wt1: int8_gather_experts(x1, q1, s1, q2, s2, idx1, wt1, "silu", True),
                    lambda x1=x1, o=order1, c=counts1, wt1=wt1: ref.int8_experts(
                        x1, q1, s1, q2, s2, wt1.reshape(-1)[o], o // K, c, "silu", True)))
    return out


if __name__ == "__main__":
    run("int8", cases(), doc=__doc__)
