"""Layer invariants and controls: dense equivalence, capacity and drop accounting, masking,
freezing, custom experts, non-finite experts, bfloat16 and torch.compile.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import moekit
from moekit import ExpertNonFiniteError, MoE, moe_config
from moekit.dispatch import token_choice_capacity
from moekit.experts import GatedMLP

from capture_util import routed

D, F = 16, 24


def _layer(**kw) -> MoE:
    kw.setdefault("num_experts", 4)
    layer = MoE(moe_config(dim=D, expert_hidden=F, **kw))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
    return layer


def _dense_from_expert(layer: MoE, e: int) -> GatedMLP:
    dense = GatedMLP(D, F, layer.config.activation)
    with torch.no_grad():
        gate_up = layer.experts.gate_up_proj[e]
        dense.gate_proj.weight.copy_(gate_up[:F])
        dense.up_proj.weight.copy_(gate_up[F:])
        dense.down_proj.weight.copy_(layer.experts.down_proj[e])
    return dense


def test_one_expert_top1_equals_dense_gated_mlp():
    layer = _layer(num_experts=1, top_k=1)
    dense = _dense_from_expert(layer, 0)
    x = torch.randn(3, 11, D, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    y_dense = dense(x2)
    torch.testing.assert_close(y, y_dense)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_dense * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.experts.down_proj.grad[0], dense.down_proj.weight.grad)
    gate_up_grad = torch.cat([dense.gate_proj.weight.grad, dense.up_proj.weight.grad])
    torch.testing.assert_close(layer.experts.gate_up_proj.grad[0], gate_up_grad)


@pytest.mark.parametrize("policy", ["probability", "position"])
def test_dropless_equals_capacity_when_nothing_drops(policy):
    dropless = _layer(num_experts=6, top_k=3)
    capped = MoE(moe_config(dim=D, expert_hidden=F, num_experts=6, top_k=3, capacity_factor=100.0, drop_policy=policy))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(37, D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, (yb, event) = dropless(xa), routed(capped, xb)
    assert int(event.plan.num_dropped) == 0
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, pa), pb in zip(dropless.named_parameters(), capped.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=lambda m: f"{name}: {m}")


def test_masking_all_but_one_equals_that_expert():
    layer = _layer(num_experts=5, top_k=1)
    layer.mask_experts([0, 1, 3, 4])
    dense = _dense_from_expert(layer, 2)
    x = torch.randn(29, D)
    y, event = routed(layer, x)
    torch.testing.assert_close(y, dense(x))
    assert bool((event.routing.topk_idx_TK == 2).all())


def test_capacity_formula():
    # ceil(T*k/E * cf), computed by hand.
    assert token_choice_capacity(10, 2, 4, 1.25) == 7      # 6.25 -> 7
    assert token_choice_capacity(37, 3, 6, 1.0) == 19      # 18.5 -> 19
    assert token_choice_capacity(100, 3, 6, 1.0) == 50     # exactly 50
    assert token_choice_capacity(8, 1, 4, 0.5) == 1        # 1
    assert token_choice_capacity(3, 1, 8, 0.1) == 1        # never below 1


@pytest.mark.parametrize("policy", ["probability", "position"])
def test_drop_accounting_matches_hand_count(policy):
    layer = _layer(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy=policy).eval()
    with torch.no_grad():
        layer.router.weight[0] += 0.6 * layer.router.weight[1]   # skew the load onto expert 0
    x = torch.randn(30, D)
    _, event = routed(layer, x)
    idx = event.routing.topk_idx_TK.tolist()
    w = event.routing.topk_weight_TK.tolist()
    C = math.ceil(30 * 2 / 4 * 1.0)
    plan = event.plan
    expected_dropped = 0
    start = 0
    for e in range(4):
        claims = [(t, w[t][j]) for t in range(30) for j in range(2) if idx[t][j] == e]
        expected_dropped += max(0, len(claims) - C)
        if policy == "probability":
            claims.sort(key=lambda c: -c[1])
        kept = sorted(t for t, _ in claims[:C])
        n = int(plan.counts_E[e])
        assert n == min(len(claims), C)
        assert sorted(plan.token_idx_R[start:start + n].tolist()) == kept, f"expert {e}"
        start += n
    assert expected_dropped > 0
    assert int(plan.num_dropped) == expected_dropped
    assert layer.report().dropped == expected_dropped


def test_dropped_tokens_get_zero_expert_output():
    layer = _layer(num_experts=4, top_k=1, capacity_factor=0.5).eval()
    x = torch.randn(40, D)
    y, event = routed(layer, x)
    plan = event.plan
    kept = set(plan.token_idx_R.tolist())
    dropped = [t for t in range(40) if t not in kept]
    assert len(dropped) == int(plan.num_dropped) > 0
    assert bool((y[dropped] == 0).all())
    idx, w = event.routing.topk_idx_TK[:, 0], event.routing.topk_weight_TK[:, 0]
    for t in sorted(kept):
        expected = w[t] * layer.experts.expert_forward(int(idx[t]), x[t:t + 1])[0]
        torch.testing.assert_close(y[t], expected)


def test_masked_experts_never_chosen_and_weights_renormalised():
    layer = _layer(num_experts=6, top_k=2).eval()
    layer.mask_experts([1, 4])
    assert layer.masked_experts == [1, 4]
    x = torch.randn(200, D)
    r = routed(layer, x)[1].routing
    assert not bool(torch.isin(r.topk_idx_TK, torch.tensor([1, 4])).any())
    torch.testing.assert_close(r.topk_weight_TK.sum(-1), torch.ones(200))
    logits = (x.double() @ layer.router.weight.detach().double().t())
    logits[:, [1, 4]] = -math.inf
    p = torch.softmax(logits, -1)
    picked = p.gather(1, r.topk_idx_TK)
    torch.testing.assert_close(r.topk_weight_TK.double(), picked / picked.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert set(p.topk(2, dim=-1).indices.flatten().tolist()) == set(r.topk_idx_TK.flatten().tolist())
    layer.unmask_experts()
    assert layer.masked_experts == []
    assert bool(torch.isin(routed(layer, x)[1].routing.topk_idx_TK, torch.tensor([1, 4])).any())


def test_masking_too_many_experts_raises():
    layer = _layer(num_experts=6, top_k=2)
    with pytest.raises(ValueError, match=r"leaves 1 expert\(s\), fewer than top_k=2"):
        layer.mask_experts([0, 1, 2, 3, 4])
    assert layer.masked_experts == []
    with pytest.raises(IndexError, match=r"expert ids \[6\] out of range \[0, 6\)"):
        layer.mask_experts([6])


def test_masking_with_group_limited_routing():
    layer = _layer(num_experts=6, top_k=2, router="sigmoid_topk", n_group=3, topk_group=1, group_score="max")
    # Group 0 = {0, 1}: with 1 masked it could win on its max and hold only one expert for k=2.
    with pytest.raises(ValueError, match="group-limited routing"):
        layer.mask_experts([1])
    layer2 = _layer(num_experts=6, top_k=2, router="sigmoid_topk", n_group=3, topk_group=1)
    layer2.mask_experts([1])  # top2_sum: group 0 cannot score, groups 1 and 2 hold 2 each
    _, event = routed(layer2.eval(), torch.randn(100, D))
    assert not bool((event.routing.topk_idx_TK <= 1).any())


def test_frozen_experts_get_exactly_zero_grads():
    layer = _layer(num_experts=4, top_k=2, shared_experts=1)
    layer.freeze_experts([1, 3])
    assert layer.frozen_experts == [1, 3]
    x = torch.randn(64, D)
    layer(x).square().sum().backward()
    for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
        assert bool((p.grad[[1, 3]] == 0).all())
        assert bool((p.grad[[0, 2]].abs().sum(dim=(1, 2)) > 0).all())
    assert float(layer.router.weight.grad.abs().sum()) > 0
    assert float(layer.shared_experts.mlp.down_proj.weight.grad.abs().sum()) > 0
    before = layer.experts.gate_up_proj.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    after = layer.experts.gate_up_proj.detach()
    assert torch.equal(after[[1, 3]], before[[1, 3]]) and not torch.equal(after[0], before[0])
    layer.unfreeze_experts()
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert float(layer.experts.gate_up_proj.grad[1].abs().sum()) > 0


def test_freezing_survives_deepcopy():
    layer = _layer(num_experts=4, top_k=2)
    layer.freeze_experts([2])
    clone = copy.deepcopy(layer)
    layer.unfreeze_experts()
    clone(torch.randn(40, D)).sum().backward()
    assert bool((clone.experts.gate_up_proj.grad[2] == 0).all())
    assert float(clone.experts.gate_up_proj.grad[0].abs().sum()) > 0
    layer(torch.randn(40, D)).sum().backward()
    assert float(layer.experts.gate_up_proj.grad[2].abs().sum()) > 0


def test_frozen_module_experts_get_no_grad():
    experts = [nn.Sequential(nn.Linear(D, h), nn.ReLU(), nn.Linear(h, D)) for h in (4, 6, 8)]
    layer = MoE(moe_config(dim=D, num_experts=3, expert_hidden=1, top_k=2), experts=experts)
    layer.freeze_experts([0])
    layer(torch.randn(50, D)).sum().backward()
    for p in layer.experts.experts[0].parameters():
        assert p.grad is None or bool((p.grad == 0).all())
    assert all(p.grad is not None for p in layer.experts.experts[1].parameters())


def test_module_experts_count_mismatch_and_shape_errors():
    experts = [nn.Linear(D, D) for _ in range(3)]
    with pytest.raises(ValueError, match="got 3 expert modules but num_experts=4"):
        MoE(moe_config(dim=D, num_experts=4, expert_hidden=1), experts=experts)
    bad = [nn.Linear(D, D), nn.Linear(D, D + 1)]
    layer = MoE(moe_config(dim=D, num_experts=2, expert_hidden=1, top_k=2), experts=bad)
    with pytest.raises(ValueError, match=r"expert 1 \(Linear\) mapped rows of shape"):
        layer(torch.randn(5, D))


class _NaNExpert(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


def test_nonfinite_expert_is_named_with_its_layer():
    experts = [nn.Linear(D, D), nn.Linear(D, D), _NaNExpert(), nn.Linear(D, D)]
    model = nn.ModuleDict({"block0": _layer(num_experts=4, top_k=2), "block1": MoE(
        moe_config(dim=D, num_experts=4, expert_hidden=1, top_k=3), experts=experts)})
    moekit.name_moe_layers(model)
    model.eval()  # check_finite=None: the checks run in eval mode (serving), not in training
    y = model["block0"](torch.randn(20, D))
    with pytest.raises(ExpertNonFiniteError, match=r"block1: expert\(s\) \[2\] produced NaN/Inf") as info:
        model["block1"](y)
    assert info.value.experts == [2] and info.value.layer == "block1"
    assert model["block1"].report().nonfinite_experts == [2]
    model["block1"].mask_experts(info.value.experts)
    assert bool(torch.isfinite(model["block1"](y)).all())


def _bf16_representable(layer: MoE) -> MoE:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_bf16_forward_backward_close_to_fp32():
    """bfloat16 keeps 8 significant bits (eps 2^-8 = 3.9e-3); through two expert products and
    the combine we allow 1% relative error (norm-wise) on outputs and gradients (measured: about
    3e-3 to 4e-3). Weights and inputs are bf16-representable, so the float32 router picks the
    same experts in both."""
    layer32 = _bf16_representable(_layer(num_experts=6, top_k=2, shared_experts=1))
    layer16 = copy.deepcopy(layer32).to(torch.bfloat16)
    x = torch.randn(64, D).to(torch.bfloat16)
    x32 = x.float().requires_grad_(True)
    x16 = x.clone().requires_grad_(True)
    (y32, event32), (y16, event16) = routed(layer32, x32), routed(layer16, x16)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(event32.routing.topk_idx_TK, event16.routing.topk_idx_TK)
    assert _rel(y16, y32) < 1e-2
    g = torch.randn(64, D).to(torch.bfloat16)
    (y32 * g.float()).sum().backward()
    (y16 * g).sum().backward()
    assert _rel(x16.grad, x32.grad) < 1e-2
    for (name, p32), p16 in zip(layer32.named_parameters(), layer16.parameters()):
        assert p16.grad.dtype == torch.bfloat16
        assert _rel(p16.grad, p32.grad) < 1e-2, name


def _compile_check(backend: str) -> None:
    layer = _layer(num_experts=4, top_k=2, shared_experts=1)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend=backend)
    x = torch.randn(2, 9, D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = eager(xa), compiled(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, eager.router.weight.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_aot_eager_matches_eager():
    _compile_check("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    _compile_check("inductor")


@pytest.mark.parametrize("backend", ["auto", "loop", "reference"])
def test_nonfinite_stacked_expert_is_named(backend):
    layer = _layer(num_experts=4, top_k=2, backend=backend, check_finite=True)
    with torch.no_grad():
        layer.experts.down_proj[1, 0, 0] = float("inf")
    x = torch.randn(40, D)
    with pytest.raises(ExpertNonFiniteError, match=r"MoE: expert\(s\) \[1\] produced NaN/Inf") as info:
        layer(x)
    assert info.value.experts == [1]
