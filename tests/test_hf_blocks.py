"""Output and input-gradient parity of moekit MoE layers with transformers' own sparse MoE blocks.

Each test builds one HF block from a tiny config, fills every weight (and DeepSeek-V3's score
correction bias) with nonzero random values, builds the moekit layer with moekit.hf and compares
outputs and d(sum(out * probe))/dx in float32.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit import MoE  # noqa: E402
from moekit.hf.blocks import (  # noqa: E402
    UnsupportedArchitectureError,
    copy_moe_to_hf_block,
    moe_config_from_hf,
    moe_from_hf_block,
)

D = 32


def _mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
    cfg = MixtralConfig(hidden_size=D, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    return cfg, MixtralSparseMoeBlock


def _qwen2_moe():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                         num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)
    return cfg, Qwen2MoeSparseMoeBlock


def _qwen3_moe():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                         norm_topk_prob=True)
    return cfg, Qwen3MoeSparseMoeBlock


def _olmoe():
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock
    cfg = OlmoeConfig(hidden_size=D, intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    return cfg, OlmoeSparseMoeBlock


def _deepseek_v2():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2Moe
    cfg = DeepseekV2Config(hidden_size=D, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                           n_shared_experts=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                           routed_scaling_factor=1.5)
    return cfg, DeepseekV2Moe


def _deepseek_v2_greedy():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2Moe
    cfg = DeepseekV2Config(hidden_size=D, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                           n_shared_experts=1, topk_method="greedy")
    return cfg, DeepseekV2Moe


def _deepseek_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                           n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           norm_topk_prob=True)
    return cfg, DeepseekV3MoE


def _gpt_oss():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssMLP
    cfg = GptOssConfig(hidden_size=D, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                       swiglu_limit=1.5)
    return cfg, GptOssMLP


FAMILIES = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
            "deepseek_v2": _deepseek_v2, "deepseek_v2_greedy": _deepseek_v2_greedy, "deepseek_v3": _deepseek_v3,
            "gpt_oss": _gpt_oss}


def make_block(name: str, seed: int = 0):
    cfg, cls = FAMILIES[name]()
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = cls(cfg).float()
    with torch.no_grad():
        for pname, p in block.named_parameters():
            # Routers get a larger scale so top-k picks are clear of near-ties.
            p.normal_(0.0, 0.5 if ("gate.weight" in pname or "router" in pname) else 0.2)
        for bname, b in block.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0.0, 0.1)
    return cfg, block


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_block_parity(name: str) -> None:
    cfg, block = make_block(name)
    moe = moe_from_hf_block(block, cfg, share=False)
    x = torch.randn(3, 7, D)
    x_hf, x_mk = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y_mk = _out(block(x_hf)), moe(x_mk)
    assert y_mk.shape == y_hf.shape
    assert rel_err(y_mk, y_hf) < 1e-5
    probe = torch.randn_like(y_hf)
    (y_hf * probe).sum().backward()
    (y_mk * probe).sum().backward()
    assert rel_err(x_mk.grad, x_hf.grad) < 1e-5


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_shared_weights_are_the_hf_tensors(name: str) -> None:
    cfg, block = make_block(name)
    moe = moe_from_hf_block(block, cfg, share=True)
    assert moe.experts.gate_up_proj is block.experts.gate_up_proj
    if name == "deepseek_v3":
        assert moe.router.selection_bias is block.gate.e_score_correction_bias
    # An edit through the HF block is seen by the moekit layer.
    with torch.no_grad():
        block.experts.down_proj.mul_(2.0)
    x = torch.randn(2, 5, D)
    assert rel_err(moe(x), _out(block(x))) < 1e-5


def test_deepseek_v3_correction_bias_changes_routing() -> None:
    cfg, block = make_block("deepseek_v3")
    moe = moe_from_hf_block(block, cfg, share=False)
    x = torch.randn(16, D)
    before = moe.forward_with_routing(x)[1].topk_idx_TK.sort(-1).values
    with torch.no_grad():
        moe.router.selection_bias[:] = 0.0
        moe.router.selection_bias[5] = 10.0
    after = moe.forward_with_routing(x)[1].topk_idx_TK
    assert bool((after == 5).any(-1).all())
    assert not torch.equal(before, after.sort(-1).values)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_copy_moe_to_hf_block(name: str) -> None:
    cfg, block = make_block(name, seed=1)
    moe = MoE(moe_config_from_hf(cfg)) if name != "gpt_oss" else moe_from_hf_block(make_block(name, 2)[1], cfg,
                                                                                    share=False)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
        if moe.router.selection_bias is not None:
            moe.router.selection_bias.normal_(0.0, 0.1)
    copy_moe_to_hf_block(moe, block, cfg)
    x = torch.randn(2, 6, D)
    assert rel_err(moe(x), _out(block(x))) < 1e-5


def test_config_mapping_fields() -> None:
    cfg, _ = FAMILIES["deepseek_v3"]()
    mc = moe_config_from_hf(cfg)
    assert (mc.router.kind, mc.router.n_group, mc.router.topk_group, mc.router.group_score) == \
        ("sigmoid_topk", 4, 2, "top2_sum")
    assert mc.router.routed_scaling_factor == 2.5 and mc.shared.num == 1 and mc.shared.hidden == 16
    cfg, _ = FAMILIES["qwen2_moe"]()
    mc = moe_config_from_hf(cfg)
    assert mc.shared.gated and mc.shared.hidden == 40 and not mc.router.norm_topk_prob


def test_errors_name_the_problem() -> None:
    from transformers import LlamaConfig
    with pytest.raises(UnsupportedArchitectureError, match="model_type='llama'"):
        moe_config_from_hf(LlamaConfig())
    cfg, block = make_block("mixtral")
    other_cfg, _ = FAMILIES["qwen3_moe"]()
    with pytest.raises(TypeError, match="Qwen3MoeSparseMoeBlock"):
        moe_from_hf_block(block, other_cfg)
    small = type(cfg)(hidden_size=D, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="experts.gate_up_proj.*shape"):
        moe_from_hf_block(block, small)


def test_import_moekit_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, moekit; assert callable(moekit.from_hf); sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
