"""Benchmark: ``moekit.ops.gather_rows`` and ``token_sum`` (the slot-order gather sum) against the
reference's row-by-row gather and accumulate-put (``moekit.ops.reference``), a demo training batch
(T=2048 tokens, top-4 of 16 experts, dim 128).

    python benchmarks/ops_permute.py    # a few seconds; prints a table, writes results/ops_permute.json
"""

from __future__ import annotations

import torch
from opsbench import run

from moekit.ops import gather_rows, token_sum
from moekit.ops import reference as ref


def cases() -> list:
    gen = torch.Generator().manual_seed(0)
    T, K, E, D = 2048, 4, 16, 128
    idx_S = torch.randint(0, E, (T * K,), generator=gen)
    order_R = torch.argsort(idx_S, stable=True)
    token_idx_R = order_R // K
    inverse_S = torch.empty_like(order_R)
    inverse_S[order_R] = torch.arange(T * K)
    x_TD = torch.randn(T, D, generator=gen)
    v_RD = torch.randn(T * K, D, generator=gen)
    return [
        (f"gather_rows T={T} K={K} D={D}", lambda: gather_rows(x_TD, token_idx_R),
         lambda: ref.gather_rows(x_TD, token_idx_R)),
        (f"token_sum (slot gather) T={T} K={K} D={D}", lambda: token_sum(v_RD, inverse_S, token_idx_R, T, torch.float32),
         lambda: ref.token_sum(v_RD, token_idx_R, T, torch.float32)),
        (f"token_sum (index_add_) T={T} K={K} D={D}", lambda: token_sum(v_RD, None, token_idx_R, T, torch.float32),
         lambda: ref.token_sum(v_RD, token_idx_R, T, torch.float32)),
    ]


if __name__ == "__main__":
    run("permute", cases(), doc=__doc__)
