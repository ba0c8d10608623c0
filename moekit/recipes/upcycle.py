"""Sparse upcycling: Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints" (arXiv 2212.05055).

Every dense feed-forward block chosen to become MoE is copied into all E experts; the router is
new (N(0, init_std)); everything else is copied unchanged. With renormalised top-k weights the
upcycled model computes exactly the dense function at initialisation (identical experts whose
weights sum to 1). Optional multiplicative noise, w * (1 + noise * N(0, 1)), breaks the symmetry
between the copies so they can drift apart faster.

Shape legend: E experts, F hidden, D model dim.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MoEConfig, moe_config
from ..lm.config import LMConfig
from ..lm.model import LM
from .common import copy_shared_weights, dense_ffn_weights


def upcycle_config(dense: LMConfig, num_experts: int, top_k: int = 2, moe_layers: list[int] | None = None,
                   **moe_kwargs) -> LMConfig:
    """The MoE LMConfig an upcycled ``dense`` model gets: experts of the dense hidden size."""
    if dense.moe is not None:
        raise ValueError("upcycle expects a dense model, but its config already has moe set")
    moe_kwargs.setdefault("norm_topk_prob", True)
    moe: MoEConfig = moe_config(dim=dense.dim, num_experts=num_experts, expert_hidden=dense.ffn_hidden,
                                top_k=top_k, **moe_kwargs)
    layers = list(range(dense.n_layers)) if moe_layers is None else sorted(set(moe_layers))
    return dataclasses.replace(dense, moe=moe, moe_layers=layers)


@torch.no_grad()
def upcycle(dense: LM, num_experts: int, top_k: int = 2, noise: float = 0.0, moe_layers: list[int] | None = None,
            seed: int = 0, **moe_kwargs) -> LM:
    """A new MoE ``LM`` initialised from ``dense`` (left untouched).

    num_experts, top_k: the MoE layers' size; moe_layers: which blocks become MoE (default all;
    Komatsuzaki et al. upcycle every other one). noise: relative std of the multiplicative noise
    on each expert copy (0 keeps the copies identical). moe_kwargs go to ``moekit.moe_config``
    (router kind, aux_loss_coef, ...). Router weights are drawn from ``seed``.
    """
    if noise < 0:
        raise ValueError(f"noise={noise} must be >= 0")
    cfg = upcycle_config(dense.config, num_experts, top_k, moe_layers, **moe_kwargs)
    gen = torch.Generator().manual_seed(seed)
    moe_model = LM(cfg)
    copy_shared_weights(dense, moe_model)
    for i, block in enumerate(moe_model.layers):
        source = dense.layers[i].mlp
        if not block.is_moe:
            block.mlp.load_state_dict(source.state_dict())
            continue
        layer = block.mlp
        gate_up_2FD, down_DF = dense_ffn_weights(source)
        experts = layer.experts
        if not hasattr(experts, "gate_up_proj"):
            raise TypeError(f"upcycling needs SwiGLU experts, got {type(experts).__name__}")
        for e in range(num_experts):
            experts.gate_up_proj[e].copy_(_noisy(gate_up_2FD, noise, gen))
            experts.down_proj[e].copy_(_noisy(down_DF, noise, gen))
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * cfg.init_std)
        if layer.router.noise_weight is not None:
            layer.router.noise_weight.zero_()
    return moe_model


def _noisy(w: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    if noise == 0:
        return w
    return w * (1 + noise * torch.randn(w.shape, generator=gen, dtype=w.dtype))
