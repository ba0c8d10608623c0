"""No side channels: a forward leaves only its documented results on the layer (losses, statistics
buffers); the routing reaches callers through ``capture_routing`` (opt-in routing hooks); layers
are named once, never by listing them; activation checkpointing's recomputation counts nothing
twice (torch.utils.checkpoint, both modes).

Shape legend: B sequences, S positions, T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import moekit
from moekit import MoE, moe_config
from moekit.balance import losses as L
from moekit.lm import LM, LMConfig
from moekit.replay import record_routing
from moekit.router import Routing

D, E, K = 12, 6, 2


def _layer(**kw) -> MoE:
    opts = dict(dim=D, num_experts=E, expert_hidden=10, top_k=K, aux_loss_coef=0.01, z_loss_coef=1e-3)
    opts.update(kw)
    return MoE(moe_config(**opts))


class _Stack(nn.Module):
    """Two MoE layers with residuals; ``mode`` picks plain, non-reentrant or reentrant checkpointing."""

    def __init__(self, **kw) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_layer(**kw), _layer(**kw)])
        self.mode: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.mode is None:
                x = x + block(x)
            else:
                x = x + checkpoint(block, x, use_reentrant=self.mode)
        return x


def test_capture_routing_records_each_layer_and_forward_detached():
    torch.manual_seed(0)
    model = _Stack().eval()
    x1, x2 = torch.randn(2, 5, D), torch.randn(3, 4, D)
    with moekit.capture_routing(model) as cap:
        h = model.blocks[0](x1)
        model(x2)
    assert cap.names == ["blocks.0", "blocks.1"]
    assert [len(cap["blocks.0"]), len(cap["blocks.1"])] == [2, 1]
    first, second = cap["blocks.0"]
    assert first.shape == (2, 5) and second.shape == (3, 4) and first.valid_T is None
    # The captured routing is the router's on that input (top-k ids and weights, as the router gives them).
    want = model.blocks[0].router(x1.reshape(-1, D))
    assert torch.equal(first.routing.topk_idx_TK, want.topk_idx_TK)
    torch.testing.assert_close(first.routing.topk_weight_TK, want.topk_weight_TK, rtol=0, atol=0)
    assert int(first.plan.counts_E.sum()) == 10 * K
    with torch.enable_grad():
        model.train()
        model(x2.requires_grad_(True))
    assert not first.routing.logits_TE.requires_grad
    # Outside the block nothing more is recorded, and the layer keeps no routing of its own.
    assert len(cap["blocks.0"]) == 2 and h.shape == x1.shape
    for layer in model.blocks:
        for attr in ("last_routing", "last_plan", "last_valid_T", "_pooled_routing", "_pooled_valid_T"):
            assert not hasattr(layer, attr), attr
        kept = [v for v in vars(layer).values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
        assert kept == [], "a forward left a (T, ...) tensor on the layer"
    with pytest.raises(KeyError, match=r"no MoE layer named 'blocks.2'.*\['blocks.0', 'blocks.1'\]"):
        cap["blocks.2"]
    with pytest.raises(ValueError, match="2 layers were captured"):
        cap.last()


def test_capture_routing_padding_and_nested_captures():
    torch.manual_seed(1)
    layer = _layer(capacity_factor=2.0).eval()
    x = torch.randn(2, 4, D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    with moekit.capture_routing(layer) as outer:
        with moekit.capture_routing(layer) as inner:
            layer(x, token_mask=mask)
        layer(x)
    assert len(inner.last().routing.topk_idx_TK) == 8 and len(inner["MoE"]) == 1
    assert len(outer["MoE"]) == 2
    event = outer["MoE"][0]
    assert torch.equal(event.valid_T, mask.reshape(-1))
    assert bool(event.valid_T[event.plan.token_idx_R].all())  # padding takes no row
    assert outer["MoE"][1].valid_T is None


def test_moe_layers_does_not_rename_and_name_moe_layers_does():
    model = nn.ModuleDict({"a": _layer(), "b": nn.Sequential(_layer())})
    assert [n for n, _ in moekit.moe_layers(model)] == ["a", "b.0"]
    assert [m.layer_name for _, m in moekit.moe_layers(model)] == ["MoE", "MoE"]
    assert moekit.name_moe_layers(model) == ["a", "b.0"]
    with pytest.raises(ValueError, match=r"^b\.0: input of shape \(3, 5\) has last dimension 5"):
        model["b"](torch.randn(3, 5))
    lm = LM(LMConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn_hidden=32,
                     moe=moe_config(dim=16, num_experts=4, expert_hidden=8, top_k=2)))
    assert [m.layer_name for _, m in moekit.moe_layers(lm)] == [n for n, _ in moekit.moe_layers(lm)]


def test_forward_with_routing_returns_this_forwards_differentiable_routing():
    torch.manual_seed(2)
    layer = _layer().train()
    x = torch.randn(7, D)
    out, routing = layer.forward_with_routing(x)
    torch.testing.assert_close(out, layer(x))
    routing.topk_weight_TK.sum().backward()
    assert float(layer.router.weight.grad.abs().sum()) > 0


def _run(model: _Stack, x: torch.Tensor, g: torch.Tensor, steps: int = 2) -> dict:
    """``steps`` training steps' forward + backward, with captures and a routing record."""
    for p in model.parameters():
        p.grad = None
    with moekit.capture_routing(model) as cap, record_routing(model) as rec:
        for _ in range(steps):
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            aux = moekit.aux_loss(model)
            ((out * g).sum() + aux).backward()
    return {"out": out.detach(), "aux": aux.detach(), "aux_grad": aux.requires_grad, "x_grad": xi.grad,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "stats": [layer.stats.snapshot() for layer in model.blocks],
            "bias_load": [layer.bias_load_E.clone() for layer in model.blocks],
            "events": [len(cap[n]) for n in cap.names], "record": rec.record().topk_idx}


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_statistics_once(reentrant):
    torch.manual_seed(3)
    plain = _Stack(bias_update_rate=0.01, aux_loss_convention="mixtral").train()
    ckpt, no_aux = copy.deepcopy(plain), copy.deepcopy(plain)
    ckpt.mode = reentrant
    x, g = torch.randn(2, 6, D), torch.randn(2, 6, D)
    want = _run(plain, x, g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(ckpt, x, g)
    for stats_got, stats_want in zip(got["stats"], want["stats"]):
        assert int(stats_got["passes"]) == int(stats_want["passes"]) == 2
        for name in stats_want:
            torch.testing.assert_close(stats_got[name], stats_want[name], rtol=1e-12, atol=0, msg=name)
    for got_E, want_E in zip(got["bias_load"], want["bias_load"]):
        assert torch.equal(got_E, want_E) and int(want_E.sum()) == 2 * 12 * K
    assert got["events"] == want["events"] == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(got["record"], want["record"]))
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-6, atol=1e-6)
    ours = [str(w.message) for w in caught if "balancing loss" in str(w.message)]
    if not reentrant:
        # The balancing losses (the layers' own and the pooled mixtral one) reach the backward.
        assert not ours
        torch.testing.assert_close(got["aux"], want["aux"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["x_grad"], want["x_grad"], rtol=1e-5, atol=1e-6)
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    else:
        # The reentrant mode runs the first forward without grad: no balancing loss can be computed,
        # and the layer says so; gradients equal a plain run without the losses.
        assert ours and "use_reentrant=False" in ours[0]
        assert not got["aux_grad"] and float(got["aux"]) == 0.0
        for layer in no_aux.blocks:
            layer.config.balance.aux_loss_coef = layer.config.balance.z_loss_coef = 0.0
        xi = x.clone().requires_grad_(True)
        for _ in range(2):
            (no_aux(xi) * g).sum().backward()
        torch.testing.assert_close(got["x_grad"], xi.grad / 2, rtol=1e-5, atol=1e-6)
        for name, p in no_aux.named_parameters():
            if "router" not in name:
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_frozen_experts_stay_frozen_under_checkpointing_and_after_weight_replacement(reentrant):
    torch.manual_seed(4)
    layer = _layer().train()
    layer.freeze_experts([1, 4])
    x = torch.randn(30, D, requires_grad=True)
    with pytest.warns(UserWarning, match="use_reentrant=False") if reentrant else contextlib.nullcontext():
        checkpoint(layer, x, use_reentrant=reentrant).square().sum().backward()
    grad = layer.experts.gate_up_proj.grad
    assert bool((grad[[1, 4]] == 0).all()) and float(grad[[0, 2, 3, 5]].abs().sum()) > 0
    layer.experts.gate_up_proj = nn.Parameter(layer.experts.gate_up_proj.detach().clone())
    layer(torch.randn(30, D)).square().sum().backward()
    assert bool((layer.experts.gate_up_proj.grad[[1, 4]] == 0).all())
    assert float(layer.experts.gate_up_proj.grad[0].abs().sum()) > 0


def test_pooled_mixtral_sums_match_a_float64_reference_with_padding():
    """E * sum_i f_i P_i over every layer's tokens at once, from per-layer sums (padding left out)."""
    torch.manual_seed(5)
    routings, masks = [], []
    for T in (8, 5):
        logits = torch.randn(T, E, dtype=torch.float64)
        scores = logits.softmax(-1)
        w, idx = scores.topk(K, dim=-1)
        routings.append(Routing(logits, scores, idx, w))
        masks.append(torch.rand(T) > 0.3)
    masks[1][0] = True
    got = L.pooled_mixtral_loss([L.mixtral_sums(r, E, m) for r, m in zip(routings, masks)], E)
    keep = torch.cat(masks)
    probs = torch.cat([r.scores_TE for r in routings])[keep]
    idx = torch.cat([r.topk_idx_TK for r in routings])[keep]
    f_E = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), torch.ones(idx.numel(),
                                                                                        dtype=torch.float64))
    want = E * (f_E / keep.sum() * probs.mean(0)).sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(L.pooled_mixtral_aux_loss(routings, E, masks), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reentrant", [False, True])
def test_patched_hf_model_under_transformers_gradient_checkpointing_counts_once(reentrant):
    """transformers' gradient_checkpointing_enable wraps each decoder layer in torch.utils.checkpoint."""
    pytest.importorskip("transformers")
    from moekit.hf.testing import tiny_hf_model

    plain, ckpt = tiny_hf_model("qwen3_moe"), tiny_hf_model("qwen3_moe")
    for model in (plain, ckpt):
        moekit.patch_model(model)
        model.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    # Without early stop the non-reentrant recomputation runs each layer to its end (with it, the
    # recomputation may stop before the statistics; either way nothing may count twice).
    with warnings.catch_warnings(), set_checkpoint_early_stop(False):
        warnings.simplefilter("ignore", UserWarning)  # the reentrant mode's balancing-loss warning
        for model in (plain, ckpt):
            model(ids, labels=ids).loss.backward()
    want, got = moekit.routing_report(plain, warn=False), moekit.routing_report(ckpt, warn=False)
    assert list(got) == list(want) and len(want) >= 2
    for name in want:
        assert got[name].forward_passes == want[name].forward_passes == 1
        assert got[name].tokens_per_expert == want[name].tokens_per_expert
        assert got[name].coactivation == want[name].coactivation


def test_a_layer_deep_copies_after_a_training_forward():
    """The losses a training forward keeps on the layer hold its graph; a copy gets them detached."""
    layer = MoE(dim=16, num_experts=4, expert_hidden=16, top_k=2, aux_loss_convention="mixtral",
                aux_loss_coef=0.01, z_loss_coef=1e-3).train()
    y = layer(torch.randn(2, 5, 16))
    clone = copy.deepcopy(layer)
    assert clone.aux_loss.grad_fn is None and clone.pooled_loss_sums.scores_E.grad_fn is None
    assert all(v.grad_fn is None for v in clone.last_losses.values() if isinstance(v, torch.Tensor))
    torch.testing.assert_close(clone.aux_loss, layer.aux_loss.detach())
    (y.sum() + moekit.aux_loss(layer)).backward()   # the original keeps its graph
    assert any(p.grad is not None for p in layer.router.parameters())
