"""Gather and scatter of expert rows: the pure tensor steps around the expert products.

Shape letters (docs/architecture.md): T tokens, D model dim, K slots per token, S = T*K slots,
R rows grouped by expert (R <= S).

``gather_rows``  x_RD = x_TD[token_idx_R]: each row is a copy of its source token.
``token_sum``    the inverse: (R, D) -> (T, D), the sum of each token's rows in an accumulation
                 dtype. With inverse_S (slot t*K + j -> its row, R for a dropped slot) the rows are
                 gathered back in slot order and summed over K: deterministic, no atomics. Without
                 it (expert choice: a token has any number of rows) rows are added with ``index_add_``.
The plan-aware wrappers are ``moekit.dispatch.permute`` / ``combine``; the fused ops
(``moekit.ops.fused``, ``moekit.ops.int8``) call ``token_sum`` for their combine and input gradient.
References and a benchmark: ``moekit.ops.reference``, ``benchmarks/ops_permute.py``.
"""

from __future__ import annotations

import torch

from .kernels import l2_cache_bytes


# token_sum's smallest CPU block (below it, per-op dispatch outweighs the cache locality gained:
# 128-token blocks ran 1.3-3x slower than 256-1024 at D 128 to 1024).
BLOCK_MIN_TOKENS = 256


def gather_rows(x_TD: torch.Tensor, token_idx_R: torch.Tensor) -> torch.Tensor:
    """(T, D) tokens -> (R, D) rows, row r a copy of token token_idx_R[r]."""
    return x_TD.index_select(0, token_idx_R)


def token_sum(v_RD: torch.Tensor, inverse_S: torch.Tensor | None, token_idx_R: torch.Tensor, T: int,
              acc: torch.dtype, weight_R: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over each token's rows, weighted by weight_R (R,) if given: (R, D) -> (T, D) in ``acc``.
    inverse_S (S,) long with S a multiple of T, or None to add rows at token_idx_R.

    The slot-order sum runs over the K slots: each step gathers one slot's (T, D) rows in v's own
    dtype and adds them (times their weights) into the ``acc`` accumulator, so a half-precision
    v_RD is never copied whole into ``acc`` nor gathered whole into (T, K, D)."""
    R, D = v_RD.shape
    if inverse_S is None:
        v_RD = v_RD.to(acc) if weight_R is None else v_RD.to(acc) * weight_R.to(acc).unsqueeze(-1)
        return torch.zeros(T, D, dtype=acc, device=v_RD.device).index_add_(0, token_idx_R, v_RD)
    if inverse_S.shape[0] != R:  # dropped slots point at an appended zero row (weight 0)
        v_RD = torch.cat((v_RD, v_RD.new_zeros(1, D)))
        if weight_R is not None:
            weight_R = torch.cat((weight_R, weight_R.new_zeros(1)))
    if T == 0:  # no tokens: nothing to sum (and no K to read off the (0,) slot map)
        return torch.zeros(0, D, dtype=acc, device=v_RD.device)
    idx_TK = inverse_S.view(T, -1)
    w_TK = None if weight_R is None else weight_R.to(acc)[inverse_S].view(T, -1)
    if idx_TK.shape[1] == 0:
        return torch.zeros(T, D, dtype=acc, device=v_RD.device)
    out_TD = torch.empty(T, D, dtype=acc, device=v_RD.device)
    # On the CPU, a block of tokens at a time whose accumulator fills half of one core's L2 cache
    # (the other half holds the slot's gathered rows): the K slot passes then reread a cached block
    # (and a half-precision slot's cast copy stays in cache) instead of streaming the whole (T, D)
    # accumulator K times. At least BLOCK_MIN_TOKENS per block, so each op's work outweighs its
    # dispatch. 2 threads, L2 1 MiB: T 4096, K 8, D 1024: 64 -> 14 ms (float32), 43 -> 14 ms from
    # bf16 rows (the demo's D 128 LM step: no change measured).
    block = T
    if v_RD.device.type == "cpu" and not torch.compiler.is_compiling():
        block = max(BLOCK_MIN_TOKENS, l2_cache_bytes() // (2 * D * torch.finfo(acc).bits // 8))
    for start in range(0, T, block):
        idx_BK, out_BD = idx_TK[start:start + block], out_TD[start:start + block]
        w_BK = None if w_TK is None else w_TK[start:start + block]
        for k in range(idx_BK.shape[1]):
            rows_BD = v_RD.index_select(0, idx_BK[:, k])
            if k == 0:
                out_BD.copy_(rows_BD if w_BK is None else rows_BD * w_BK[:, :1])
            elif w_BK is None:
                out_BD.add_(rows_BD)
            else:
                out_BD.addcmul_(rows_BD, w_BK[:, k:k + 1])
    return out_TD
