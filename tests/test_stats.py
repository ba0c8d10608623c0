"""Routing health statistics against direct computation, and the collapse/dead warnings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import moekit
from moekit import MoE, RoutingCollapseWarning, moe_config

from capture_util import routed as run_routed

D = 8


def _layer(**kw) -> MoE:
    kw.setdefault("num_experts", 5)
    kw.setdefault("top_k", 2)
    layer = MoE(moe_config(dim=D, expert_hidden=8, **kw))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
    return layer.eval()


def test_report_matches_direct_computation_over_two_passes():
    layer = _layer(capacity_factor=1.0)
    tokens = torch.zeros(5, dtype=torch.float64)
    routed = torch.zeros(5, dtype=torch.float64)
    co = torch.zeros(5, 5, dtype=torch.float64)
    entropies, zs = [], []
    for T in (30, 17):
        x = torch.randn(T, D)
        _, event = run_routed(layer, x)
        logits = x.double() @ layer.router.weight.detach().double().t()
        p = torch.softmax(logits, -1)
        entropies += (-(p * p.log()).sum(-1)).tolist()
        zs += torch.logsumexp(logits, -1).square().tolist()
        idx = event.routing.topk_idx_TK
        routed += torch.bincount(idx.flatten(), minlength=5).double()
        tokens += event.plan.counts_E.double()
        hit = torch.zeros(T, 5, dtype=torch.float64).scatter(1, idx, 1.0)
        co += hit.t() @ hit
    r = layer.report()
    assert r.forward_passes == 2
    assert r.tokens_per_expert == tokens.tolist()
    assert r.assignments == int(routed.sum()) == (30 + 17) * 2
    assert r.dropped == int((routed - tokens).sum()) > 0
    assert r.dropped_fraction == pytest.approx(r.dropped / r.assignments)
    assert r.utilization == pytest.approx((tokens / tokens.sum()).tolist())
    assert r.mean_entropy == pytest.approx(sum(entropies) / len(entropies), rel=1e-5)
    assert r.max_entropy == pytest.approx(math.log(5))
    assert r.mean_router_z == pytest.approx(sum(zs) / len(zs), rel=1e-5)
    assert r.max_over_mean_load == pytest.approx(float(tokens.max() / tokens.mean()))
    assert r.top_expert_share == pytest.approx(float(tokens.max() / tokens.sum()))
    assert r.coactivation == co.tolist()
    assert r.dead_experts == [] and r.nonfinite_experts == []
    layer.reset_stats()
    r = layer.report()
    assert r.forward_passes == 0 and r.assignments == 0 and sum(r.tokens_per_expert) == 0


def test_sigmoid_entropy_uses_normalised_scores():
    layer = _layer(router="sigmoid_topk")
    x = torch.randn(20, D)
    layer(x)
    s = torch.sigmoid(x.double() @ layer.router.weight.detach().double().t())
    p = s / s.sum(-1, keepdim=True)
    expected = float((-(p * p.log()).sum(-1)).mean())
    assert layer.report().mean_entropy == pytest.approx(expected, rel=1e-5)


def _dead_layer(window: int) -> MoE:
    layer = _layer(num_experts=4, top_k=1, logit_bias=True, dead_window=window)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1e4]))   # expert 3 never chosen
    return layer


def test_dead_expert_reported_after_window_and_warned():
    model = nn.ModuleDict({"moe": _dead_layer(window=3)})
    for i in range(3):
        model["moe"](torch.randn(40, D))
        dead = model["moe"].report().dead_experts
        assert dead == ([3] if i == 2 else [])
    with pytest.warns(RoutingCollapseWarning, match=r"moe: experts \[3\] received no tokens in the last 3"):
        reports = moekit.routing_report(model)
    assert reports["moe"].dead_experts == [3]


def test_masked_expert_is_not_reported_dead():
    layer = _dead_layer(window=1)
    layer.mask_experts([3])
    layer(torch.randn(40, D))
    assert layer.report().dead_experts == []


def test_collapse_warning_fires_when_one_expert_dominates():
    layer = _layer(num_experts=4, top_k=1, logit_bias=True)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([1e4, 0.0, 0.0, 0.0]))
    layer(torch.randn(40, D))
    with pytest.warns(RoutingCollapseWarning, match=r"expert 0 serves 100% of tokens .*collapsing"):
        moekit.routing_report(layer)


def test_no_warning_when_balanced():
    layer = _layer(num_experts=4, top_k=2, dead_window=5)
    for _ in range(5):
        layer(torch.randn(200, D))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoutingCollapseWarning)
        report = moekit.routing_report(layer)["MoE"]
    assert report.max_over_mean_load < 2.0 and report.dead_experts == []


def test_stats_stay_exact_after_bf16_cast():
    layer = _layer(num_experts=2, top_k=1).to(torch.bfloat16)
    assert layer.stats.tokens_E.dtype == torch.float64
    for _ in range(3):
        layer(torch.randn(301, D, dtype=torch.bfloat16))
    r = layer.report()
    assert sum(r.tokens_per_expert) == 903.0 and r.assignments == 903
    assert sum(r.coactivation[e][e] for e in range(2)) == 903.0


@pytest.mark.parametrize("kw", [{"capacity_factor": 1.0}, {"score_func": "sigmoid"}, {"router": "expert_choice", "capacity_factor": 1.0}])
def test_deferred_updates_give_the_totals_of_updating_every_pass(kw):
    """``defer_updates(4)`` over 11 passes of varied sizes (some with padding, one expert masked for
    a stretch so it idles): every buffer equals updating pass by pass (counts exactly, float sums to
    rounding), whether read mid-block (which adds the waiting passes) or at the end."""
    torch.manual_seed(0)
    eager, deferred = _layer(**kw), _layer(**kw)
    deferred.load_state_dict(eager.state_dict())
    deferred.stats.defer_updates(4)
    for i, T in enumerate((9, 3, 14, 1, 6, 20, 2, 7, 5, 11, 4)):
        if i == 2:
            eager.mask_experts([4])
            deferred.mask_experts([4])
        if i == 8:
            eager.unmask_experts([4])
            deferred.unmask_experts([4])
        x = torch.randn(T, D)
        mask = (torch.rand(T) > 0.3) if i % 3 == 0 else None
        with torch.no_grad():
            eager(x, token_mask=mask)
            deferred(x, token_mask=mask)
        if i == 5:  # a read in the middle of a block adds the waiting passes
            assert deferred.stats._pending
            assert torch.equal(deferred.stats.tokens_E, eager.stats.tokens_E)
            assert not deferred.stats._pending
    assert len(deferred.stats._pending) == 1  # passes 10 and 11 went in with the block closed at pass 10
    for name, want in eager.stats.named_buffers():
        got = getattr(deferred.stats, name)
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=name)
        else:
            assert torch.equal(got, want), name
    assert int(deferred.stats.idle_steps_E[4]) == int(eager.stats.idle_steps_E[4])
    assert deferred.stats.forward_passes == 11
    with pytest.raises(ValueError, match="every=0 must be an int >= 1"):
        deferred.stats.defer_updates(0)


def test_deferred_updates_add_a_training_forward_at_once():
    """A forward whose router scores carry gradients is added at once, with the no-grad passes
    waiting before it: a deferred list would keep its autograd graph alive."""
    eager, deferred = _layer(), _layer()
    deferred.load_state_dict(eager.state_dict())
    deferred.stats.defer_updates(8)
    xs = [torch.randn(T, D) for T in (5, 9, 4)]
    with torch.no_grad():
        for layer in (eager, deferred):
            layer(xs[0])
            layer(xs[1])
    assert len(deferred.stats._pending) == 2
    for layer in (eager, deferred):
        layer(xs[2]).sum().backward()
    assert deferred.stats.__dict__["_pending"] == []  # read without flushing: nothing waits
    assert torch.equal(deferred.stats.tokens_E, eager.stats.tokens_E)
    torch.testing.assert_close(deferred.stats.entropy_sum, eager.stats.entropy_sum, rtol=1e-6, atol=1e-9)
    assert deferred.stats.forward_passes == 3
