"""Hugging Face transformers MoE blocks <-> moekit MoE layers, one family at a time.

Follows the sparse-block code of transformers 5.x (models/{mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v2, deepseek_v3, gpt_oss}/modeling_*.py): its routers, its expert layout and its
block return conventions. transformers is never imported here; a block is read by attribute.

Shape legend: T tokens, D model dim, E experts, F expert hidden, K top-k, R routed rows.

Expert weights: transformers 5.x keeps experts as ``gate_up_proj`` (E, 2F, D) and ``down_proj``
(E, D, F), the layout of moekit's SwiGLUExperts, so a block's tensors become the moekit layer's
parameters as they are. gpt-oss keeps them transposed, gate/up interleaved and with biases;
``moekit.lm.gpt_oss.ClampedSwiGLUExperts`` computes that expert as stored.

Router semantics, and where they meet moekit's TopKRouter:
  mixtral, qwen2_moe, qwen3_moe, olmoe  softmax over E, top-k, optional renormalisation.
  deepseek_v2  softmax over E; ``group_limited_greedy`` keeps the topk_group groups with the
               largest max score (HF fills the others with 0, moekit with -inf: the same picks,
               since every softmax score is > 0); no renormalisation; times routed_scaling_factor.
  deepseek_v3  sigmoid scores; selection on scores + e_score_correction_bias, groups ranked by
               the sum of their top-2; weights from unbiased scores, renormalised (+1e-20),
               times routed_scaling_factor.
  gpt_oss      softmax over the top-k logits (with a logit bias) = softmax over E renormalised
               over the top-k; equal in exact arithmetic, within float rounding in practice.
Training-only difference: Mixtral's router_jitter_noise scales the block input for the router
and the experts; moekit's jitter_eps scales only the router input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import MoEConfig, RouterConfig, SharedExpertConfig
from ..layer import MoE
from ..lm.gpt_oss import ClampedSwiGLUExperts


class UnsupportedArchitectureError(ValueError):
    """The Hugging Face config names a model type moekit cannot map."""


@dataclass(frozen=True)
class HFFamily:
    """Where a family keeps its MoE block's parts (attribute names inside the HF block)."""

    model_type: str
    block_class: str
    router: str = "gate"
    shared: str | None = None
    shared_gate: str | None = None
    # gpt-oss's block returns (hidden, router_scores); the others return hidden only.
    returns_tuple: bool = False
    # Legacy per-expert checkpoint names (what save_pretrained writes): gate, up, down.
    legacy_expert_names: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")


FAMILIES: dict[str, HFFamily] = {
    "mixtral": HFFamily("mixtral", "MixtralSparseMoeBlock", legacy_expert_names=("w1", "w3", "w2")),
    "qwen2_moe": HFFamily("qwen2_moe", "Qwen2MoeSparseMoeBlock", shared="shared_expert",
                          shared_gate="shared_expert_gate"),
    "qwen3_moe": HFFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "olmoe": HFFamily("olmoe", "OlmoeSparseMoeBlock"),
    "deepseek_v2": HFFamily("deepseek_v2", "DeepseekV2Moe", shared="shared_experts"),
    "deepseek_v3": HFFamily("deepseek_v3", "DeepseekV3MoE", shared="shared_experts"),
    "gpt_oss": HFFamily("gpt_oss", "GptOssMLP", router="router", returns_tuple=True, legacy_expert_names=None),
}

# transformers' hidden_act names -> moekit activation names.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def family_of(hf_config: Any) -> HFFamily:
    """The family of an HF config (by ``model_type``); raises UnsupportedArchitectureError."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is not supported by moekit.hf; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _get(hf_config: Any, name: str, default: Any = ...) -> Any:
    value = getattr(hf_config, name, default)
    if value is ...:
        raise UnsupportedArchitectureError(f"{type(hf_config).__name__} has no field {name!r}, "
                                           f"needed for model_type={hf_config.model_type!r}")
    return value


def _activation(hf_config: Any) -> str:
    act = _get(hf_config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(f"hidden_act={act!r} has no moekit activation; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


def moe_config_from_hf(hf_config: Any, **overrides: Any) -> MoEConfig:
    """The MoEConfig of one sparse block of an HF config (the routers compute what HF computes).

    ``overrides`` set top-level MoEConfig fields (e.g. ``backend``, ``check_finite``).
    """
    fam = family_of(hf_config)
    t = fam.model_type
    D = _get(hf_config, "hidden_size")
    K = _get(hf_config, "num_experts_per_tok")
    shared = SharedExpertConfig()
    if t == "mixtral":
        E, F = _get(hf_config, "num_local_experts"), _get(hf_config, "intermediate_size")
        router = RouterConfig(top_k=K, norm_topk_prob=True, jitter_eps=float(_get(hf_config, "router_jitter_noise", 0.0)))
    elif t in ("qwen2_moe", "qwen3_moe", "olmoe"):
        E = _get(hf_config, "num_experts")
        F = _get(hf_config, "moe_intermediate_size" if t != "olmoe" else "intermediate_size")
        router = RouterConfig(top_k=K, norm_topk_prob=bool(_get(hf_config, "norm_topk_prob")))
        if t == "qwen2_moe":
            shared = SharedExpertConfig(num=1, hidden=_get(hf_config, "shared_expert_intermediate_size"), gated=True)
    elif t == "deepseek_v2":
        E, F = _get(hf_config, "n_routed_experts"), _get(hf_config, "moe_intermediate_size")
        method = _get(hf_config, "topk_method")
        if method == "greedy":
            n_group, topk_group = 1, 1
        elif method == "group_limited_greedy":
            n_group, topk_group = _get(hf_config, "n_group"), _get(hf_config, "topk_group")
        else:
            raise UnsupportedArchitectureError(f"deepseek_v2 topk_method={method!r} is not one of "
                                               f"['greedy', 'group_limited_greedy']")
        # transformers' DeepseekV2TopkRouter never renormalises, whatever norm_topk_prob says.
        router = RouterConfig(top_k=K, norm_topk_prob=False, n_group=n_group, topk_group=topk_group,
                              group_score="max", routed_scaling_factor=float(_get(hf_config, "routed_scaling_factor")))
        n_shared = _get(hf_config, "n_shared_experts") or 0
        shared = SharedExpertConfig(num=n_shared, hidden=F * n_shared if n_shared else None)
    elif t == "deepseek_v3":
        E, F = _get(hf_config, "n_routed_experts"), _get(hf_config, "moe_intermediate_size")
        router = RouterConfig(kind="sigmoid_topk", top_k=K, norm_topk_prob=bool(_get(hf_config, "norm_topk_prob")),
                              n_group=_get(hf_config, "n_group"), topk_group=_get(hf_config, "topk_group"),
                              group_score="top2_sum",
                              routed_scaling_factor=float(_get(hf_config, "routed_scaling_factor")))
        n_shared = _get(hf_config, "n_shared_experts") or 0
        shared = SharedExpertConfig(num=n_shared, hidden=F * n_shared if n_shared else None)
    else:  # gpt_oss
        E, F = _get(hf_config, "num_local_experts"), _get(hf_config, "intermediate_size")
        router = RouterConfig(top_k=K, norm_topk_prob=True, logit_bias=True)
    # HF blocks have no balancing loss of their own; the model adds the pooled Mixtral one.
    kwargs: dict[str, Any] = {"balance": {"aux_loss_coef": 0.0}}
    kwargs.update(overrides)
    return MoEConfig(dim=D, num_experts=E, expert_hidden=F, activation=_activation(hf_config), router=router,
                     shared=shared, **kwargs)


def build_moe(hf_config: Any, cls: type[MoE] = MoE, **overrides: Any) -> MoE:
    """A freshly initialised moekit MoE (or subclass ``cls``) shaped like the config's sparse block."""
    fam = family_of(hf_config)
    cfg = moe_config_from_hf(hf_config, **overrides)
    experts = None
    if fam.model_type == "gpt_oss":
        experts = ClampedSwiGLUExperts(cfg.num_experts, cfg.dim, cfg.expert_hidden,
                                       float(_get(hf_config, "swiglu_alpha", 1.702)),
                                       float(_get(hf_config, "swiglu_limit", 7.0)),
                                       cfg.backend)
    return cls(cfg, experts=experts)


def block_key_map(hf_config: Any) -> dict[str, str]:
    """moekit MoE state-dict name -> HF sparse-block state-dict name (fused expert layout)."""
    fam = family_of(hf_config)
    keys = {"router.weight": f"{fam.router}.weight",
            "experts.gate_up_proj": "experts.gate_up_proj",
            "experts.down_proj": "experts.down_proj"}
    if fam.model_type == "gpt_oss":
        keys["router.bias"] = f"{fam.router}.bias"
        keys["experts.gate_up_proj_bias"] = "experts.gate_up_proj_bias"
        keys["experts.down_proj_bias"] = "experts.down_proj_bias"
    if fam.model_type == "deepseek_v3":
        keys["router.selection_bias"] = f"{fam.router}.e_score_correction_bias"
    if fam.shared is not None and moe_config_from_hf(hf_config).shared.num > 0:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys[f"shared_experts.mlp.{proj}.weight"] = f"{fam.shared}.{proj}.weight"
    if fam.shared_gate is not None:
        keys["shared_experts.gate.weight"] = f"{fam.shared_gate}.weight"
    return keys


def _resolve(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


def _tensor_at(module: nn.Module, name: str) -> torch.Tensor:
    owner, leaf = _resolve(module, name)
    value = getattr(owner, leaf, None)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"{type(module).__name__} has no tensor {name!r}")
    return value


def _check_block(block: nn.Module, hf_config: Any) -> HFFamily:
    fam = family_of(hf_config)
    if type(block).__name__ != fam.block_class:
        raise TypeError(f"expected a {fam.block_class} for model_type={fam.model_type!r}, got {type(block).__name__}")
    return fam


def moe_from_hf_block(block: nn.Module, hf_config: Any, share: bool = True, cls: type[MoE] = MoE,
                      **overrides: Any) -> MoE:
    """A moekit MoE computing what ``block`` computes.

    share=True makes the MoE's parameters and buffers the block's own tensors (no copy; training
    either one trains both); share=False copies them. Shapes are checked, naming the tensor.
    """
    _check_block(block, hf_config)
    moe = build_moe(hf_config, cls, **overrides)
    for ours, theirs in block_key_map(hf_config).items():
        src = _tensor_at(block, theirs)
        owner, leaf = _resolve(moe, ours)
        dst = getattr(owner, leaf)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"HF tensor {theirs!r} has shape {tuple(src.shape)}, moekit {ours!r} expects "
                             f"{tuple(dst.shape)}")
        if share:
            if isinstance(dst, nn.Parameter):
                setattr(owner, leaf, src if isinstance(src, nn.Parameter) else nn.Parameter(src))
            else:
                owner._buffers[leaf] = src
        else:
            with torch.no_grad():
                dst.copy_(src)
    # Moves the layer's own buffers; tensors already on the device (the shared ones) stay as they are.
    return moe.to(device=_tensor_at(block, block_key_map(hf_config)["router.weight"]).device)


@torch.no_grad()
def copy_moe_to_hf_block(moe: MoE, block: nn.Module, hf_config: Any) -> None:
    """Copy a moekit MoE's weights into an HF sparse block of the same structure."""
    _check_block(block, hf_config)
    for ours, theirs in block_key_map(hf_config).items():
        src, dst = _tensor_at(moe, ours), _tensor_at(block, theirs)
        if src.shape != dst.shape:
            raise ValueError(f"moekit tensor {ours!r} has shape {tuple(src.shape)}, HF {theirs!r} expects "
                             f"{tuple(dst.shape)}")
        dst.copy_(src)
