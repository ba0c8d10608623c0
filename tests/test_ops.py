"""moekit.ops against moekit.ops.reference: every op (grouped products, gather and per-token sum,
the fused experts op and its decode gather path, the int8 expert ops) equals its plain-PyTorch
reference, outputs and gradients, in float64 where the op allows; and ops/ imports nothing else
from moekit, so dispatch/ and experts/ can both build on it.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden, U first-product width,
R kept rows, S = T*K slots.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moekit import ops
from moekit.dispatch import plan_token_choice
from moekit.ops import reference as ref
from moekit.router import Routing

E, K, D, F = 6, 2, 16, 12
PACKAGE = Path(__file__).resolve().parents[1] / "moekit"


def _plan(T: int, capacity_factor: float | None, seed: int = 0):
    """Top-K softmax routing with experts 1 and 4 never chosen, as a DispatchPlan."""
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=gen, dtype=torch.float64)
    logits_TE[:, [1, 4]] = -torch.inf
    scores_TE = logits_TE.softmax(-1)
    w_TK, idx_TK = scores_TE.topk(K, dim=-1)
    routing = Routing(logits_TE=logits_TE, scores_TE=scores_TE, topk_idx_TK=idx_TK, topk_weight_TK=w_TK)
    return plan_token_choice(routing, E, capacity_factor, "probability")


def _weights(gated: bool, dtype: torch.dtype = torch.float64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    U = 2 * F if gated else F
    w1 = (torch.randn(E, U, D, generator=gen, dtype=torch.float64) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, F, generator=gen, dtype=torch.float64) / F**0.5).to(dtype)
    return w1, w2


def test_ops_import_nothing_else_from_moekit():
    found = []
    for path in sorted((PACKAGE / "ops").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level >= 2 or (node.module or "").startswith("moekit")):
                found.append(f"{path.name}:{node.lineno}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("moekit") for a in node.names):
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"moekit/ops imports other moekit modules at {found}"


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_grouped_matmul_matches_reference(backend):
    if backend == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("torch.nn.functional.grouped_mm needs torch >= 2.8")
    dtype = torch.float64 if backend == "loop" else torch.float32
    gen = torch.Generator().manual_seed(2)
    counts_E = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts_E.sum()), 8, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(E, 8, 12, generator=gen, dtype=dtype, requires_grad=True)
    y = ops.grouped_matmul(x, w, counts_E, backend)
    y_ref = ref.grouped_matmul(x, w, counts_E)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    dy = torch.randn(y.shape, generator=gen, dtype=dtype)
    grads = torch.autograd.grad(y, (x, w), dy)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref, (x, w), dy)):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=["dropless", "dropping"])
def test_gather_rows_and_token_sum_match_reference(capacity_factor):
    plan = _plan(20, capacity_factor)
    x_TD = torch.randn(20, D, dtype=torch.float64)
    rows = ops.gather_rows(x_TD, plan.token_idx_R)
    assert torch.equal(rows, ref.gather_rows(x_TD, plan.token_idx_R))
    v_RD = torch.randn(rows.shape, dtype=torch.float64)
    expected = ref.token_sum(v_RD, plan.token_idx_R, 20, torch.float64)
    for inverse_S in (plan.inverse_S, None):  # slot-order gather and index_add_ give the same sums
        got = ops.token_sum(v_RD, inverse_S, plan.token_idx_R, 20, torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    w_R = torch.rand(rows.shape[0], dtype=torch.float64)
    expected = ref.token_sum(v_RD * w_R.unsqueeze(-1), plan.token_idx_R, 20, torch.float64)
    for inverse_S in (plan.inverse_S, None):  # weighted: each row times its weight
        got = ops.token_sum(v_RD, inverse_S, plan.token_idx_R, 20, torch.float64, w_R)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # bfloat16 rows, float32 weights, float32 sums: the rows' values exactly, products and sums in float32
    v_bf = v_RD.bfloat16()
    expected = ref.token_sum(v_bf.double() * w_R.float().double().unsqueeze(-1), plan.token_idx_R, 20, torch.float64)
    got = ops.token_sum(v_bf, plan.inverse_S, plan.token_idx_R, 20, torch.float32, w_R.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    if capacity_factor is not None:
        assert plan.token_idx_R.shape[0] < 20 * K, "the capacity dropped nothing: the case is not tested"


def test_token_sum_of_no_tokens_is_empty():
    v_RD = torch.zeros(0, D)
    for inverse_S in (torch.zeros(0, dtype=torch.long), None):
        out = ops.token_sum(v_RD, inverse_S, torch.zeros(0, dtype=torch.long), 0, torch.float32, torch.zeros(0))
        assert out.shape == (0, D) and out.dtype == torch.float32


@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu", False)])
@pytest.mark.parametrize("schedule", ["loop", "grouped"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=["dropless", "dropping"])
def test_fused_experts_matches_reference_with_gradients(act, gated, schedule, capacity_factor):
    dtype = torch.float64 if schedule == "loop" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    plan = _plan(24, capacity_factor)
    w1, w2 = (w.requires_grad_(True) for w in _weights(gated, dtype))
    x_TD = torch.randn(24, D, dtype=dtype, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    weight_R = plan.weight_R.to(dtype).detach().requires_grad_(True)
    out, _ = ops.fused_experts(x_TD, w1, w2, weight_R, plan.token_idx_R, plan.counts_E, act, gated, schedule,
                               plan.inverse_S)
    out_ref = ref.fused_experts(x_TD, w1, w2, weight_R, plan.token_idx_R, plan.counts_E, act, gated)
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    dout = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    inputs = (x_TD, w1, w2, weight_R)
    for name, g, g_ref in zip(("x", "w1", "w2", "weight"), torch.autograd.grad(out, inputs, dout),
                              torch.autograd.grad(out_ref, inputs, dout)):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_gather_experts_matches_reference():
    plan = _plan(2, None)  # decode: 2 tokens x 2 slots against 6 experts
    w1, w2 = _weights(True)
    x_TD = torch.randn(2, D, dtype=torch.float64)
    out = ops.gather_experts(x_TD, w1, w2, plan.topk_idx_TK, plan.topk_weight_TK, "silu", True)
    out_ref = ref.gather_experts(x_TD, w1, w2, plan.topk_idx_TK, plan.topk_weight_TK, "silu", True)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gated", [True, False])
def test_int8_ops_match_reference(gated):
    w1, w2 = _weights(gated, torch.float32)
    q1, s1 = ops.quantize_per_channel(w1)
    q2, s2 = ops.quantize_per_channel(w2)
    for (q, s), w in (((q1, s1), w1), ((q2, s2), w2)):
        q_ref, s_ref = ref.quantize_per_channel(w)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    plan = _plan(24, 0.6)
    x_TD = torch.randn(24, D, generator=torch.Generator().manual_seed(5))
    act = "silu" if gated else "relu"
    out = ops.int8_experts(x_TD, q1, s1, q2, s2, plan.weight_R, plan.token_idx_R, plan.counts_E, act, gated,
                           plan.inverse_S)
    out_ref = ref.int8_experts(x_TD, q1, s1, q2, s2, plan.weight_R, plan.token_idx_R, plan.counts_E, act, gated)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    decode = _plan(2, None)
    out = ops.int8_gather_experts(x_TD[:2], q1, s1, q2, s2, decode.topk_idx_TK, decode.topk_weight_TK, act, gated)
    w1_deq, w2_deq = ops.dequantize(q1, s1), ops.dequantize(q2, s2)
    out_ref = ref.gather_experts(x_TD[:2], w1_deq, w2_deq, decode.topk_idx_TK, decode.topk_weight_TK, act, gated)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)


def test_experts_name_their_kernel_by_weights():
    """The protocol that keeps dispatch free of experts: stacked experts hand FusedWeights (their
    own tensors), int8 experts Int8Weights, the reference backend and other modules nothing."""
    from moekit.dispatch.run import kernel_weights
    from moekit.experts import ModuleExperts, SwiGLUExperts
    from moekit.experts.int8 import Int8Experts

    x_TD = torch.zeros(3, D)
    experts = SwiGLUExperts(E, D, F, "silu", "loop")
    fw = kernel_weights(experts, x_TD)
    assert isinstance(fw, ops.FusedWeights) and fw.w1_EUD is experts.gate_up_proj and fw.schedule == "loop"
    assert isinstance(kernel_weights(Int8Experts.from_float(experts), x_TD), ops.Int8Weights)
    assert kernel_weights(SwiGLUExperts(E, D, F, "silu", "reference"), x_TD) is None
    assert kernel_weights(ModuleExperts([torch.nn.Identity()] * E), x_TD) is None

    class Odd(torch.nn.Module):
        def fused_weights(self, x):
            return (x, x)

    with pytest.raises(TypeError, match="Odd.fused_weights returned tuple"):
        kernel_weights(Odd(), x_TD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_matches_reference(dtype):
    """NaN, +Inf or -Inf anywhere (first, middle, last entry; in a non-contiguous view) is caught as
    ``torch.isfinite(x).all()`` catches it; huge finite values of both signs are not flagged."""
    big = torch.finfo(dtype).max
    x = torch.randn(37, 129).to(dtype)
    assert ops.all_finite(x) and ref.all_finite(x)
    extremes = torch.tensor([[big, -big], [-big, big]], dtype=dtype)
    assert ops.all_finite(extremes) and ref.all_finite(extremes)
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in ((0, 0), (18, 64), (36, 128)):
            bad = x.clone()
            bad[index] = value
            assert ops.all_finite(bad) is ref.all_finite(bad) is False, (value, index)
            assert ops.all_finite(bad.t()) is False
            assert ops.all_finite(bad[:, ::2]) is ref.all_finite(bad[:, ::2])


def test_all_finite_on_empty_integer_and_complex_tensors():
    assert ops.all_finite(torch.empty(0, 4)) and ops.all_finite(torch.tensor([1, 2], dtype=torch.long))
    z = torch.randn(5, dtype=torch.complex64)
    assert ops.all_finite(z)
    z[3] = complex(0.0, float("inf"))
    assert not ops.all_finite(z)


def test_every_op_has_a_reference_and_a_benchmark():
    """The ops tier's rule: each op module has its functions in reference.py and a benchmark script."""
    benchmarks = PACKAGE.parent / "benchmarks"
    ops_functions = {"grouped": ["grouped_matmul"], "fused": ["fused_experts", "gather_experts"],
                     "int8": ["int8_experts", "quantize_per_channel"], "permute": ["gather_rows", "token_sum"],
                     "finite": ["all_finite"]}
    modules = {p.stem for p in (PACKAGE / "ops").glob("*.py")} - {"__init__", "reference", "kernels", "cuda_kernels"}
    assert modules == set(ops_functions), f"ops modules {sorted(modules)}: list the new one here"
    for name, functions in ops_functions.items():
        assert (benchmarks / f"ops_{name}.py").is_file(), f"benchmarks/ops_{name}.py is missing"
        missing = [f for f in functions if not callable(getattr(ref, f, None))]
        assert not missing, f"moekit.ops.reference has no {missing} for ops/{name}.py"
