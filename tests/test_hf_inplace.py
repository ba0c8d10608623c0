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
    # Statistics are added 32 no-grad forwards at a time; a report adds the waiting ones: every token of
    # the forward, the prompt and the 9 decode steps of 2 rows is counted.
    assert all(counted_tokens(model, n) == 16 + 16 + 9 * 2 for n in names)
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


def counted_tokens(model: torch.nn.Module, name: str) -> int:
    """Tokens that layer ``name``'s routing statistics counted since they were last reset."""
    layer = model.get_submodule(name)
    return moekit.routing_report(model, warn=False)[name].assignments // layer.top_k


MIXTRAL_LOSS = {"aux_loss_coef": 0.02, "aux_loss_convention": "mixtral"}


def with_capacity(model: torch.nn.Module, factor: float) -> None:
    for _, layer in moekit.moe_layers(model):
        layer.config.router.capacity_factor = factor


@pytest.mark.parametrize("family,balance,capacity", [(family, MIXTRAL_LOSS, None) for family in sorted(FAMILIES)]
                         + [("qwen3_moe", {"aux_loss_coef": 0.02, "aux_loss_convention": "switch",
                                           "z_loss_coef": 1e-3}, None),
                            ("mixtral", MIXTRAL_LOSS, 1.0)])
def test_attention_mask_leaves_padding_out_of_moekit_losses(family: str, balance: dict, capacity: float | None) -> None:
    """moekit.aux_loss of a patched model called with attention_mask equals the loss of the same
    batch with the padding removed: each layer run on only its real tokens' inputs (float64)."""
    model = tiny_hf_model(family, std=0.3).double().train()
    names = patch_model(model, balance=balance)
    with_capacity(model, capacity)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(7)[None, :] < torch.tensor([[7], [4], [2]])).long()  # right padding
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].detach())) for name in names]
    out = model(ids, attention_mask=mask, output_router_logits=True)
    for hook in hooks:
        hook.remove()
    padded = moekit.aux_loss(model).detach()
    assert counted_tokens(model, names[0]) == int(mask.sum())
    for name in names:  # the batch without its padding, layer by layer
        model.get_submodule(name)(inputs[name][mask.bool()])
    unpadded = moekit.aux_loss(model).detach()
    assert float(unpadded) > 0
    assert abs(float(padded) - float(unpadded)) < 1e-12 * float(unpadded)
    if balance is MIXTRAL_LOSS and capacity is None and out.aux_loss is not None:
        # transformers' own loss with the same attention_mask, pooled the same way (it computes in float32).
        assert abs(float(padded) - 0.02 * float(out.aux_loss.detach())) < 1e-6 * float(padded)
    model(ids, attention_mask=torch.ones_like(ids))  # no padding: the plain forward's loss
    ones = moekit.aux_loss(model).detach()
    model(ids)
    assert float(ones) == float(moekit.aux_loss(model).detach())
    assert abs(float(ones) - float(padded)) > 1e-4 * float(padded)  # the padding would have counted


def test_attention_mask_reaches_recomputation_and_generate() -> None:
    """Under HF gradient checkpointing the recomputed layers use the call's mask (a capacity layer's
    output depends on it); left-padded generate masks the padding of every cached step."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    grads = []
    for checkpointing in (False, True):
        model = tiny_hf_model("qwen3_moe", std=0.3).double().train()
        patch_model(model, balance=MIXTRAL_LOSS)
        with_capacity(model, 1.0)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        out = model(ids, attention_mask=mask, labels=ids)
        (out.loss + moekit.aux_loss(model)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    model = tiny_hf_model("mixtral").eval()
    names = patch_model(model)
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        model.generate(ids, attention_mask=left, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # 9 real prompt tokens, then 2 rows x 2 decode steps (the third new token is not run).
    assert counted_tokens(model, names[0]) == 9 + 2 * 2
