"""The fused experts block (moekit.ops.fused) against references: a float64 per-row loop over
``expert_forward`` (independent of sorting and grouped products), and the plain composition
permute -> experts.forward -> combine (``backend="reference"``). Outputs and every gradient (input,
both expert weights, and the router logits through the combine weights), both schedules,
float32 and bfloat16, dropless and with capacity, awkward sizes (T=100/600, k=3, E=6, two
experts never chosen).

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden, R kept rows.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from doc_blocks import ROOT, python_blocks, run_blocks

from moekit import MoE, moe_config
from moekit.dispatch import plan_token_choice, run_experts
from moekit.ops.fused import fused_experts
from moekit.experts import MLPExperts, SwiGLUExperts
from moekit.router import Routing

E, K, D, F = 6, 3, 16, 24
EMPTY = (2, 5)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative error (Frobenius) against float64


def _experts(kind: str, backend: str) -> SwiGLUExperts | MLPExperts:
    torch.manual_seed(0)
    if kind == "swiglu":
        return SwiGLUExperts(E, D, F, "silu", backend)
    return MLPExperts(E, D, F, kind, backend)


def _inputs(T: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=gen).to(dtype)
    logits_TE = torch.randn(T, E, generator=gen) * 2
    dout_TD = torch.randn(T, D, generator=gen).to(dtype)
    return x_TD, logits_TE, dout_TD


def _plan(logits_TE: torch.Tensor, capacity_factor: float | None):
    """Softmax top-K routing (experts in EMPTY never chosen); weights keep the graph to the logits."""
    masked_TE = logits_TE.masked_fill(torch.isin(torch.arange(E), torch.tensor(EMPTY)), -torch.inf)
    scores_TE = masked_TE.softmax(-1)
    w_TK, idx_TK = scores_TE.topk(K, dim=-1)
    routing = Routing(logits_TE=logits_TE, scores_TE=scores_TE, topk_idx_TK=idx_TK, topk_weight_TK=w_TK)
    return plan_token_choice(routing, E, capacity_factor, "probability")


def _run(experts, x_TD, logits_TE, dout_TD, capacity_factor):
    """Output and gradients of (out * dout).sum() for x, every expert weight and the logits."""
    x = x_TD.detach().clone().requires_grad_(True)
    logits = logits_TE.detach().clone().requires_grad_(True)
    for p in experts.parameters():
        p.grad = None
    plan = _plan(logits, capacity_factor)
    out_TD = run_experts(x, plan, experts)
    (out_TD.float() * dout_TD.float()).sum().backward()
    grads = {"x": x.grad, "logits": logits.grad, **{n: p.grad for n, p in experts.named_parameters()}}
    return out_TD.detach(), grads, plan


def _loop_reference(experts, x_TD, logits_TE, dout_TD, capacity_factor):
    """float64: out_t = sum over the plan's kept slots of w_tj * expert_{e_tj}(x_t), each expert
    applied through ``expert_forward`` to its own tokens (no sort, no grouped product)."""
    ref = copy.deepcopy(experts).double()
    x = x_TD.detach().double().requires_grad_(True)
    logits = logits_TE.detach().double().requires_grad_(True)
    plan = _plan(logits, capacity_factor)
    expert_R = torch.repeat_interleave(torch.arange(E), plan.counts_E)
    out_TD = x.new_zeros(x.shape)
    for e in range(E):
        mine = expert_R == e
        if bool(mine.any()):
            tok = plan.token_idx_R[mine]
            out_TD = out_TD.index_add(0, tok, plan.weight_R[mine].unsqueeze(-1) * ref.expert_forward(e, x[tok]))
    (out_TD * dout_TD.double()).sum().backward()
    grads = {"x": x.grad, "logits": logits.grad, **{n: p.grad for n, p in ref.named_parameters()}}
    return out_TD.detach(), grads, plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


CASES = [
    # (T, capacity_factor, kind)
    (100, None, "swiglu"),
    (600, None, "swiglu"),
    (3, None, "swiglu"),  # decode-sized: blocks of <= NATIVE_DTYPE_MAX_ROWS rows
    (100, 0.75, "swiglu"),
    (100, None, "gelu"),
    (100, 0.75, "relu"),
]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,capacity_factor,kind", CASES, ids=[f"T{c[0]}_cf{c[1]}_{c[2]}" for c in CASES])
def test_fused_output_and_all_gradients_match_float64_loop(T, capacity_factor, kind, dtype, backend):
    experts = _experts(kind, backend).to(dtype)
    x_TD, logits_TE, dout_TD = _inputs(T, dtype)
    out, grads, plan = _run(experts, x_TD, logits_TE, dout_TD, capacity_factor)
    ref_out, ref_grads, ref_plan = _loop_reference(experts, x_TD, logits_TE, dout_TD, capacity_factor)

    assert torch.equal(plan.token_idx_R, ref_plan.token_idx_R), "float64 routing chose differently"
    assert plan.counts_E[list(EMPTY)].tolist() == [0, 0]
    if capacity_factor is not None:
        assert int(plan.num_dropped) > 0, "the capacity case must actually drop"
    assert out.dtype == dtype
    tol = TOL[dtype]
    assert _rel(out, ref_out) < tol
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None and g.dtype == (torch.float32 if name == "logits" else dtype), name
        assert _rel(g, ref_grads[name]) < tol, f"{name}: rel err {_rel(g, ref_grads[name]):.2e}"
    # Never-chosen experts get exactly zero weight gradient.
    for name, p in experts.named_parameters():
        assert float(p.grad[list(EMPTY)].abs().sum()) == 0.0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_fused_equals_plain_composition(dtype, capacity_factor):
    """Same dtype, same rounding points up to accumulation order: the fused block and the plain
    permute -> experts.forward -> combine path agree to a few ulps of the dtype."""
    fused = _experts("swiglu", "auto").to(dtype)
    plain = copy.deepcopy(fused)
    plain.backend = "reference"
    x_TD, logits_TE, dout_TD = _inputs(100, dtype, seed=3)
    out, grads, _ = _run(fused, x_TD, logits_TE, dout_TD, capacity_factor)
    ref_out, ref_grads, _ = _run(plain, x_TD, logits_TE, dout_TD, capacity_factor)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    assert _rel(out, ref_out.double()) < tol
    for name in grads:
        assert _rel(grads[name], ref_grads[name].double()) < tol, name


def test_fused_gradcheck_float64():
    """Finite differences through the hand-written backward (the loop schedule: grouped_mm has no
    float64 kernel; the grouped schedule shares the math and is checked above in float32)."""
    torch.manual_seed(0)
    T, Dd, Fd, Ee = 7, 4, 3, 3
    x = torch.randn(T, Dd, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(Ee, 2 * Fd, Dd, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(Ee, Dd, Fd, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([4, 0, 6])
    token_idx = torch.tensor([0, 2, 3, 6, 0, 1, 2, 4, 5, 6])
    weight = torch.rand(10, dtype=torch.float64, requires_grad=True)
    for act, gated, w1_ in (("silu", True, w1), ("gelu", False, w1[:, :Fd])):
        def f(x, w1, w2, weight, act=act, gated=gated):
            return fused_experts(x, w1, w2, weight, token_idx, counts, act, gated, "loop")[0]
        assert torch.autograd.gradcheck(f, (x, w1_, w2, weight), eps=1e-6, atol=1e-6)


def test_fused_rejects_bad_arguments():
    x, w1, w2 = torch.randn(3, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 3)
    idx, counts = torch.tensor([0, 1, 2]), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"schedule='fast' is not one of"):
        fused_experts(x, w1, w2, torch.ones(3), idx, counts, "silu", True, "fast")
    with pytest.raises(ValueError, match=r"activation='tanh' has no fused path"):
        fused_experts(x, w1, w2, torch.ones(3), idx, counts, "tanh", True, "loop")
    with pytest.raises(ValueError, match=r"weight_R has shape \(2,\), expected \(3,\)"):
        fused_experts(x, w1, w2, torch.ones(2), idx, counts, "silu", True, "loop")


def test_layer_uses_fused_path_and_matches_reference_backend_bf16():
    """The whole layer in bf16 (router, plan, fused experts) against the same layer forced to
    backend="reference": output and every parameter's gradient."""
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=D, num_experts=E, expert_hidden=F, top_k=K)).to(torch.bfloat16).train()
    ref = copy.deepcopy(layer)
    ref.experts.backend = "reference"
    x = torch.randn(2, 50, D).to(torch.bfloat16)
    g = torch.randn(2, 50, D).to(torch.bfloat16)
    outs = []
    for module in (layer, ref):
        xg = x.clone().requires_grad_(True)
        y = module(xg)
        (y.float() * g.float()).sum().backward()
        outs.append((y.detach(), xg.grad, {n: p.grad for n, p in module.named_parameters()}))
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = outs
    assert _rel(y, y_ref.double()) < 1.5e-2 and _rel(gx, gx_ref.double()) < 1.5e-2
    for name in gp_ref:
        assert _rel(gp[name], gp_ref[name].double()) < 1.5e-2, name


def test_performance_doc_examples_run():
    doc = ROOT / "docs" / "performance.md"
    blocks = python_blocks(doc)
    assert blocks, f"no python blocks in {doc}"
    run_blocks(blocks, doc.name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fewer_rows_than_experts_matches_float64_loop(dtype):
    """Decode-sized: R = 6 rows over 32 experts (at least 26 empty), so the loop schedule reads
    only the non-empty experts' ids and counts. Output and every gradient (x, both weights, the
    combine weights) against a float64 per-row loop; empty experts get exactly zero gradient."""
    from moekit.ops.fused import _nonempty_blocks

    torch.manual_seed(0)
    T, Kd, Ee, Dd, Fd = 2, 3, 32, 16, 8
    x = torch.randn(T, Dd).to(dtype)
    w1 = (torch.randn(Ee, 2 * Fd, Dd) / 4).to(dtype)
    w2 = (torch.randn(Ee, Dd, Fd) / 3).to(dtype)
    expert_S = torch.tensor([30, 3, 17, 3, 9, 30])  # T*K slots, experts 3 and 30 twice
    slot_R = torch.argsort(expert_S, stable=True)
    token_idx = torch.div(slot_R, Kd, rounding_mode="floor")
    counts = torch.bincount(expert_S, minlength=Ee)
    weight = torch.rand(T * Kd)[slot_R]
    dout = torch.randn(T, Dd).to(dtype)
    assert _nonempty_blocks(counts, 6) == [(3, 0, 2), (9, 2, 1), (17, 3, 1), (30, 4, 2)]

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2, weight)]
    out = fused_experts(*leaves[:3], leaves[3], token_idx, counts, "silu", True, "loop")[0]
    (out.float() * dout.float()).sum().backward()

    ref = [t.detach().double().requires_grad_(True) for t in (x, w1, w2, weight)]
    expert_R = expert_S[slot_R]
    ref_out = torch.zeros(T, Dd, dtype=torch.float64)
    for r in range(slot_R.shape[0]):
        t, e = int(token_idx[r]), int(expert_R[r])
        gate, up = (ref[1][e] @ ref[0][t]).chunk(2)
        ref_out = ref_out.index_add(0, token_idx[r:r + 1],
                                    (ref[3][r] * (ref[2][e] @ (torch.nn.functional.silu(gate) * up))).unsqueeze(0))
    (ref_out * dout.double()).sum().backward()

    tol = TOL[dtype]
    assert out.dtype == dtype and _rel(out.detach(), ref_out.detach()) < tol
    for name, got, want in zip(("x", "w1", "w2", "weight"), leaves, ref):
        assert _rel(got.grad, want.grad) < tol, f"{name}: rel err {_rel(got.grad, want.grad):.2e}"
    empty = (counts == 0).nonzero().squeeze(1)
    assert float(leaves[1].grad[empty].abs().sum()) == 0.0 and float(leaves[2].grad[empty].abs().sum()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_sort_free_decode_path_matches_float64_reference(kind, dtype):
    """Few slots against many experts (T*K = 6 <= E/2 = 16): run_experts takes the sort-free gather
    path (each token's K experts' weights gathered, as gpt-fast does). Output and every gradient
    (x, both weights, combine weights) against a float64 per-slot loop; larger batches do not."""
    from moekit.dispatch.run import use_gather_path

    torch.manual_seed(0)
    T, Kd, Ee, Dd, Fd = 2, 3, 32, 16, 8
    experts = (SwiGLUExperts(Ee, Dd, Fd) if kind == "swiglu" else MLPExperts(Ee, Dd, Fd, kind)).to(dtype)
    w1_name = "gate_up_proj" if kind == "swiglu" else "up_proj"
    x = torch.randn(T, Dd).to(dtype).requires_grad_(True)
    logits = torch.randn(T, Ee, requires_grad=True)
    scores = logits.softmax(-1)
    w_TK, idx_TK = scores.topk(Kd, dim=-1)
    routing = Routing(logits_TE=logits, scores_TE=scores, topk_idx_TK=idx_TK, topk_weight_TK=w_TK)
    plan = plan_token_choice(routing, Ee, None)
    w1, w2 = getattr(experts, w1_name), experts.down_proj
    assert use_gather_path(plan, w1, w2, x)
    big = Routing(logits_TE=torch.randn(40, Ee), scores_TE=torch.rand(40, Ee),
                  topk_idx_TK=torch.randint(0, Ee, (40, Kd)), topk_weight_TK=torch.rand(40, Kd))
    assert not use_gather_path(plan_token_choice(big, Ee, None), w1, w2, torch.zeros(40, Dd))
    dout = torch.randn(T, Dd).to(dtype)
    out = run_experts(x, plan, experts)
    (out.float() * dout.float()).sum().backward()

    ref = copy.deepcopy(experts).double()
    xr = x.detach().double().requires_grad_(True)
    lr = logits.detach().double().requires_grad_(True)
    wr_TK = lr.softmax(-1).gather(1, idx_TK)
    ref_out = torch.stack([sum(wr_TK[t, j] * ref.expert_forward(int(idx_TK[t, j]), xr[t:t + 1])[0]
                               for j in range(Kd)) for t in range(T)])
    (ref_out * dout.double()).sum().backward()
    tol = TOL[dtype]
    assert out.dtype == dtype and _rel(out.detach(), ref_out.detach()) < tol
    pairs = [("x", x.grad, xr.grad), ("logits", logits.grad, lr.grad),
             *[(n, p.grad, dict(ref.named_parameters())[n].grad) for n, p in experts.named_parameters()]]
    for name, got, want in pairs:
        assert _rel(got, want) < tol, f"{name}: rel err {_rel(got, want):.2e}"


def test_decode_layer_output_equals_reference_backend():
    """The whole layer at decode size (1 token, E=16, k=4: the gather path) against the same layer
    with backend="reference" (sort, permute, per-expert products, combine)."""
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=D, num_experts=16, expert_hidden=F, top_k=4)).eval()
    ref = copy.deepcopy(layer)
    ref.experts.backend = "reference"
    with torch.no_grad():
        for T in (1, 2):
            x = torch.randn(T, D)
            torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "fp32_compute"])
def test_bf16_blocks_with_and_without_native_bf16_products(native, monkeypatch):
    """Both CPU bf16 kernel choices (native bf16 products, or float32 compute stored back in bf16)
    give the float64 reference's output and gradients, whichever this CPU has."""
    from moekit.ops import kernels

    found = kernels.cpu_kernels()
    monkeypatch.setitem(kernels._CACHE, torch.get_num_threads(),
                        kernels.CPUKernels(**{**vars(found), "native_bf16": native}))
    experts = _experts("swiglu", "loop").to(torch.bfloat16)
    x_TD, logits_TE, dout_TD = _inputs(100, torch.bfloat16, seed=5)
    out, grads, _ = _run(experts, x_TD, logits_TE, dout_TD, None)
    ref_out, ref_grads, _ = _loop_reference(experts, x_TD, logits_TE, dout_TD, None)
    assert _rel(out, ref_out) < TOL[torch.bfloat16]
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) < TOL[torch.bfloat16], name


def test_auto_schedule_near_the_modeled_threshold_is_measured_once(monkeypatch):
    """CPU float32, schedule auto, rows per expert within TRIAL_BAND of the modeled loop threshold:
    one trial per shape picks the schedule (cached; the global RNG untouched) and the result equals
    both fixed schedules'. Far from the threshold the model's answer stands, with no trial."""
    from moekit.ops import fused, kernels

    T = 100
    experts = _experts("swiglu", "auto")
    x_TD, logits_TE, dout_TD = _inputs(T, torch.float32)
    rows = T * K / E
    latency_us = 1.0
    k = kernels.CPUKernels(capability="X", bf16_flags=False, native_bf16=False, threads=torch.get_num_threads(),
                           matmul_gflops=100.0, bf16_matmul_gflops=None, op_latency_us=latency_us)
    k = dataclasses.replace(k, op_latency_us=latency_us * 2 * rows / k.loop_min_rows(D, 2 * F, F))
    assert k.loop_min_rows(D, 2 * F, F) == pytest.approx(2 * rows)   # modeled: grouped, inside the band
    monkeypatch.setitem(kernels._CACHE, torch.get_num_threads(), k)
    monkeypatch.setattr(fused, "_TRIED", {})
    trials = []
    real_trial = fused._trial
    monkeypatch.setattr(fused, "_trial", lambda *args: trials.append(args[3]) or real_trial(*args))
    rng = torch.get_rng_state()
    with torch.no_grad():
        inference = run_experts(x_TD, _plan(logits_TE, None), experts)
    assert trials == [], "a forward that no backward follows (inference) takes the model's answer, no trial"
    out, grads, _ = _run(experts, x_TD, logits_TE, dout_TD, None)
    _run(experts, x_TD, logits_TE, dout_TD, None)
    with torch.no_grad():
        run_experts(x_TD, _plan(logits_TE, None), experts)
    assert trials == [pytest.approx(rows)], "one trial for the shape, reused by backward and later calls"
    torch.testing.assert_close(inference, out, rtol=1e-6, atol=1e-6)
    assert list(fused._TRIED.values())[0] in ("grouped", "loop")
    assert torch.equal(torch.get_rng_state(), rng)
    for backend in ("grouped_mm", "loop"):
        fixed = _experts("swiglu", backend)
        fixed_out, fixed_grads, _ = _run(fixed, x_TD, logits_TE, dout_TD, None)
        torch.testing.assert_close(out, fixed_out, rtol=1e-6, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, fixed_grads[name], rtol=1e-6, atol=1e-6)
    monkeypatch.setitem(kernels._CACHE, torch.get_num_threads(),
                        dataclasses.replace(k, op_latency_us=k.op_latency_us * 4 * fused.TRIAL_BAND))
    monkeypatch.setattr(fused, "_TRIED", {})
    _run(experts, x_TD, logits_TE, dout_TD, None)
    assert len(trials) == 1 and fused._TRIED == {}, "outside the band: the model decides, no trial"


@pytest.mark.parametrize("kernel", ["aten", "onednn"])
def test_one_row_bf16_blocks_with_either_row_kernel(kernel, monkeypatch):
    """Decode blocks of one row in bf16 run with the kernel the probe picks (ATen's one-row product
    with oneDNN off, or oneDNN): both give the float64 per-row result, and the process-wide oneDNN
    flag is as before afterwards."""
    from moekit.ops import kernels

    monkeypatch.setitem(kernels._ROW_CACHE, (torch.get_num_threads(), torch.bfloat16), kernel)
    torch.manual_seed(0)
    T, Kd, Ee, Dd, Fd = 2, 3, 32, 64, 32
    x = torch.randn(T, Dd).bfloat16()
    w1 = (torch.randn(Ee, 2 * Fd, Dd) / 8).bfloat16()
    w2 = (torch.randn(Ee, Dd, Fd) / 6).bfloat16()
    expert_S = torch.tensor([30, 3, 17, 5, 9, 21])  # six distinct experts: six one-row blocks
    slot_R = torch.argsort(expert_S, stable=True)
    token_idx = torch.div(slot_R, Kd, rounding_mode="floor")
    counts = torch.bincount(expert_S, minlength=Ee)
    weight = torch.rand(T * Kd)[slot_R]
    flag = torch._C._get_mkldnn_enabled()
    with torch.no_grad():
        out = fused_experts(x, w1, w2, weight, token_idx, counts, "silu", True, "loop")[0]
    assert torch._C._get_mkldnn_enabled() == flag
    ref = torch.zeros(T, Dd, dtype=torch.float64)
    for r in range(6):
        t, e = int(token_idx[r]), int(expert_S[slot_R[r]])
        gate, up = (w1[e].double() @ x[t].double()).chunk(2)
        ref[t] += float(weight[r]) * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    assert _rel(out, ref) < TOL[torch.bfloat16]


def test_row_product_kernel_is_measured_once_per_thread_count():
    from moekit.ops import kernels

    found = kernels.row_product_kernel(torch.bfloat16)
    assert found in ("aten", "onednn")
    assert kernels._ROW_CACHE[(torch.get_num_threads(), torch.bfloat16)] == found
    assert kernels.row_product_kernel(torch.float32) == "aten"  # not probed: only half precision is switched


def test_schedule_trial_keeps_the_model_answer_when_unsure(monkeypatch):
    """The trial overrides the modeled schedule only when the other one wins by more than
    TRIAL_MARGIN, and not at all when a first run already takes over 1/8 of TRIAL_BUDGET_S."""
    from moekit.ops import fused

    w1, w2 = torch.randn(4, 2 * F, D), torch.randn(4, D, F)
    monkeypatch.setattr(fused, "TRIAL_MARGIN", 1.0)   # nothing wins by 100%
    for modeled in ("grouped", "loop"):
        assert fused._trial(torch.float32, w1, w2, 32, "silu", True, modeled) == modeled
    monkeypatch.setattr(fused, "TRIAL_MARGIN", 0.0)
    monkeypatch.setattr(fused, "TRIAL_BUDGET_S", 0.0)  # every first run is "too slow"
    runs = []
    real_forward = fused._forward_loop
    monkeypatch.setattr(fused, "_forward_loop", lambda *a: runs.append(1) or real_forward(*a))
    assert fused._trial(torch.float32, w1, w2, 32, "silu", True, "grouped") == "grouped"
    assert runs == [], "the loop schedule ran after the first run was already over the budget"


@pytest.mark.parametrize("schedule", ["grouped", "loop"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_kept_activation_gives_the_recomputed_gradients_exactly(schedule, act):
    """The backward with the forward's kept act(gate) equals the one that recomputes it, bit for bit."""
    from moekit.ops import fused

    torch.manual_seed(1)
    T, R = 7, 21
    x = torch.randn(T, D)
    w1, w2 = torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    weight, dout = torch.rand(R), torch.randn(T, D)
    token_idx = torch.arange(R) % T
    counts = torch.tensor([5, 0, 4, 6, 0, 6])
    runs = {}
    for keep in (False, True):
        out, _, h, act_gate = fused._fused_op(x, w1, w2, weight, token_idx, None, counts, act, True, schedule, keep)
        assert act_gate.shape == ((R, F) if keep else (R, 0))
        grads = fused._fused_backward_op(dout, x, w1, w2, weight, token_idx, None, counts, h, act, True, schedule,
                                         act_gate)
        runs[keep] = (out, *grads)
    for kept, recomputed in zip(runs[True], runs[False]):
        assert torch.equal(kept, recomputed)


@pytest.mark.parametrize("schedule", ["grouped", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_only_gives_the_same_outputs_and_keeps_no_pre_activation(schedule, dtype):
    """``forward_only`` (what ``fused_experts`` passes when no backward can follow) computes each
    block's pre-activation as a temporary: outputs equal the kept-h forward bit for bit, h comes back
    (R, 0), and a backward through it raises instead of using the missing h."""
    from moekit.ops import fused

    torch.manual_seed(2)
    T, R = 7, 21
    x = torch.randn(T, D).to(dtype)
    w1, w2 = torch.randn(E, 2 * F, D).to(dtype), torch.randn(E, D, F).to(dtype)
    weight, token_idx = torch.rand(R), torch.arange(R) % T
    counts = torch.tensor([5, 0, 4, 6, 0, 6])
    kept = fused._fused_op(x, w1, w2, weight, token_idx, None, counts, "silu", True, schedule, False, False)
    only = fused._fused_op(x, w1, w2, weight, token_idx, None, counts, "silu", True, schedule, False, True)
    assert kept[2].shape == (R, 2 * F) and only[2].shape == (R, 0)
    assert torch.equal(only[0], kept[0]) and torch.equal(only[1], kept[1])
    xg = x.clone().requires_grad_()
    out = fused._fused_op(xg, w1, w2, weight, token_idx, None, counts, "silu", True, schedule, False, True)[0]
    with pytest.raises(RuntimeError, match="forward_only=True"):
        out.float().sum().backward()



def test_inference_calls_the_op_body_directly_with_the_same_result(monkeypatch):
    """Without grad, in eager mode on plain tensors, ``fused_experts`` runs the op's body without the
    custom op's dispatch (same outputs, bit for bit); with grad, or inside a dispatch mode (fake
    tensors), it goes through ``moekit::fused_experts``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moekit.ops import fused

    torch.manual_seed(3)
    T, R = 7, 21
    x, w1, w2 = torch.randn(T, D), torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    weight, token_idx = torch.rand(R), torch.arange(R) % T
    counts = torch.tensor([5, 0, 4, 6, 0, 6])
    calls = []
    real_op = fused._fused_op
    monkeypatch.setattr(fused, "_fused_op", lambda *a: calls.append(1) or real_op(*a))
    with torch.no_grad():
        direct = fused.fused_experts(x, w1, w2, weight, token_idx, counts, "silu", True, "loop")
    assert calls == []
    via_op = real_op(x, w1, w2, weight, token_idx, None, counts, "silu", True, "loop", False, True)
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[1], via_op[1])
    fused.fused_experts(x, w1.requires_grad_(), w2, weight, token_idx, counts, "silu", True, "loop")
    assert calls == [1], "a forward with grad goes through the custom op (its autograd)"
    plain = (x, w1.detach(), w2, weight, token_idx, counts)
    with FakeTensorMode() as mode, torch.no_grad():
        fake = [mode.from_tensor(t) for t in plain]
        out = fused.fused_experts(*fake[:5], fake[5], "silu", True, "grouped")[0]
    assert calls == [1, 1] and out.shape == (T, D)
    # An experts module's own weights are nn.Parameters: plain tensors to the direct path too.
    params = (torch.nn.Parameter(w1.detach()), torch.nn.Parameter(w2))
    with torch.no_grad():
        from_params = fused.fused_experts(x, *params, weight, token_idx, counts, "silu", True, "loop")
    assert calls == [1, 1] and torch.equal(from_params[0], direct[0])
