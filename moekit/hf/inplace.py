"""In-place mode: swap the sparse MoE blocks of a loaded transformers model for moekit layers.

The moekit layers' parameters and buffers are the HF block's own tensors (no copy), so the
patched model keeps its memory footprint, still trains and saves as before, and transformers'
own ``generate`` runs through moekit's dispatch, routing statistics and expert masking::

    model = AutoModelForCausalLM.from_pretrained(path)
    moekit.hf.patch_model(model)
    model.generate(ids, max_new_tokens=20)
    moekit.routing_report(model)

Each replacement keeps its block's call convention: (B, S, D) -> (B, S, D), or for gpt-oss
(B, S, D) -> ((B, S, D), router weights (T, K)). transformers 5 records ``output_router_logits``
with forward hooks on its router classes, which no longer run after patching; each patched layer
hands its raw router logits (T, E), float32, to the same collector instead, so the model's own
``aux_loss`` (load_balancing_loss_func, with its attention_mask) still works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layer import MoE
from .blocks import family_of, moe_from_hf_block

def router_logit_collector() -> Any:
    """transformers >= 5: the context-local collector its output-capturing hooks append to; None for
    releases without it (patched layers then record no router logits). Imported when a model is
    patched, so that importing moekit does not import transformers."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


class PatchedMoE(MoE):
    """A moekit MoE standing in for an HF sparse block; ``hf_block`` is the block it replaced."""

    returns_tuple: bool = False
    hf_block: nn.Module | None = None
    collector: Any = None

    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        out, routing = self.forward_with_routing(x)
        collected = None if self.collector is None else self.collector.get()
        if collected is not None and "router_logits" in collected:
            collected["router_logits"].append(routing.logits_TE)
        if self.returns_tuple:
            assert routing.topk_weight_TK is not None
            return out, routing.topk_weight_TK.detach().to(out.dtype)
        return out


def text_config(hf_config: Any) -> Any:
    """The language-model config of an HF config (itself for text-only models)."""
    getter = getattr(hf_config, "get_text_config", None)
    return getter() if callable(getter) else hf_config


def patch_model(hf_model: nn.Module, **overrides: Any) -> list[str]:
    """Replace every sparse MoE block of ``hf_model`` with a weight-sharing moekit layer.

    ``overrides`` set MoEConfig fields of the new layers (e.g. ``check_finite=False``).
    Returns the qualified names of the replaced blocks; raises if there are none.
    """
    config = text_config(getattr(hf_model, "config", None))
    fam = family_of(config)
    targets = [(name, module) for name, module in hf_model.named_modules() if type(module).__name__ == fam.block_class]
    if not targets:
        raise ValueError(f"{type(hf_model).__name__} (model_type={fam.model_type!r}) has no {fam.block_class} "
                         f"to replace; was it patched already?")
    collector = router_logit_collector()
    for name, block in targets:
        moe = moe_from_hf_block(block, config, share=True, cls=PatchedMoE, **overrides)
        assert isinstance(moe, PatchedMoE)
        moe.returns_tuple = fam.returns_tuple
        moe.collector = collector
        # Kept outside the module tree so parameters are not listed twice.
        object.__setattr__(moe, "hf_block", block)
        moe.layer_name = name
        moe.train(block.training)
        parent_name, _, child = name.rpartition(".")
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        setattr(parent, child, moe)
    return [name for name, _ in targets]


def unpatch_model(hf_model: nn.Module) -> list[str]:
    """Put the original HF blocks back (they share the weights, so training carries over)."""
    restored = []
    for name, module in list(hf_model.named_modules()):
        if isinstance(module, PatchedMoE) and module.hf_block is not None:
            parent_name, _, child = name.rpartition(".")
            parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
            setattr(parent, child, module.hf_block)
            restored.append(name)
    return restored


__all__ = ["PatchedMoE", "patch_model", "unpatch_model", "text_config"]
