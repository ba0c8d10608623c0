"""The dropless training forward + backward calls no op that reads tensor data on the host, checked on
the CPU: a dispatch mode lists every ATen op the layer runs outside the fused experts op (which is one
opaque op here; on CUDA tests/test_gpu.py counts real syncs, inside it too). On CUDA each listed op is a
host sync: scalar reads (item, bool), data-dependent shapes (nonzero, bincount, unique, boolean
indexing) and tensors built from Python values (a host-to-device copy).

Shape legend: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import MoE, moe_config

HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten.bincount.default", "aten._unique2.default", "aten.unique_consecutive.default",
              "aten.unique_dim.default", "aten.repeat_interleave.Tensor", "aten.lift_fresh.default",
              "aten.lift_fresh_copy.default"}


class _HostReads(TorchDispatchMode):
    """Records the ops in HOST_READS, and indexing by a boolean mask."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in HOST_READS or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_dropless_train_step_reads_nothing_on_the_host(router):
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=32, num_experts=8, expert_hidden=48, top_k=2, router=router, backend="grouped_mm",
                           z_loss_coef=1e-3, cv_loss_coef=1e-2)).train()
    x = torch.randn(50, 32, requires_grad=True)
    with _HostReads() as mode:
        y = layer(x)
        (y.square().mean() + layer.aux_loss).backward()
    assert x.grad is not None and layer.experts.gate_up_proj.grad is not None
    assert mode.found == [], mode.found


def test_the_scan_sees_a_host_read():
    """The check can fail: bincount (which syncs on CUDA) is found."""
    with _HostReads() as mode:
        torch.bincount(torch.tensor([0, 2, 2]), minlength=4)
    assert "aten.bincount.default" in mode.found and "aten.lift_fresh.default" in mode.found
