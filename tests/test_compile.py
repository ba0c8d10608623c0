"""torch.compile of the MoE layer: the fused experts custom op (moekit::fused_experts, with a fake
implementation and a registered autograd formula) lets a dropless layer compile with
fullgraph=True; the compiled layer matches eager in output, aux loss and every gradient, and
three training steps compile one graph (statistics are buffers, so nothing recompiles).

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moekit import MoE, moe_config
from moekit.ops.fused import _fused_op

D, E, F, K = 16, 4, 8, 2


def _layer() -> MoE:
    torch.manual_seed(0)
    return MoE(moe_config(dim=D, num_experts=E, expert_hidden=F, top_k=K, aux_loss_coef=0.01,
                          z_loss_coef=1e-3)).train()


def _steps(layer: MoE, fn, steps: int):
    """Forward + backward of (out * g).sum() + aux over `steps` batches; outputs and grads."""
    gen = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):
        x = torch.randn(2, 10, D, generator=gen).requires_grad_(True)
        g = torch.randn(2, 10, D, generator=gen)
        for p in layer.parameters():
            p.grad = None
        out = fn(x)
        ((out * g).sum() + layer.aux_loss).backward()
        results.append((out.detach(), layer.aux_loss.detach(), x.grad,
                        {n: p.grad.clone() for n, p in layer.named_parameters()}))
    return results


def _assert_same(got, want, tol: float) -> None:
    for (out, aux, gx, gp), (out_r, aux_r, gx_r, gp_r) in zip(got, want):
        torch.testing.assert_close(out, out_r, atol=tol, rtol=tol)
        torch.testing.assert_close(aux, aux_r, atol=tol, rtol=tol)
        torch.testing.assert_close(gx, gx_r, atol=tol, rtol=tol)
        assert gp.keys() == gp_r.keys()
        for name in gp_r:
            torch.testing.assert_close(gp[name], gp_r[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_layer_compiles_fullgraph_matches_eager_without_recompiles(backend):
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _layer(), _layer()
    want = _steps(eager, eager, 3)
    got = _steps(compiled, torch.compile(compiled, fullgraph=True, backend=backend), 3)
    _assert_same(got, want, 1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert compiled.stats.forward_passes == eager.stats.forward_passes == 3
    torch.testing.assert_close(compiled.stats.tokens_E, eager.stats.tokens_E)


def test_fused_op_registration_passes_opcheck():
    """Schema, fake implementation (shapes, dtypes) and autograd registration of the custom op."""
    torch.manual_seed(0)
    T, R = 5, 10
    x = torch.randn(T, D, requires_grad=True)
    w1 = torch.randn(E, 2 * F, D, requires_grad=True)
    w2 = torch.randn(E, D, F, requires_grad=True)
    weight = torch.rand(R, requires_grad=True)
    token_idx = torch.tensor([0, 2, 3, 4, 0, 1, 1, 2, 3, 4])
    counts = torch.tensor([4, 0, 3, 3])
    slot = torch.tensor([0, 4, 6, 8, 1, 2, 3, 5, 7, 9])   # slot t*K + j of each row
    inverse = torch.empty_like(slot).index_put_((slot,), torch.arange(R))
    for schedule in ("grouped", "loop"):
        for keep_act in (False, True):
            torch.library.opcheck(_fused_op, (x, w1, w2, weight, token_idx, inverse, counts, "silu", True, schedule,
                                              keep_act))
        # Forward only (inference): nothing requires grad, the pre-activation comes back (R, 0).
        plain = [t.detach() for t in (x, w1, w2, weight)]
        torch.library.opcheck(_fused_op, (*plain, token_idx, inverse, counts, "silu", True, schedule, False, True))

