"""Pieces the recipes share: copying weights between models, label-filtered data, saving a
recipe's model as a checkpoint that ``moekit eval`` / ``load_trained`` read back.

Shape legend: E experts, F expert hidden, D model dim.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.corpus import TokenData, TokenSplit
from ..layer import MoE
from ..lm.config import LMConfig
from ..lm.model import LM
from ..train.checkpoint import save_checkpoint
from ..train.trainer import TrainConfig


def save_model(folder: str | Path, model: LM, cfg: TrainConfig, label_names: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a step-0 checkpoint whose stored config is ``cfg`` with ``cfg.model``
    replaced by the model's own config; returns the file path."""
    cfg = dataclasses.replace(cfg, model=model.config)
    meta = {"config": cfg.to_dict(), "step": 0, "train_time": 0.0, "tokens_seen": 0,
            "label_names": label_names or [], "recipe": extra or {}}
    return save_checkpoint(Path(folder), 0, model, None, meta, keep=1)


def filter_labels(data: TokenData, labels: list[str], split: str = "train") -> TokenData:
    """``data`` with the ``split`` split restricted to tokens whose label is in ``labels``
    (documents end with the end-of-document id, so concatenating the kept ones is safe)."""
    unknown = sorted(set(labels) - set(data.label_names))
    if unknown:
        raise ValueError(f"labels {unknown} are not in the corpus; it has {data.label_names}")
    ids = [data.label_names.index(name) for name in labels]
    part: TokenSplit = getattr(data, split)
    keep = np.isin(part.labels, ids)
    if not keep.any():
        raise ValueError(f"no {split} tokens carry labels {labels}")
    kept = TokenSplit(part.tokens[keep], part.labels[keep])
    return dataclasses.replace(data, **{split: kept})


def copy_shared_weights(src: nn.Module, dst: nn.Module, skip: tuple[str, ...] = (".mlp.",)) -> list[str]:
    """Copy every parameter/buffer of ``src`` into the same-named, same-shaped one of ``dst``,
    except names containing one of ``skip``; returns the copied names."""
    dst_state = dst.state_dict()
    copied = []
    with torch.no_grad():
        for name, value in src.state_dict().items():
            if any(s in name for s in skip) or name not in dst_state:
                continue
            if dst_state[name].shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} in the source but "
                                 f"{tuple(dst_state[name].shape)} in the target")
            dst_state[name].copy_(value)
            copied.append(name)
    return copied


def dense_ffn_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense SwiGLU block's weights in the stacked experts' layout: gate_up (2F, D), down (D, F)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(mlp, name):
            raise TypeError(f"{type(mlp).__name__} is not a dense SwiGLU block (no {name})")
    gate_up_2FD = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
    return gate_up_2FD, mlp.down_proj.weight


def moe_blocks(model: LM) -> list[tuple[int, MoE]]:
    """(block index, MoE layer) of every MoE feed-forward in ``model``."""
    return [(i, block.mlp) for i, block in enumerate(model.layers) if isinstance(block.mlp, MoE)]


def with_moe(cfg: LMConfig, **moe_changes: Any) -> LMConfig:
    """A copy of ``cfg`` whose MoE config has the given top-level or ``router`` changes."""
    if cfg.moe is None:
        raise ValueError("the model has no MoE layers")
    moe = copy.deepcopy(cfg.moe)
    router_changes = moe_changes.pop("router", {})
    moe = dataclasses.replace(moe, router=dataclasses.replace(moe.router, **router_changes), **moe_changes)
    return dataclasses.replace(cfg, moe=moe)
