"""The layer's fast path against the per-token float64 loop in moekit.reference: outputs and the
gradients of the input and of every weight (router, experts, shared experts).

Shape legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from moekit import MoE, moe_config
from moekit.model_ops import capture_routing
from moekit.reference import reference_forward

D, F = 16, 24

# (id, config keywords, input shape); sizes are deliberately awkward (37 tokens, T=100 with k=3, E=6).
CASES = [
    ("softmax_k3_T100", dict(num_experts=6, top_k=3), (4, 25, D)),
    ("qwen_norenorm_gated_shared", dict(num_experts=6, top_k=2, norm_topk_prob=False, shared_experts=1,
                                       shared_expert_gated=True), (37, D)),
    ("capacity_probability", dict(num_experts=6, top_k=3, capacity_factor=1.0, drop_policy="probability"),
     (4, 25, D)),
    ("capacity_position", dict(num_experts=6, top_k=3, capacity_factor=1.0, drop_policy="position"), (4, 25, D)),
    ("deepseek_v3", dict(router="sigmoid_topk", num_experts=8, top_k=3, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, shared_experts=2), (37, D)),
    ("switch_capacity", dict(router="switch", num_experts=6, capacity_factor=1.25), (37, D)),
    ("expert_choice", dict(router="expert_choice", num_experts=6, capacity_factor=1.5), (37, D)),
    ("mlp_gelu", dict(num_experts=6, top_k=2, expert_kind="mlp", activation="gelu"), (37, D)),
    ("noisy_eval", dict(router="noisy_topk", num_experts=6, top_k=2), (37, D)),
    ("logit_bias_k1", dict(num_experts=5, top_k=1, logit_bias=True), (37, D)),
]


def _layer(kw: dict, backend: str = "auto") -> MoE:
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=D, expert_hidden=F, backend=backend, **kw))
    with torch.no_grad():
        # A decisive router (no near-ties between float32 and float64) with non-trivial weights.
        layer.router.weight.normal_(0.0, 0.5)
        if layer.router.bias is not None:
            layer.router.bias.normal_(0.0, 0.5)
        if layer.router.selection_bias is not None:
            layer.router.selection_bias.normal_(0.0, 0.1)
        if layer.shared_experts is not None and layer.shared_experts.gate is not None:
            layer.shared_experts.gate.weight.normal_(0.0, 0.5)
    return layer.eval()


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def _run(layer: MoE, x: torch.Tensor, g: torch.Tensor, reference: bool):
    x = x.detach().clone().requires_grad_(True)
    y = reference_forward(layer, x) if reference else layer(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, _grads(layer)


def _compare(fast, ref, atol: float, rtol: float) -> None:
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = fast, ref
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx.double(), gx_ref, atol=atol, rtol=rtol)
    assert gp.keys() == gp_ref.keys()
    for name in gp:
        torch.testing.assert_close(gp[name].double(), gp_ref[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name,kw,shape", CASES, ids=[c[0] for c in CASES])
def test_float64_fast_path_equals_reference(name, kw, shape):
    layer = _layer(kw).double()
    ref = copy.deepcopy(layer)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    with capture_routing(layer) as cap:
        fast = _run(layer, x, g, reference=False)
    if kw.get("capacity_factor") and kw.get("router") != "expert_choice":
        assert int(cap.last().plan.num_dropped) > 0, "the capacity case must actually drop"
    expected = _run(ref, x, g, reference=True)
    _compare(fast, expected, atol=1e-10, rtol=1e-9)
    # Every parameter receives a gradient (router, experts, shared); the noise weights only in training.
    assert all(float(v.abs().sum()) > 0 for n, v in fast[2].items() if n != "router.noise_weight")


@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "reference"])
@pytest.mark.parametrize("name,kw,shape", [CASES[0], CASES[2], CASES[4]], ids=[CASES[i][0] for i in (0, 2, 4)])
def test_float32_backends_match_float64_reference(backend, name, kw, shape):
    layer = _layer(kw, backend)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(shape)
    g = torch.randn(shape)
    fast = _run(layer, x, g, reference=False)
    expected = _run(ref, x.double(), g.double(), reference=True)
    _compare(fast, expected, atol=2e-4, rtol=1e-4)


def test_module_experts_of_different_sizes_match_reference():
    torch.manual_seed(0)
    experts = [nn.Sequential(nn.Linear(D, h), nn.Tanh(), nn.Linear(h, D)) for h in (3, 8, 17, 5)]
    layer = MoE(moe_config(dim=D, num_experts=4, expert_hidden=1, top_k=2), experts=experts)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
    layer = layer.double().eval()
    ref = copy.deepcopy(layer)
    x = torch.randn(37, D, dtype=torch.float64)
    g = torch.randn(37, D, dtype=torch.float64)
    _compare(_run(layer, x, g, False), _run(ref, x, g, True), atol=1e-10, rtol=1e-9)


def test_gradcheck_tiny_layer_all_weights():
    """Finite differences on a tiny float64 layer: input, router (through the combine weights),
    expert and shared-expert weights."""
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=4, num_experts=3, expert_hidden=3, top_k=2, shared_experts=1,
                           shared_expert_hidden=2))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
    layer = layer.double().eval()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x_TD, *weights):
        return functional_call(layer, dict(zip(names, weights)), (x_TD,))

    assert "router.weight" in names and any(n.startswith("shared_experts") for n in names)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,kw,shape,masked", [
    ("softmax_masked", dict(num_experts=6, top_k=2), (37, D), [0, 3]),
    ("sigmoid_masked", dict(router="sigmoid_topk", num_experts=6, top_k=2), (37, D), [5]),
    ("capacity_masked", dict(num_experts=6, top_k=2, capacity_factor=1.0), (37, D), [1]),
    ("expert_choice_masked", dict(router="expert_choice", num_experts=6, capacity_factor=1.5), (37, D), [2, 4]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_masked_layer_equals_reference(name, kw, shape, masked):
    layer = _layer(kw).double()
    layer.mask_experts(masked)
    ref = copy.deepcopy(layer)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    with capture_routing(layer) as cap:
        fast = _run(layer, x, g, reference=False)
    assert all(float(cap.last().plan.counts_E[e]) == 0 for e in masked)
    _compare(fast, _run(ref, x, g, reference=True), atol=1e-10, rtol=1e-9)


def test_float32_odd_sizes_match_reference():
    """dim and expert_hidden not multiples of 4: grouped_mm's 16-byte stride rule must not bite."""
    layer = MoE(moe_config(dim=6, expert_hidden=5, num_experts=5, top_k=3)).eval()
    ref = copy.deepcopy(layer).double()
    x, g = torch.randn(37, 6), torch.randn(37, 6)
    _compare(_run(layer, x, g, reference=False), _run(ref, x.double(), g.double(), reference=True),
             atol=2e-4, rtol=1e-4)


def test_forced_grouped_mm_names_what_it_cannot_run():
    layer = _layer(dict(num_experts=4, top_k=2), "grouped_mm").double()
    with pytest.raises(ValueError, match=r"backend='grouped_mm'.*float64"):
        layer(torch.randn(10, D, dtype=torch.float64))
    odd = MoE(moe_config(dim=6, expert_hidden=5, num_experts=4, top_k=2, backend="grouped_mm"))
    with pytest.raises(ValueError, match=r"backend='grouped_mm'.*16 bytes"):
        odd(torch.randn(10, 6))
