"""Balancing losses against hand-computed worked examples and other projects' formulas.

Shape legend: T tokens, E experts, K top-k, B sequences of S tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import moekit
from moekit.balance import losses as L
from moekit.router import Routing

from capture_util import captured, routed

# Worked example: 4 tokens, 3 experts, k=2. Rows are softmax probabilities.
PROBS = [[0.50, 0.30, 0.20],   # top-2: 0, 1
         [0.10, 0.60, 0.30],   # top-2: 1, 2
         [0.25, 0.15, 0.60],   # top-2: 2, 0
         [0.70, 0.20, 0.10]]   # top-2: 0, 1
TOP2 = [[0, 1], [1, 2], [2, 0], [0, 1]]
# P = column means = [0.3875, 0.3125, 0.3]; top-2 counts = [3, 3, 2]; top-1 counts = [2, 1, 1].


def _example_routing(weights=None) -> Routing:
    probs = torch.tensor(PROBS, dtype=torch.float64)
    idx = torch.tensor(TOP2)
    w = probs.gather(1, idx) if weights is None else torch.tensor(weights, dtype=torch.float64)
    return Routing(logits_TE=probs.log(), scores_TE=probs, topk_idx_TK=idx, topk_weight_TK=w)


def test_switch_aux_conventions_worked_example():
    r = _example_routing()
    # moekit / megatron: 3 * (3/8*0.3875 + 3/8*0.3125 + 2/8*0.3) = 3 * 0.3375
    assert float(L.switch_aux_loss(r, 3, "moekit")) == pytest.approx(1.0125, abs=1e-12)
    assert float(L.switch_aux_loss(r, 3, "megatron")) == pytest.approx(1.0125, abs=1e-12)
    # switch: top-1 shares [2/4, 1/4, 1/4]: 3 * (0.19375 + 0.078125 + 0.075)
    assert float(L.switch_aux_loss(r, 3, "switch")) == pytest.approx(1.040625, abs=1e-12)
    # mixtral (one layer): shares over T = [3/4, 3/4, 2/4]: 3 * 0.675
    assert float(L.switch_aux_loss(r, 3, "mixtral")) == pytest.approx(2.025, abs=1e-12)
    assert float(L.pooled_mixtral_aux_loss([r], 3)) == pytest.approx(2.025, abs=1e-12)


def test_switch_aux_is_one_at_perfect_balance():
    E, K = 4, 2
    probs = torch.full((8, E), 1 / E, dtype=torch.float64)
    idx = torch.tensor([[t % E, (t + 1) % E] for t in range(8)])
    r = Routing(logits_TE=probs.log(), scores_TE=probs, topk_idx_TK=idx, topk_weight_TK=probs.gather(1, idx))
    for convention in ("moekit", "switch", "megatron"):
        assert float(L.switch_aux_loss(r, E, convention)) == pytest.approx(1.0)
    assert float(L.switch_aux_loss(r, E, "mixtral")) == pytest.approx(K)
    assert L.perfect_balance_value("mixtral", K) == K and L.perfect_balance_value("moekit", K) == 1.0
    # Expert 3 masked: balanced over the other 3, the value is E/E' = 4/3 (documented in docs/layer.md).
    probs = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]] * 6, dtype=torch.float64)
    idx = torch.tensor([[t % 3, (t + 1) % 3] for t in range(6)])
    r = Routing(logits_TE=probs.log(), scores_TE=probs, topk_idx_TK=idx, topk_weight_TK=probs.gather(1, idx))
    assert float(L.switch_aux_loss(r, E, "moekit")) == pytest.approx(4 / 3)
    assert float(L.cv_squared(torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64))) == pytest.approx(4 / 3 - 1)


def test_aux_loss_gradient_flows_through_probabilities_only():
    logits = torch.tensor(PROBS, dtype=torch.float64).log().requires_grad_(True)
    probs = torch.softmax(logits, -1)
    idx = torch.tensor(TOP2)
    r = Routing(logits_TE=logits, scores_TE=probs, topk_idx_TK=idx, topk_weight_TK=probs.gather(1, idx))
    L.switch_aux_loss(r, 3, "moekit").backward()
    # d/dP_i = E * f_i / T per token; chain through softmax: J^T (E f / T).
    f = torch.tensor([3 / 8, 3 / 8, 2 / 8], dtype=torch.float64)
    g_TE = (3 * f / 4).expand(4, 3)
    p = probs.detach()
    expected = p * (g_TE - (p * g_TE).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected)


def test_z_loss_worked_example():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2), math.log(5)]])
    # logsumexp rows: ln 3 and ln(1 + 2 + 5) = ln 8.
    expected = (math.log(3) ** 2 + math.log(8) ** 2) / 2
    assert float(L.z_loss(logits)) == pytest.approx(expected, rel=1e-6)


def test_cv_squared_importance_and_load_worked_example():
    # k=1, no noise: gates t0 e0 0.5, t1 e1 0.6, t2 e2 0.6, t3 e0 0.7.
    probs = torch.tensor(PROBS, dtype=torch.float64)
    idx = torch.tensor([[0], [1], [2], [0]])
    w = torch.tensor([[0.5], [0.6], [0.6], [0.7]], dtype=torch.float64)
    r = Routing(logits_TE=probs.log(), scores_TE=probs, topk_idx_TK=idx, topk_weight_TK=w)
    # importance [1.2, 0.6, 0.6]: mean 0.8, population var 0.08, CV^2 = 0.125.
    torch.testing.assert_close(L.importance(r, 3), torch.tensor([1.2, 0.6, 0.6], dtype=torch.float64))
    assert float(L.cv_squared(L.importance(r, 3))) == pytest.approx(0.125, rel=1e-8)
    # load = counts [2, 1, 1]: mean 4/3, var 2/9, CV^2 = 0.125.
    torch.testing.assert_close(L.smooth_load(r, 3, 1), torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    assert float(L.cv_squared_loss(r, 3, 1)) == pytest.approx(0.25, rel=1e-8)


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_smooth_load_estimator_worked_example():
    """Shazeer et al. 2017 eq. 8-10, k=1, noise std 0.5.

    t0: noisy [1.2, 0.3, 0.1] keeps e0; threshold for e0 = best other = 0.3, for e1, e2 = 1.2.
    t1: noisy [0.1, 0.9, -0.2] keeps e1; threshold for e1 = 0.1, for e0, e2 = 0.9.
    """
    clean = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.4, 0.0]], dtype=torch.float64, requires_grad=True)
    noisy = torch.tensor([[1.2, 0.3, 0.1], [0.1, 0.9, -0.2]], dtype=torch.float64)
    std = torch.full((2, 3), 0.5, dtype=torch.float64)
    r = Routing(logits_TE=clean, scores_TE=torch.softmax(noisy, -1), topk_idx_TK=torch.tensor([[0], [1]]),
                topk_weight_TK=torch.ones(2, 1, dtype=torch.float64), noise_std_TE=std, noisy_logits_TE=noisy)
    expected = [_phi((1.0 - 0.3) / 0.5) + _phi((0.2 - 0.9) / 0.5),
                _phi((0.5 - 1.2) / 0.5) + _phi((0.4 - 0.1) / 0.5),
                _phi((0.0 - 1.2) / 0.5) + _phi((0.0 - 0.9) / 0.5)]
    load = L.smooth_load(r, 3, 1)
    torch.testing.assert_close(load, torch.tensor(expected, dtype=torch.float64))
    load.sum().backward()
    assert clean.grad is not None and bool((clean.grad > 0).all())


def test_smooth_load_top2_uses_kth_excluding():
    clean = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    noisy = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    std = torch.ones(1, 4, dtype=torch.float64)
    r = Routing(logits_TE=clean, scores_TE=torch.softmax(noisy, -1), topk_idx_TK=torch.tensor([[0, 1]]),
                topk_weight_TK=torch.ones(1, 2, dtype=torch.float64), noise_std_TE=std, noisy_logits_TE=noisy)
    # In the top-2 (e0, e1): threshold = 2nd largest of the others = 0.2; out (e2, e3): 0.3.
    expected = [_phi(-0.2), _phi(-0.2), _phi(-0.3), _phi(-0.3)]
    torch.testing.assert_close(L.smooth_load(r, 4, 2), torch.tensor(expected, dtype=torch.float64))


def test_smooth_load_ignores_masked_experts():
    """Expert 1 masked (noisy logit -inf): its load is 0 and it sets no threshold."""
    inf = math.inf
    clean = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    noisy = torch.tensor([[0.4, -inf, 0.2, 0.1]], dtype=torch.float64)
    std = torch.ones(1, 4, dtype=torch.float64, requires_grad=True)

    def routing(k: int) -> Routing:
        return Routing(logits_TE=clean, scores_TE=torch.softmax(noisy, -1), topk_idx_TK=noisy.topk(k).indices,
                       topk_weight_TK=torch.ones(1, k, dtype=torch.float64), noise_std_TE=std,
                       noisy_logits_TE=noisy)

    # k=2 among e0, e2, e3: kept e0, e2 (threshold 0.1, the best other); out e3 (threshold 0.2).
    expected = [_phi(-0.1), 0.0, _phi(-0.1), _phi(-0.2)]
    torch.testing.assert_close(L.smooth_load(routing(2), 4, 2), torch.tensor(expected, dtype=torch.float64))
    # k=3 with 3 experts left: each is certain to be picked; gradients stay finite.
    load = L.smooth_load(routing(3), 4, 3)
    torch.testing.assert_close(load, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    load.sum().backward()
    assert bool(torch.isfinite(clean.grad).all()) and bool(torch.isfinite(std.grad).all())


def test_noisy_layer_masks_noisy_logits_for_the_load_estimate():
    layer = moekit.MoE(dim=8, num_experts=5, expert_hidden=8, router="noisy_topk", top_k=2, cv_loss_coef=0.1).train()
    layer.mask_experts([3])
    r = routed(layer, torch.randn(30, 8))[1].routing
    assert bool((r.noisy_logits_TE[:, 3] == -math.inf).all())
    assert float(L.smooth_load(r, 5, 2)[3]) == 0.0
    assert bool(torch.isfinite(layer.aux_loss))


def test_deepseek_sequence_aux_loss_worked_example():
    # 2 sequences of 2 tokens, 3 experts, k=1, sigmoid scores s (normalised per token to s').
    s = torch.tensor([[0.8, 0.4, 0.4],     # s' [0.5, 0.25, 0.25] -> e0
                      [0.2, 0.6, 0.2],     # s' [0.2, 0.6, 0.2]   -> e1
                      [0.5, 0.25, 0.25],   # -> e0
                      [0.5, 0.25, 0.25]], dtype=torch.float64)  # -> e0
    idx = torch.tensor([[0], [1], [0], [0]])
    r = Routing(logits_TE=torch.logit(s), scores_TE=s, topk_idx_TK=idx, topk_weight_TK=s.gather(1, idx),
                score_func="sigmoid")
    # seq 0: f = 3/2 * [1, 1, 0], P = [0.35, 0.425, 0.225] -> 1.1625
    # seq 1: f = 3/2 * [2, 0, 0], P = [0.5, 0.25, 0.25]    -> 1.5
    assert float(L.sequence_aux_loss(r, 3, batch=2)) == pytest.approx((1.1625 + 1.5) / 2, abs=1e-12)
    # As one sequence of 4: f = 3/4 * [3, 1, 0], P = [0.425, 0.3375, 0.2375].
    assert float(L.sequence_aux_loss(r, 3, batch=1)) == pytest.approx(0.75 * (3 * 0.425 + 0.3375), abs=1e-12)
    with pytest.raises(ValueError, match="do not split into 3 sequences"):
        L.sequence_aux_loss(r, 3, batch=3)


def _layer(convention: str, kind: str = "softmax_topk", **kw) -> moekit.MoE:
    top_k = kw.pop("top_k", 2)
    return moekit.MoE(dim=8, num_experts=6, expert_hidden=8, router=kind, top_k=top_k, aux_loss_coef=0.02,
                      aux_loss_convention=convention, **kw).train()


@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_topk"])
def test_megatron_convention_matches_megatron_formula(kind):
    """Megatron-Core moe_utils: probs from compute_routing_scores_for_aux_loss (softmax, or sigmoid
    divided by its row sum), routing_map = top-k of those probs, and
    loss = sum_i (sum_t probs_ti) * tokens_per_expert_i * E / (k * T^2)."""
    layer = _layer("megatron", kind, top_k=3)
    logits = routed(layer, torch.randn(2, 25, 8))[1].routing.logits_TE.double()
    T, E, k = logits.shape[0], 6, 3
    if kind == "softmax_topk":
        probs = torch.softmax(logits, -1)
    else:
        probs = torch.sigmoid(logits)
        probs = probs / probs.sum(-1, keepdim=True)
    routing_map = torch.zeros(T, E).scatter(1, probs.topk(k, dim=1).indices, 1.0).double()
    expected = (probs.sum(0) * routing_map.sum(0)).sum() * E / (k * T * T)
    assert float(layer.last_losses["aux"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(layer.aux_loss.detach()) == pytest.approx(0.02 * float(expected), rel=1e-5)


def _biased_layer_output(convention: str, kind: str):
    """A layer whose selection bias moves its picks away from the plain top-k of the scores."""
    layer = moekit.MoE(dim=8, num_experts=6, expert_hidden=8, router=kind, top_k=2, aux_loss_coef=0.02,
                       aux_loss_convention=convention, bias_update_rate=1e-3, seq_aux_loss_coef=0.1).train()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
        layer.router.selection_bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0, 0.0, -0.3]))
    r = routed(layer, torch.randn(4, 10, 8))[1].routing
    probs = torch.softmax(r.logits_TE.double(), -1) if kind == "softmax_topk" else torch.sigmoid(r.logits_TE.double())
    probs = probs / probs.sum(-1, keepdim=True)
    plain = probs.topk(2, dim=-1).indices
    assert not torch.equal(r.topk_idx_TK.sort(-1).values, plain.sort(-1).values), "the bias must change picks"
    return layer, r, probs, plain


# transformers' load_balancing_loss_func takes a softmax of the logits, so mixtral is checked on softmax only.
@pytest.mark.parametrize("convention,kind", [(c, k) for c in ("moekit", "switch", "megatron")
                                             for k in ("softmax_topk", "sigmoid_topk")] + [("mixtral", "softmax_topk")])
def test_conventions_under_a_selection_bias(convention, kind):
    """moekit counts the layer's own (biased) picks; Switch, Megatron-Core and transformers count the
    top-k of the plain scores, so each convention follows its project even under aux-loss-free bias."""
    layer, r, probs, plain = _biased_layer_output(convention, kind)
    T, E, k = probs.shape[0], 6, 2
    if convention == "moekit":
        f = torch.bincount(r.topk_idx_TK.flatten(), minlength=E).double() / (k * T)
        expected = E * (f * probs.mean(0)).sum()
    elif convention == "switch":
        f = torch.bincount(probs.argmax(-1), minlength=E).double() / T
        expected = E * (f * probs.mean(0)).sum()
    elif convention == "megatron":
        routing_map = torch.zeros(T, E, dtype=torch.float64).scatter(1, plain, 1.0)
        expected = (probs.sum(0) * routing_map.sum(0)).sum() * E / (k * T * T)
    else:
        expected = load_balancing_loss_func((r.logits_TE,), num_experts=E, top_k=k)
    total = float(moekit.aux_loss(layer).detach())
    seq = float(layer.last_losses["seq_aux"])
    assert total == pytest.approx(0.02 * float(expected) + 0.1 * seq, rel=1e-5)


def test_sequence_aux_loss_counts_the_plain_top_k():
    """DeepSeek-V3 eq. 18: the indicator is s_it in TopK(s_t), without the selection bias."""
    layer, r, probs, plain = _biased_layer_output("moekit", "sigmoid_topk")
    E, k, B, S = 6, 2, 4, 10
    values = []
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        f = torch.bincount(plain[rows].flatten(), minlength=E).double() * E / (k * S)
        values.append(float((f * probs[rows].mean(0)).sum()))
    assert float(layer.last_losses["seq_aux"]) == pytest.approx(sum(values) / B, rel=1e-5)


def test_switch_convention_counts_top1_choice():
    layer = _layer("switch", top_k=2)
    logits = routed(layer, torch.randn(50, 8))[1].routing.logits_TE.double()
    probs = torch.softmax(logits, -1)
    f = torch.bincount(probs.argmax(-1), minlength=6).double() / 50
    expected = 6 * (f * probs.mean(0)).sum()
    assert float(layer.last_losses["aux"]) == pytest.approx(float(expected), rel=1e-5)


def test_moekit_convention_is_share_of_assignments():
    layer = _layer("moekit", top_k=3)
    r = routed(layer, torch.randn(40, 8))[1].routing
    f = torch.bincount(r.topk_idx_TK.reshape(-1), minlength=6).double() / (40 * 3)
    expected = 6 * (f * torch.softmax(r.logits_TE.double(), -1).mean(0)).sum()
    assert float(layer.last_losses["aux"]) == pytest.approx(float(expected), rel=1e-5)


def test_mixtral_convention_matches_transformers_pooled_over_layers():
    torch.manual_seed(3)
    model = nn.Sequential(_layer("mixtral"), _layer("mixtral"))
    with torch.no_grad():
        for layer in model:
            layer.router.weight.normal_(0.0, 0.5)
    _, cap = captured(model, torch.randn(3, 7, 8))
    gate_logits = tuple(cap.last(name).routing.logits_TE for name in cap.names)
    expected = load_balancing_loss_func(gate_logits, num_experts=6, top_k=2)
    # Pooled is not the mean of per-layer values (f and P multiply after pooling).
    per_layer = [load_balancing_loss_func((g,), num_experts=6, top_k=2) for g in gate_logits]
    assert abs(float(expected) - float(sum(per_layer)) / 2) > 1e-4
    for layer in model:
        assert float(layer.aux_loss) == 0.0
    total = moekit.aux_loss(model)
    assert float(total.detach()) == pytest.approx(0.02 * float(expected), rel=1e-5)
    total.backward()
    assert model[0].router.weight.grad is not None and model[1].router.weight.grad is not None


def test_aux_loss_sums_per_layer_and_pools_mixtral_groups():
    """Per-layer conventions add up; mixtral layers pool by (num_experts, coefficient) only."""
    torch.manual_seed(4)
    mix_a, mix_b = _layer("mixtral"), _layer("mixtral")
    mix_c = moekit.MoE(dim=8, num_experts=4, expert_hidden=8, top_k=2, aux_loss_coef=0.05,
                       aux_loss_convention="mixtral").train()
    ec = moekit.MoE(dim=8, num_experts=4, expert_hidden=8, router="expert_choice", capacity_factor=1.0,
                    aux_loss_convention="mixtral", z_loss_coef=0.1).train()
    model = nn.Sequential(_layer("moekit"), mix_a, _layer("switch"), mix_b, mix_c, ec)
    _, cap = captured(model, torch.randn(2, 9, 8))
    per_layer = sum(float(layer.aux_loss.detach()) for layer in model)
    gate = [cap.last(name).routing.logits_TE for name in ("1", "3")]
    pooled_ab = 0.02 * float(load_balancing_loss_func(tuple(gate), num_experts=6, top_k=2))
    pooled_c = 0.05 * float(load_balancing_loss_func((cap.last("4").routing.logits_TE,), num_experts=4, top_k=2))
    # Expert choice has no switch loss, so it joins no pool; its z-loss is its own.
    ec_logits = cap.last("5").routing.logits_TE
    assert float(ec.aux_loss.detach()) == pytest.approx(0.1 * float(L.z_loss(ec_logits)), rel=1e-6)
    total = float(moekit.aux_loss(model).detach())
    assert total == pytest.approx(per_layer + pooled_ab + pooled_c, rel=1e-5)


def test_layer_sums_weighted_losses():
    layer = moekit.MoE(dim=8, num_experts=6, expert_hidden=8, router="noisy_topk", top_k=2, aux_loss_coef=0.1,
                       z_loss_coef=0.01, cv_loss_coef=0.5, seq_aux_loss_coef=0.2).train()
    r = routed(layer, torch.randn(2, 10, 8))[1].routing
    terms = layer.last_losses
    assert set(terms) == {"aux", "z", "cv", "seq_aux"}
    torch.testing.assert_close(terms["z"], L.z_loss(r.logits_TE))
    # Training noise is on, so the CV loss uses the smooth load estimator.
    assert r.noise_std_TE is not None
    torch.testing.assert_close(terms["cv"], L.cv_squared_loss(r, 6, 2))
    torch.testing.assert_close(terms["seq_aux"], L.sequence_aux_loss(r, 6, batch=2))
    expected = 0.1 * terms["aux"] + 0.01 * terms["z"] + 0.5 * terms["cv"] + 0.2 * terms["seq_aux"]
    torch.testing.assert_close(layer.aux_loss.detach(), expected)
    layer.eval()
    layer(torch.randn(2, 10, 8))
    assert float(layer.aux_loss) == 0.0 and layer.last_losses == {}


# ---------------------------------------------------------------- aux-loss-free bias (DeepSeek-V3)
def _biased_layer(rate: float = 0.01) -> moekit.MoE:
    layer = moekit.MoE(dim=8, num_experts=4, expert_hidden=8, router="sigmoid_topk", top_k=1,
                       bias_update_rate=rate, aux_loss_coef=0.0).train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0   # expert 0 wins whenever x[0] > 0: overloaded
    return layer


def test_bias_update_direction_and_no_autograd():
    layer = _biased_layer(0.01)
    x = torch.randn(64, 8)
    x[:, 0] = x[:, 0].abs() + 0.1
    counts = torch.bincount(routed(layer, x)[1].routing.topk_idx_TK.reshape(-1), minlength=4)
    assert counts.tolist() == [64, 0, 0, 0]
    moekit.update_router_biases(layer)
    b = layer.router.selection_bias
    assert not b.requires_grad
    # b_i += u * sign(mean(c) - c_i): overloaded expert 0 goes down, the idle ones up.
    torch.testing.assert_close(b, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert int(layer.bias_load_E.sum()) == 0
    moekit.update_router_biases(layer)  # no new counts: no change
    torch.testing.assert_close(b, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_bias_counts_accumulate_over_micro_batches():
    layer = _biased_layer(0.05)
    with torch.no_grad():
        layer.router.weight.normal_()
    total = torch.zeros(4, dtype=torch.long)
    for _ in range(3):
        out, event = routed(layer, torch.randn(16, 8))
        out.sum().backward()
        total += torch.bincount(event.routing.topk_idx_TK.reshape(-1), minlength=4)
    torch.testing.assert_close(layer.bias_load_E, total)
    layer.eval()
    layer(torch.randn(16, 8))  # evaluation does not count
    torch.testing.assert_close(layer.bias_load_E, total)
    moekit.update_router_biases(layer)
    expected = 0.05 * torch.sign(total.double().mean() - total.double())
    torch.testing.assert_close(layer.router.selection_bias.double(), expected)


def test_bias_update_skips_masked_experts():
    layer = _biased_layer(0.01)
    layer.mask_experts([3])
    x = torch.randn(32, 8)
    x[:, 0] = x[:, 0].abs() + 0.1
    layer(x)
    moekit.update_router_biases(layer)
    torch.testing.assert_close(layer.router.selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.0]))


def test_bias_update_survives_bf16_cast():
    layer = _biased_layer(1e-3).to(torch.bfloat16)
    x = torch.randn(300, 8, dtype=torch.bfloat16)
    x[:, 0] = x[:, 0].abs() + 0.1
    layer(x)
    layer(x)
    assert int(layer.bias_load_E[0]) == 600   # exact count, past bfloat16's 256 integer range
    with torch.no_grad():
        layer.router.selection_bias.fill_(0.5)
    moekit.update_router_biases(layer)
    assert float(layer.router.selection_bias[0]) == pytest.approx(0.499, abs=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_router_logsumexp_z_loss_value_and_gradient_match_float64(masked):
    """The router's logsumexp (from its softmax, no second pass) and the z-loss built on it equal
    torch.logsumexp's in float64, value and gradient to the router weight, with a token mask."""
    torch.manual_seed(3)
    layer = moekit.MoE(dim=8, num_experts=6, expert_hidden=8, top_k=2, aux_loss_coef=0.0, z_loss_coef=1.0).train()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 2.0)
    x = torch.randn(3, 10, 8)
    mask = (torch.rand(3, 10) > 0.3) if masked else None
    routing = layer.router(x.reshape(-1, 8))
    assert routing.logsumexp_T is not None
    ref_logits = x.reshape(-1, 8).double() @ layer.router.weight.detach().double().t()
    torch.testing.assert_close(routing.logsumexp_T.double(), torch.logsumexp(ref_logits, -1), rtol=1e-6, atol=1e-6)
    layer(x, mask)
    w = layer.router.weight.detach().double().requires_grad_()
    valid = None if mask is None else mask.reshape(-1)
    ref = L.z_loss(x.reshape(-1, 8).double() @ w.t(), valid)
    ref.backward()
    layer.aux_loss.backward()
    torch.testing.assert_close(layer.aux_loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.router.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)


def test_router_logsumexp_only_where_scores_are_the_softmax_of_the_logits():
    layer = moekit.MoE(dim=8, num_experts=6, expert_hidden=8, top_k=2, z_loss_coef=1.0).train()
    x = torch.randn(12, 8)
    assert layer.router(x).logsumexp_T is not None
    layer.mask_experts([1])
    assert layer(x) is not None and layer.router(x, layer.available_E).logsumexp_T is None
    noisy = moekit.MoE(dim=8, num_experts=6, expert_hidden=8, router="noisy_topk", top_k=2).train()
    assert noisy.router(x).logsumexp_T is None
    sigmoid = moekit.MoE(dim=8, num_experts=6, expert_hidden=8, router="sigmoid_topk", top_k=2).train()
    assert sigmoid.router(x).logsumexp_T is None
