"""Differentiable all-to-all with variable split sizes, on ``torch.distributed.all_to_all_single``.

Shape legend: R rows this rank sends (grouped by destination rank), Q rows it receives, D dim,
P ranks in the group.

The forward sends ``send_splits[p]`` rows to rank p and receives ``recv_splits[p]`` rows from it;
the backward is the reverse exchange of the gradients (split sizes swapped). The split sizes
are exchanged first, by ``exchange_counts`` (an all-to-all of the per-rank counts).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import guarded


def exchange_counts(send_counts_PX: torch.Tensor, group: dist.ProcessGroup | None, timeout_s: float | None = None,
                    ) -> torch.Tensor:
    """(P, X) long counts for each destination rank -> (P, X) counts from each source rank."""
    recv_PX = torch.empty_like(send_counts_PX)
    guarded("all_to_all_single(counts)",
            lambda: dist.all_to_all_single(recv_PX, send_counts_PX.contiguous(), group=group), timeout_s)
    return recv_PX


def _exchange(x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None,
              op: str, timeout_s: float | None) -> torch.Tensor:
    out_QD = x_RD.new_empty((sum(recv_splits), *x_RD.shape[1:]))
    guarded(op, lambda: dist.all_to_all_single(out_QD, x_RD.contiguous(), output_split_sizes=recv_splits,
                                               input_split_sizes=send_splits, group=group), timeout_s)
    return out_QD


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                group: dist.ProcessGroup | None, name: str, timeout_s: float | None) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group, ctx.name, ctx.timeout_s = (send_splits, recv_splits, group,
                                                                                name, timeout_s)
        return _exchange(x_RD, send_splits, recv_splits, group, f"all_to_all_single({name})", timeout_s)

    @staticmethod
    def backward(ctx: Any, grad_QD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_RD = _exchange(grad_QD, ctx.recv_splits, ctx.send_splits, ctx.group,
                            f"all_to_all_single({ctx.name} backward)", ctx.timeout_s)
        return grad_RD, None, None, None, None, None


def all_to_all(x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup | None, name: str = "tokens", timeout_s: float | None = None) -> torch.Tensor:
    """Differentiable variable-size all-to-all of rows: (R, ...) -> (Q, ...)."""
    if len(send_splits) != len(recv_splits):
        raise ValueError(f"send_splits has {len(send_splits)} entries, recv_splits {len(recv_splits)}")
    if sum(send_splits) != x_RD.shape[0]:
        raise ValueError(f"send_splits {send_splits} sum to {sum(send_splits)} but the input has {x_RD.shape[0]} rows")
    return _AllToAll.apply(x_RD, send_splits, recv_splits, group, name, timeout_s)


class _GlobalSum(torch.autograd.Function):
    """Value: the sum over ranks. Gradient: the local input's gradient times the group size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None, timeout_s: float | None) -> torch.Tensor:
        ctx.size = dist.get_world_size(group)
        out = x.detach().clone()
        guarded("all_reduce(global sum)", lambda: dist.all_reduce(out, group=group), timeout_s)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad * ctx.size, None, None


def global_sum(x: torch.Tensor, group: dist.ProcessGroup | None, timeout_s: float | None = None) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group``, differentiable under gradient *averaging*.

    Every rank gets the global value; the backward passes ``size * grad`` to the local term, so
    after gradients are averaged over the ranks (data parallelism) each parameter holds
    d f(global sum) / d theta, the single-process gradient.
    """
    return _GlobalSum.apply(x, group, timeout_s)
