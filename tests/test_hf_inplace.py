"""In-place mode: transformers models whose sparse blocks are replaced by weight-sharing moekit layers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.hf import FAMILIES  # noqa: E402
from moekit.hf.inplace import PatchedMoE, patch_model, unpatch_model  # noqa: E402
from moekit.hf.testing import tiny_hf_model  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_model_matches_and_generates(family: str) -> None:
    model = tiny_hf_model(family)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
    names = patch_model(model)
    assert names and all(isinstance(model.get_submodule(n), PatchedMoE) for n in names)
    # Shared storage: the parameter count is unchanged.
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        out = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                 do_sample=False, pad_token_id=0)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(gen, ref_gen)
    reports = moekit.routing_report(model, warn=False)
    assert sorted(reports) == sorted(names)
    assert unpatch_model(model) == names
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-6


def test_masking_an_expert_changes_routing() -> None:
    model = tiny_hf_model("qwen3_moe")
    patch_model(model)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), moekit.capture_routing(model) as cap:
        ref = model(ids).logits
    busiest = int(cap.last(cap.names[0]).routing.topk_idx_TK.flatten().bincount().argmax())
    moekit.mask_experts(model, [busiest])
    with torch.no_grad(), moekit.capture_routing(model) as cap:
        out = model(ids).logits
    assert len(cap.names) == len(moekit.moe_layers(model)) > 0
    for name in cap.names:
        assert not bool((cap.last(name).routing.topk_idx_TK == busiest).any())
    assert rel_err(out, ref) > 1e-3


def test_patched_training_step_updates_hf_weights() -> None:
    model = tiny_hf_model("mixtral")
    patch_model(model)
    model.train()
    block_weight = model.model.layers[0].mlp.experts.gate_up_proj
    before = block_weight.detach().clone()
    ids = torch.randint(0, 128, (2, 6))
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    unpatch_model(model)
    assert model.model.layers[0].mlp.experts.gate_up_proj is block_weight
    assert not torch.equal(block_weight.detach(), before)


def test_patch_errors() -> None:
    model = tiny_hf_model("olmoe")
    patch_model(model)
    with pytest.raises(ValueError, match="no OlmoeSparseMoeBlock"):
        patch_model(model)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=32))
    with pytest.raises(moekit.hf.UnsupportedArchitectureError, match="llama"):
        patch_model(llama)


@pytest.mark.parametrize("family,hooks_first", [("mixtral", False), ("mixtral", True), ("qwen2_moe", True),
                                                ("qwen3_moe", False), ("olmoe", True), ("gpt_oss", False)])
def test_output_router_logits_after_patching(family: str, hooks_first: bool) -> None:
    """transformers' own aux_loss (load_balancing_loss_func with attention_mask) sees the patched
    layers' router logits, whether its capture hooks were installed before patching or not."""
    model = tiny_hf_model(family, std=0.3).train()
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(7)[None, :] < torch.tensor([[7], [4], [2]])).long()
    # transformers installs its capture hooks on the first call that asks for them: before patching
    # (on the HF routers, which then no longer run), or after (they find no HF router).
    reference = model if hooks_first else tiny_hf_model(family, std=0.3).train()
    ref = reference(ids, attention_mask=mask, output_router_logits=True, labels=ids)
    names = patch_model(model)
    out = model(ids, attention_mask=mask, output_router_logits=True, labels=ids)
    assert len(out.router_logits) == len(ref.router_logits) == len(names)
    # The same logits up to float32 rounding (moekit's expert kernels sum in another order).
    for ours, theirs in zip(out.router_logits, ref.router_logits):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-4, atol=2e-5)
    assert abs(float(out.aux_loss.detach()) - float(ref.aux_loss.detach())) < 1e-5
    out.aux_loss.backward()
    layer = model.get_submodule(names[0])
    assert layer.router.weight.grad is not None and float(layer.router.weight.grad.abs().sum()) > 0
