"""Branch-Train-MiX: Sukhbaatar et al. 2024, "Branch-Train-MiX: Mixing Expert LLMs into a
Mixture-of-Experts LLM" (arXiv 2403.07816).

Branch: copy a dense seed model once per domain (here: a group of document labels). Train: each
copy on its own domain, independently. MiX: build an MoE whose expert e in every layer is branch
e's feed-forward block, with every other weight (attention, norms, embeddings, head) the mean
over the branches, and a new router; then fine-tune the router (``finetune="router"``) or the
whole model (``"all"``) on all domains.

Shape legend: E experts (= branches), F hidden, D model dim.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import moe_config
from ..data.corpus import TokenData
from ..lm.model import LM
from ..train.trainer import TrainConfig, Trainer
from .common import dense_ffn_weights, filter_labels

FINETUNE = ("router", "all", "none")


@torch.no_grad()
def mix_branches(branches: Sequence[LM], top_k: int = 2, seed: int = 0, **moe_kwargs: Any) -> LM:
    """MoE LM whose expert e in each layer is ``branches[e]``'s feed-forward, other weights averaged."""
    if len(branches) < 2:
        raise ValueError(f"need at least 2 branches to mix, got {len(branches)}")
    base = branches[0].config
    for j, b in enumerate(branches[1:], start=1):
        if b.config != base:
            raise ValueError(f"branch {j} has a different config from branch 0")
    if base.moe is not None:
        raise ValueError("mix_branches expects dense branches (config.moe is None)")
    E = len(branches)
    moe_kwargs.setdefault("norm_topk_prob", True)
    moe = moe_config(dim=base.dim, num_experts=E, expert_hidden=base.ffn_hidden, top_k=top_k, **moe_kwargs)
    cfg = dataclasses.replace(base, moe=moe, moe_layers=list(range(base.n_layers)))
    mixed = LM(cfg)
    states = [b.state_dict() for b in branches]
    target = mixed.state_dict()
    for name, value in target.items():
        if ".mlp." in name:
            continue
        value.copy_(torch.stack([s[name].double() for s in states]).mean(dim=0).to(value.dtype))
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(mixed.layers):
        layer = block.mlp
        for e, branch in enumerate(branches):
            gate_up_2FD, down_DF = dense_ffn_weights(branch.layers[i].mlp)
            layer.experts.gate_up_proj[e].copy_(gate_up_2FD)
            layer.experts.down_proj[e].copy_(down_DF)
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * cfg.init_std)
    return mixed


def _param_filter(finetune: str):
    if finetune == "router":
        return lambda name, p: ".mlp.router." in name
    return None


def btx(seed: LM, cfg: TrainConfig, data: TokenData, groups: Sequence[Sequence[str]], branch_steps: int,
        mix_steps: int, finetune: str = "router", top_k: int = 2, out_dir: str | Path | None = None,
        **moe_kwargs: Any) -> tuple[LM, dict[str, Any]]:
    """Run Branch-Train-MiX from a dense ``seed`` (left untouched).

    groups: document labels of each branch (one expert per group); branch_steps: training steps
    of each branch on its group's tokens; mix_steps: fine-tuning steps of the mixed model on all
    data, training the routers (``finetune="router"``), everything (``"all"``) or nothing.
    cfg gives the optimiser, batch and evaluation settings; ``out_dir`` (default cfg.out_dir)
    gets one sub-folder per branch and ``mix``. Returns (mixed model, record of each stage's evals).
    """
    if finetune not in FINETUNE:
        raise ValueError(f"finetune={finetune!r} is not one of {list(FINETUNE)}")
    out = Path(out_dir or cfg.out_dir)
    record: dict[str, Any] = {"groups": [list(g) for g in groups], "branches": []}
    branches = []
    branch_data = [filter_labels(data, list(labels)) for labels in groups]  # a bad label fails before training
    for j, labels in enumerate(groups):
        branch = copy.deepcopy(seed)
        bcfg = dataclasses.replace(cfg, model=seed.config, steps=branch_steps, out_dir=str(out / f"branch{j}"))
        trainer = Trainer(bcfg, branch_data[j], model=branch)
        trainer.fit()
        branches.append(trainer.model)
        record["branches"].append({"labels": list(labels), "final_eval": _strip(trainer.evals[-1])})
    mixed = mix_branches(branches, top_k=top_k, seed=cfg.seed, **moe_kwargs)
    mcfg = dataclasses.replace(cfg, model=mixed.config, steps=max(mix_steps, 1), out_dir=str(out / "mix"))
    trainer = Trainer(mcfg, data, model=mixed, param_filter=_param_filter(finetune))
    if finetune == "none" or mix_steps == 0:
        record["mix"] = _strip(trainer.run_eval(routing_by_label=True))
    else:
        trainer.fit()
        record["mix"] = _strip(trainer.evals[-1])
    for p in mixed.parameters():
        p.requires_grad_(True)
    return mixed, record


def _strip(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: ev[k] for k in ("step", "tokens", "loss", "per_label", "routing_by_label") if k in ev}
