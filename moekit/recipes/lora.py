"""LoRA fine-tuning (Hu et al. 2021) of a trained run or a converted Hugging Face model.

``moekit.adapters.apply_lora`` adds the adapters (experts, router, attention; all experts, one
shared pair, or only chosen experts as in selective fine-tuning), the Trainer trains only them,
and the run folder receives ``adapter.safetensors`` (written at every checkpoint step and at the
end) instead of full-model checkpoints: the base model stays where it is, and ``moekit serve
--adapter`` or ``load_adapter`` puts the two together.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..adapters import LoraConfig, apply_lora, count_lora_parameters, lora_parameters, save_adapter
from ..data.corpus import TokenData, TokenSplit
from ..lm.model import LM
from ..train.trainer import TrainConfig, Trainer

ADAPTER_FILE = "adapter.safetensors"


def text_data(text: str, tokenizer: Any, seq_len: int, val_fraction: float = 0.1, source: str = "text") -> TokenData:
    """TokenData of one text (the model's own tokenizer: ``encode(str) -> ids``): the first
    1 - val_fraction of its tokens train, the rest validate. Both parts must exceed ``seq_len``."""
    ids = list(tokenizer.encode(text))
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None:
        ids.append(int(eos))
    n_val = max(int(len(ids) * val_fraction), seq_len + 1)
    if len(ids) - n_val <= seq_len:
        raise ValueError(f"{source} holds {len(ids)} tokens; training with seq_len={seq_len} needs more than "
                         f"{2 * (seq_len + 1)} (or a smaller --seq-len)")
    tokens = np.asarray(ids, dtype=np.int64)

    def split(part: np.ndarray) -> TokenSplit:
        return TokenSplit(part, np.zeros(len(part), dtype=np.int16))

    return TokenData(split(tokens[:-n_val]), split(tokens[-n_val:]), [Path(source).stem or "text"],
                     getattr(tokenizer, "name", "tokenizer"), Path(source))


def lora_finetune(model: LM, cfg: TrainConfig, data: TokenData, lora: LoraConfig,
                  steps: int | None = None) -> tuple[Trainer, Path]:
    """Add ``lora`` adapters to ``model`` and train only them with the Trainer configured by ``cfg``
    (cfg.model is replaced by the model's config). Returns the finished Trainer (its ``evals[0]``
    is the base model's, since fresh adapters change nothing) and the adapter file in cfg.out_dir."""
    apply_lora(model, lora)
    cfg = dataclasses.replace(cfg, model=model.config, steps=steps or cfg.steps)
    adapters = {id(p) for p in lora_parameters(model)}
    trainer = Trainer(cfg, data, model=model, param_filter=lambda name, p: id(p) in adapters)
    path = Path(cfg.out_dir) / ADAPTER_FILE
    trainer.save = lambda: save_adapter(trainer.model, path)  # type: ignore[method-assign]
    trainer.fit()
    return trainer, path


def lora_summary(model: LM) -> dict[str, Any]:
    """Adapter and base parameter counts of an adapted model."""
    adapters = count_lora_parameters(model)
    base = sum(p.numel() for p in model.parameters()) - adapters
    return {"adapter_params": adapters, "base_params": base, "fraction": adapters / max(base, 1)}
