"""Each router against a float64 per-token re-implementation of its paper's formula.

Shape legend: T tokens, D model dim, E experts, K top-k, C tokens per expert (expert choice).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit.config import RouterConfig
from moekit.experts import SharedExperts
from moekit.router import build_router

D, E, T = 12, 8, 37


def _router(**kw):
    torch.manual_seed(1)
    router = build_router(D, E, RouterConfig(**kw))
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
    return router


def _logits64(router, x_TD):
    return x_TD.double() @ router.weight.detach().double().t()


def _softmax_row(row):
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    return [v / sum(exps) for v in exps]


def _top(values, k):
    return sorted(range(len(values)), key=lambda e: -values[e])[:k]


def _check(routing, ref_idx, ref_w, atol=1e-6):
    """Same expert set per token (order-free) with the same weight per expert."""
    idx = routing.topk_idx_TK.tolist()
    w = routing.topk_weight_TK.double()
    for t in range(len(ref_idx)):
        assert sorted(idx[t]) == sorted(ref_idx[t]), f"token {t}"
        got = dict(zip(idx[t], w[t].tolist()))
        for e, we in zip(ref_idx[t], ref_w[t]):
            assert got[e] == pytest.approx(we, abs=atol), f"token {t} expert {e}"


@pytest.mark.parametrize("norm", [True, False], ids=["mixtral_renorm", "qwen_no_renorm"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_softmax_topk_matches_formula(norm, k):
    router = _router(kind="softmax_topk", top_k=k, norm_topk_prob=norm).eval()
    x_TD = torch.randn(T, D)
    routing = router(x_TD)
    ref_idx, ref_w = [], []
    for row in _logits64(router, x_TD).tolist():
        p = _softmax_row(row)
        picks = _top(p, k)
        w = [p[e] for e in picks]
        if norm:
            w = [v / sum(w) for v in w]
        ref_idx.append(picks)
        ref_w.append(w)
    _check(routing, ref_idx, ref_w)
    assert routing.topk_weight_TK.dtype == torch.float32
    sums = routing.topk_weight_TK.sum(-1)
    if norm:
        torch.testing.assert_close(sums, torch.ones(T))
    elif k < E:
        assert bool((sums < 1).all())


def test_switch_is_top1_with_unnormalised_probability():
    router = _router(kind="switch", top_k=1).eval()
    x_TD = torch.randn(T, D)
    routing = router(x_TD)
    assert routing.topk_idx_TK.shape == (T, 1)
    ref_idx, ref_w = [], []
    for row in _logits64(router, x_TD).tolist():
        p = _softmax_row(row)
        e = max(range(E), key=lambda i: p[i])
        ref_idx.append([e])
        ref_w.append([p[e]])
    _check(routing, ref_idx, ref_w)
    assert bool((routing.topk_weight_TK < 1).all())


def test_noisy_topk_eval_is_deterministic_clean_softmax_over_kept():
    router = _router(kind="noisy_topk", top_k=2)
    with torch.no_grad():
        router.noise_weight.normal_(0.0, 0.5)
    router.eval()
    x_TD = torch.randn(T, D)
    a, b = router(x_TD), router(x_TD)
    assert torch.equal(a.topk_idx_TK, b.topk_idx_TK) and torch.equal(a.topk_weight_TK, b.topk_weight_TK)
    assert a.noise_std_TE is None and a.noisy_logits_TE is None
    ref_idx, ref_w = [], []
    for row in _logits64(router, x_TD).tolist():
        picks = _top(row, 2)
        kept = _softmax_row([row[e] for e in picks])
        ref_idx.append(picks)
        ref_w.append(kept)
    _check(a, ref_idx, ref_w)


def test_noisy_topk_training_noise_statistics_and_weights():
    """H = x W_g + N(0,1) * softplus(x W_noise) (+0.01 floor); weights = softmax over kept top-k of H."""
    router = _router(kind="noisy_topk", top_k=2)
    with torch.no_grad():
        router.noise_weight.normal_(0.0, 0.5)
    router.train()
    x_TD = torch.randn(4000, D)
    clean_TE = _logits64(router, x_TD)
    std_TE = F.softplus(x_TD.double() @ router.noise_weight.detach().double().t()) + 1e-2
    with torch.no_grad():
        first = router(x_TD)
        second = router(x_TD)
    assert not torch.equal(first.noisy_logits_TE, second.noisy_logits_TE)
    torch.testing.assert_close(first.logits_TE.double(), clean_TE, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.noise_std_TE.double(), std_TE, rtol=1e-5, atol=1e-5)
    z_TE = (first.noisy_logits_TE.double() - clean_TE) / std_TE
    # 4000 draws per expert: the mean's standard error is 0.016, the variance's 0.022.
    assert z_TE.mean(0).abs().max() < 0.08
    assert (z_TE.var(0) - 1).abs().max() < 0.11
    assert abs(float(z_TE.mean())) < 0.03 and abs(float(z_TE.var()) - 1) < 0.04
    # The noise scale depends on the input: it is not one constant.
    assert float(std_TE.std()) > 0.1
    noisy = first.noisy_logits_TE.double().tolist()
    ref_idx = [_top(row, 2) for row in noisy]
    ref_w = [_softmax_row([row[e] for e in picks]) for row, picks in zip(noisy, ref_idx)]
    _check(first, ref_idx, ref_w, atol=1e-5)


def test_expert_choice_matches_formula():
    cf = 1.5
    router = _router(kind="expert_choice", capacity_factor=cf).eval()
    x_TD = torch.randn(T, D)
    routing = router(x_TD)
    C = math.ceil(T * cf / E)
    assert routing.ec_token_idx_EC.shape == (E, C)
    S = [_softmax_row(row) for row in _logits64(router, x_TD).tolist()]
    for e in range(E):
        column = [S[t][e] for t in range(T)]
        ref = _top(column, C)
        got = routing.ec_token_idx_EC[e].tolist()
        assert sorted(got) == sorted(ref)
        for t, w in zip(got, routing.ec_weight_EC[e].tolist()):
            assert w == pytest.approx(S[t][e], abs=1e-6)


def _deepseek_v3_reference(logits_TE, bias_E, k, n_group, topk_group, scale, norm, group_score="top2_sum"):
    """DeepSeek-V3 eqs. 12-16 per token: s = sigmoid(u); pick top-k of s + b within the best
    topk_group groups (group score: top-2 sum of s + b); g = s / sum(s over picks) * scale."""
    per = len(bias_E) // n_group
    idx_all, w_all = [], []
    for row in logits_TE.tolist():
        s = [1 / (1 + math.exp(-v)) for v in row]
        c = [si + bi for si, bi in zip(s, bias_E)]
        groups = []
        for g in range(n_group):
            members = sorted(c[g * per:(g + 1) * per], reverse=True)
            groups.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
        best = set(_top(groups, topk_group))
        eligible = [c[e] if e // per in best else -math.inf for e in range(len(c))]
        picks = _top(eligible, k)
        w = [s[e] for e in picks]
        if norm:
            w = [v / sum(w) for v in w]
        idx_all.append(picks)
        w_all.append([v * scale for v in w])
    return idx_all, w_all


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_sigmoid_bias_group_limited_deepseek_v3(norm, group_score):
    k, n_group, topk_group, scale = 3, 4, 2, 2.5
    router = _router(kind="sigmoid_topk", top_k=k, n_group=n_group, topk_group=topk_group,
                     routed_scaling_factor=scale, norm_topk_prob=norm, group_score=group_score).eval()
    with torch.no_grad():
        router.selection_bias.copy_(torch.linspace(-0.4, 0.4, E)[torch.randperm(E)])
    x_TD = torch.randn(T, D)
    routing = router(x_TD)
    ref_idx, ref_w = _deepseek_v3_reference(_logits64(router, x_TD), router.selection_bias.tolist(), k, n_group,
                                            topk_group, scale, norm, group_score)
    _check(routing, ref_idx, ref_w)
    # The bias steers selection only: weights come from the unbiased sigmoid scores.
    assert routing.score_func == "sigmoid"
    torch.testing.assert_close(routing.scores_TE.double(), torch.sigmoid(_logits64(router, x_TD)))


def test_selection_bias_changes_choice_not_weights():
    router = _router(kind="sigmoid_topk", top_k=1, norm_topk_prob=False).eval()
    x_TD = torch.randn(T, D)
    with torch.no_grad():
        router.selection_bias[3] = 10.0
    routing = router(x_TD)
    assert bool((routing.topk_idx_TK == 3).all())
    torch.testing.assert_close(routing.topk_weight_TK[:, 0], torch.sigmoid(routing.logits_TE[:, 3]))


@pytest.mark.parametrize("kind", ["softmax_topk", "noisy_topk", "sigmoid_topk", "switch", "expert_choice"])
def test_router_math_is_float32_for_bf16_input(kind):
    kw = {"top_k": 1} if kind == "switch" else {"top_k": 2}
    if kind == "expert_choice":
        kw["capacity_factor"] = 1.0
    router = _router(kind=kind, **kw).eval()
    x_bf16 = torch.randn(T, D).to(torch.bfloat16)
    a, b = router(x_bf16), router(x_bf16.float())
    assert a.logits_TE.dtype == torch.float32 and a.scores_TE.dtype == torch.float32
    assert torch.equal(a.logits_TE, b.logits_TE)
    if kind == "expert_choice":
        assert a.ec_weight_EC.dtype == torch.float32 and torch.equal(a.ec_token_idx_EC, b.ec_token_idx_EC)
    else:
        assert a.topk_weight_TK.dtype == torch.float32
        assert torch.equal(a.topk_idx_TK, b.topk_idx_TK) and torch.equal(a.topk_weight_TK, b.topk_weight_TK)


def test_router_in_bf16_module_keeps_float32_math_and_bias():
    router = _router(kind="sigmoid_topk", top_k=2, bias_update_rate=1e-3).to(torch.bfloat16).eval()
    assert router.weight.dtype == torch.bfloat16
    assert router.selection_bias.dtype == torch.float32
    with torch.no_grad():
        router.selection_bias += 1e-3
    assert float(router.selection_bias[0]) == pytest.approx(1e-3, rel=1e-6)
    routing = router(torch.randn(T, D, dtype=torch.bfloat16))
    assert routing.topk_weight_TK.dtype == torch.float32


def test_jitter_only_in_training():
    router = _router(kind="switch", top_k=1, jitter_eps=0.5)
    x_TD = torch.randn(T, D)
    router.eval()
    assert torch.equal(router(x_TD).logits_TE, router(x_TD).logits_TE)
    torch.testing.assert_close(router(x_TD).logits_TE.double(), _logits64(router, x_TD), rtol=1e-5, atol=1e-5)
    router.train()
    assert not torch.equal(router(x_TD).logits_TE, router(x_TD).logits_TE)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_formula(gated):
    """Shared output = down(silu(gate x) * up x), times sigmoid(x . w) when gated (Qwen2-MoE)."""
    shared = SharedExperts(D, 20, "silu", gated).double()
    x = torch.randn(T, D, dtype=torch.float64)
    m = shared.mlp
    rows = []
    for t in range(T):
        g = x[t] @ m.gate_proj.weight.t()
        u = x[t] @ m.up_proj.weight.t()
        h = (g / (1 + torch.exp(-g))) * u
        y = h @ m.down_proj.weight.t()
        if gated:
            y = y / (1 + torch.exp(-(x[t] @ shared.gate.weight[0])))
        rows.append(y)
    torch.testing.assert_close(shared(x), torch.stack(rows))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_router_logits_of_a_bf16_input_save_no_float32_copy(weight_dtype):
    """``router_logits`` on a bf16 input gives the values and gradients of
    ``F.linear(x.float(), W.float(), b)`` and saves x in bf16 for the backward, not a float32 copy
    of (T, D)."""
    import torch.nn.functional as F

    from moekit.router.routing import router_logits

    torch.manual_seed(0)
    T, D, E = 37, 24, 6
    x = torch.randn(T, D).bfloat16().requires_grad_()
    w = torch.randn(E, D).to(weight_dtype).requires_grad_()
    b = torch.randn(E).requires_grad_()
    dout = torch.randn(T, E)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        got = router_logits(x, w, b)
    assert (torch.float32, (T, D)) not in saved and (torch.bfloat16, (T, D)) in saved
    got_grads = torch.autograd.grad(got, (x, w, b), dout)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    want = F.linear(x2.float(), w2.float(), b2)
    want_grads = torch.autograd.grad(want, (x2, w2, b2), dout)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for g, h in zip(got_grads, want_grads):
        assert g.dtype == h.dtype
        torch.testing.assert_close(g, h, rtol=0, atol=0)
