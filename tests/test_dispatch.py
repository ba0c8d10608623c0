"""Dispatch plans, the grouped product and combine, each against a plain Python/float64 recomputation.

Shape legend: T tokens, D model dim, E experts, K top-k, R kept rows, I/O product in/out width.
"""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch import (combine, grouped_matmul, permute, plan_expert_choice, plan_token_choice,
                             resolve_backend, run_experts, token_choice_capacity)
from moekit.ops.grouped import fused_schedule
from moekit.router import Routing

E, K = 6, 3


def _routing(T: int, empty: tuple[int, ...] = (2, 5), seed: int = 0) -> Routing:
    """Top-K routing over E experts where the experts in ``empty`` are never chosen."""
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=gen)
    logits_TE[:, list(empty)] = -torch.inf
    scores_TE = logits_TE.softmax(-1)
    w_TK, idx_TK = scores_TE.topk(K, dim=-1)
    return Routing(logits_TE=logits_TE, scores_TE=scores_TE, topk_idx_TK=idx_TK, topk_weight_TK=w_TK)


def _python_plan(routing: Routing, capacity: int | None, policy: str) -> list[list[int]]:
    """For each expert, the flat slots (t*K + j) it keeps, in the order the plan must list them."""
    idx, w = routing.topk_idx_TK.tolist(), routing.topk_weight_TK.tolist()
    kept: list[list[int]] = []
    for e in range(E):
        slots = [t * K + j for t in range(len(idx)) for j in range(K) if idx[t][j] == e]
        if capacity is not None:
            if policy == "probability":
                slots = sorted(slots, key=lambda s: -w[s // K][s % K])
            slots = slots[:capacity]
        kept.append(slots)
    return kept


@pytest.mark.parametrize("T", [1, 100, 600])
def test_dropless_plan_groups_every_slot_by_expert_in_token_order(T):
    routing = _routing(T)
    plan = plan_token_choice(routing, E, capacity_factor=None)
    expected = _python_plan(routing, None, "position")
    assert plan.counts_E.tolist() == [len(s) for s in expected]
    assert plan.counts_E[[2, 5]].tolist() == [0, 0]
    assert plan.slot_idx_R.tolist() == [s for slots in expected for s in slots]
    assert plan.token_idx_R.tolist() == [s // K for slots in expected for s in slots]
    torch.testing.assert_close(plan.weight_R, routing.topk_weight_TK.reshape(-1)[plan.slot_idx_R])
    assert plan.dropless and int(plan.num_dropped) == 0


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_plan_keeps_what_the_drop_policy_says(policy, factor):
    T = 100
    routing = _routing(T)
    plan = plan_token_choice(routing, E, capacity_factor=factor, drop_policy=policy)
    C = token_choice_capacity(T, K, E, factor)
    expected = _python_plan(routing, C, policy)
    assert plan.counts_E.tolist() == [len(s) for s in expected]
    assert plan.slot_idx_R.tolist() == [s for slots in expected for s in slots]
    routed = torch.bincount(routing.topk_idx_TK.reshape(-1), minlength=E)
    assert plan.routed_E.tolist() == routed.tolist()
    assert int(plan.num_dropped) == int((routed - routed.clamp(max=C)).sum()) > 0
    assert not plan.dropless


def test_token_choice_capacity_formula():
    assert token_choice_capacity(100, 3, 6, 1.0) == 50
    assert token_choice_capacity(100, 3, 7, 1.25) == 54  # ceil(300/7*1.25) = ceil(53.57)
    assert token_choice_capacity(1, 1, 64, 1.0) == 1


def test_expert_choice_plan_drops_masked_experts():
    T, C = 10, 4
    gen = torch.Generator().manual_seed(1)
    idx_EC = torch.stack([torch.randperm(T, generator=gen)[:C] for _ in range(E)])
    w_EC = torch.rand(E, C, generator=gen)
    routing = Routing(logits_TE=torch.zeros(T, E), scores_TE=torch.zeros(T, E), ec_token_idx_EC=idx_EC,
                      ec_weight_EC=w_EC, score_func="softmax")
    available = torch.tensor([True, False, True, True, False, True])
    plan = plan_expert_choice(routing, available)
    assert plan.counts_E.tolist() == [C, 0, C, C, 0, C]
    assert plan.token_idx_R.tolist() == idx_EC[available].reshape(-1).tolist()
    torch.testing.assert_close(plan.weight_R, w_EC[available].reshape(-1))
    assert plan.slot_idx_R is None and not plan.dropless


@pytest.mark.parametrize("backend,O", [("grouped_mm", 8), ("loop", 8), ("reference", 8), ("auto", 8),
                                       ("auto", 7), ("loop", 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_matches_per_expert_float64_products(backend, O, dtype):
    counts_E = torch.tensor([5, 0, 17, 1, 0, 9])
    R, I = int(counts_E.sum()), 16
    x_RI = torch.randn(R, I, dtype=dtype, requires_grad=True)
    w_EIO = torch.randn(E, I, O, dtype=dtype, requires_grad=True)
    y_RO = grouped_matmul(x_RI, w_EIO, counts_E, backend)
    dy_RO = torch.randn(R, O, dtype=dtype)
    y_RO.backward(dy_RO)

    xd, wd = x_RI.detach().double().requires_grad_(True), w_EIO.detach().double().requires_grad_(True)
    expert_R = torch.repeat_interleave(torch.arange(E), counts_E)
    ref = torch.stack([xd[r] @ wd[expert_R[r]] for r in range(R)])
    ref.backward(dy_RO.double())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    assert y_RO.dtype == dtype
    torch.testing.assert_close(y_RO.double(), ref, **tol)
    torch.testing.assert_close(x_RI.grad.double(), xd.grad, **tol)
    torch.testing.assert_close(w_EIO.grad.double(), wd.grad, **tol)
    assert float(w_EIO.grad[[1, 4]].abs().sum()) == 0.0


def test_grouped_mm_backend_names_a_misaligned_width():
    with pytest.raises(ValueError, match=r"width\(s\) \[7\] in torch.float32"):
        grouped_matmul(torch.randn(4, 8), torch.randn(2, 8, 7), torch.tensor([1, 3]), "grouped_mm")
    assert resolve_backend("auto", torch.zeros(1), (16, 7)) == "loop"


def test_grouped_matmul_with_no_rows_returns_empty():
    y = grouped_matmul(torch.zeros(0, 4), torch.randn(3, 4, 5), torch.zeros(3, dtype=torch.long), "loop")
    assert y.shape == (0, 5)


def test_backend_resolution_on_cpu():
    assert resolve_backend("auto", torch.zeros(1)) == "grouped_mm"
    assert resolve_backend("auto", torch.zeros(1, dtype=torch.bfloat16)) == "loop"
    assert resolve_backend("loop", torch.zeros(1)) == "loop"
    assert fused_schedule("auto", torch.zeros(1)) == "auto"   # resolved inside the op at run time
    assert fused_schedule("grouped_mm", torch.zeros(1)) == "grouped"
    assert fused_schedule("auto", torch.zeros(1, dtype=torch.bfloat16)) == "loop"
    assert fused_schedule("reference", torch.zeros(1)) is None


def test_auto_schedule_follows_the_measured_loop_threshold(monkeypatch):
    """CPU float32 with backend auto: the op runs grouped below CPUKernels.loop_min_rows rows per
    expert and loop from it on, a threshold from the probe's op latency and product rate."""
    from moekit.ops import kernels
    from moekit.ops.grouped import resolve_schedule

    k = kernels.CPUKernels(capability="X", bf16_flags=False, native_bf16=False, threads=torch.get_num_threads(),
                           matmul_gflops=100.0, bf16_matmul_gflops=None, op_latency_us=10.0)
    # 16 ops x 10 us / 5% = 3.2 ms of products per block; a row costs 6 * (16*16 + 8*16) / 1e11 s.
    expected = 16 * 10e-6 / 0.05 / (6 * (16 * 16 + 8 * 16) / 100e9)
    assert k.loop_min_rows(16, 16, 8) == pytest.approx(expected)
    monkeypatch.setitem(kernels._CACHE, torch.get_num_threads(), k)
    x = torch.zeros(1)
    assert resolve_schedule(x, 16, 16, 8, expected * 0.99) == "grouped"
    assert resolve_schedule(x, 16, 16, 8, expected) == "loop"
    assert resolve_schedule(x, 6, 16, 8, 1e9) == "loop"   # 6 float32 = 24 bytes: grouped_mm cannot run


def test_cpu_probe_is_cached_and_consistent():
    from moekit.ops.kernels import cpu_kernels

    k = cpu_kernels()
    assert cpu_kernels() is k and k.threads == torch.get_num_threads()
    assert k.matmul_gflops > 0 and k.op_latency_us > 0
    assert k.capability == torch.backends.cpu.get_cpu_capability()
    if k.bf16_flags is False:
        assert not k.native_bf16   # no bf16 dot-product unit: bf16 blocks run in float32


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_combine_is_the_weighted_sum_over_kept_slots(capacity_factor):
    T, D = 100, 8
    routing = _routing(T)
    plan = plan_token_choice(routing, E, capacity_factor=capacity_factor)
    x_TD = torch.randn(T, D, dtype=torch.float64)
    x_RD = permute(x_TD, plan)
    torch.testing.assert_close(x_RD, x_TD[plan.token_idx_R])
    y_RD = torch.randn(x_RD.shape[0], D, dtype=torch.float64)
    out_TD = combine(y_RD, plan, torch.float64)
    expected = torch.zeros(T, D, dtype=torch.float64)
    for r, t in enumerate(plan.token_idx_R.tolist()):
        expected[t] += float(plan.weight_R[r]) * y_RD[r]
    torch.testing.assert_close(out_TD, expected)
    # The inverse permutation: slot t*K + j -> its row, R for a dropped slot.
    R = plan.token_idx_R.shape[0]
    inverse = [R] * (T * K)
    for r, slot in enumerate(plan.slot_idx_R.tolist()):
        inverse[slot] = r
    assert plan.inverse_S.tolist() == inverse
    assert torch.equal(combine(y_RD, plan, torch.float64), out_TD), "combine is not deterministic"


class _Scale(torch.nn.Module):
    """Experts module outside the fused path: expert e multiplies its rows by (e + 1)."""

    num_experts = E

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return x_RD * torch.repeat_interleave(torch.arange(1.0, E + 1), counts_E).unsqueeze(-1)


def test_run_experts_plain_path_and_row_check():
    T, D = 20, 4
    plan = plan_token_choice(_routing(T), E, capacity_factor=None)
    x_TD = torch.randn(T, D)
    seen: list[tuple[int, ...]] = []
    out_TD = run_experts(x_TD, plan, _Scale(), lambda y_RD, p: seen.append(tuple(y_RD.shape)))
    idx, w = _routing(T).topk_idx_TK, _routing(T).topk_weight_TK
    expected = ((idx + 1).float() * w).sum(-1, keepdim=True) * x_TD
    torch.testing.assert_close(out_TD, expected)
    assert seen == [(T * K, D)]
