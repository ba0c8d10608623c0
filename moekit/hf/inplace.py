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

Padding: a forward pre-hook on the patched model reads the 2-D ``attention_mask`` it is called with
(B, past + S), and each patched layer passes its last S columns as ``token_mask`` to
``MoE.forward``, so moekit's own losses (``moekit.aux_loss(model)``), routing statistics and bias
counts leave padding out, as they do for ``LM.forward(..., token_mask=)``. The mask is held for the
extent of that call only (a context variable, so concurrent calls do not see each other's); an
all-ones mask is dropped (one host sync per call). Only calls of the model given to ``patch_model``
are seen: calling an inner module (``hf_model.model``) directly passes no mask.
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..layer import MoE, recomputing
from ..stats import DECODE_UPDATE_EVERY
from .blocks import family_of, moe_from_hf_block

# (hooks, attention_mask or None) per model call in progress in this context, innermost last.
_CALL_MASKS: ContextVar[tuple[tuple[AttentionMaskHooks, torch.Tensor | None], ...]] = ContextVar(
    "moekit_hf_call_masks", default=())


class AttentionMaskHooks:
    """Hooks on a patched HF model that keep the ``attention_mask`` (B, past + S) of the call in
    progress, for its patched layers to read (``current``); removed by ``remove``."""

    def __init__(self, model: nn.Module) -> None:
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self._position = params.index("attention_mask") if "attention_mask" in params else None
        self._handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                         model.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self._position is not None and len(args) > self._position:
            mask = args[self._position]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
            mask = None  # none, an all-ones mask (no padding), or a prepared 4-D mask: nothing to leave out
        _CALL_MASKS.set(_CALL_MASKS.get() + ((self, mask),))

    def _exit(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        calls = _CALL_MASKS.get()
        for i in range(len(calls) - 1, -1, -1):
            if calls[i][0] is self:
                _CALL_MASKS.set(calls[:i] + calls[i + 1:])
                return

    def current(self) -> torch.Tensor | None:
        """The attention_mask (B, past + S) of this model's innermost call in progress, or None."""
        for hooks, mask in reversed(_CALL_MASKS.get()):
            if hooks is self:
                return mask
        return None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

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
    padding: AttentionMaskHooks | None = None
    # The token mask of this layer's last counted forward, reused by activation checkpointing's
    # recomputation (which runs from the backward, after the model call has returned).
    _last_token_mask: torch.Tensor | None = None

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, S) mask of x (B, S, D)'s real tokens from the model call's attention_mask, or None."""
        if self.padding is None:
            return None
        if recomputing():
            return self._last_token_mask
        mask = self.padding.current()
        if mask is not None:
            if x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
                raise ValueError(f"{self.layer_name}: the model's attention_mask of shape {tuple(mask.shape)} "
                                 f"does not cover this block's input of shape {tuple(x.shape)} (B, S, D)")
            mask = mask[:, mask.shape[1] - x.shape[1]:]
        self._last_token_mask = mask
        return mask

    def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
        out, routing = self.forward_with_routing(x, self._token_mask(x))
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
    padding = AttentionMaskHooks(hf_model)
    for name, block in targets:
        moe = moe_from_hf_block(block, config, share=True, cls=PatchedMoE, **overrides)
        assert isinstance(moe, PatchedMoE)
        moe.returns_tuple = fam.returns_tuple
        moe.collector = collector
        moe.padding = padding
        # Kept outside the module tree so parameters are not listed twice.
        object.__setattr__(moe, "hf_block", block)
        moe.layer_name = name
        # transformers' generate drives the decode loop: no-grad forwards are added to the statistics
        # DECODE_UPDATE_EVERY at a time, as moekit's generate does.
        moe.stats.defer_updates(DECODE_UPDATE_EVERY)
        moe.train(block.training)
        parent_name, _, child = name.rpartition(".")
        parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
        setattr(parent, child, moe)
    return [name for name, _ in targets]


def unpatch_model(hf_model: nn.Module) -> list[str]:
    """Put the original HF blocks back (they share the weights, so training carries over)."""
    restored = []
    hooks = {id(m.padding): m.padding for m in hf_model.modules() if isinstance(m, PatchedMoE) and m.padding}
    for padding in hooks.values():
        padding.remove()
    for name, module in list(hf_model.named_modules()):
        if isinstance(module, PatchedMoE) and module.hf_block is not None:
            parent_name, _, child = name.rpartition(".")
            parent = hf_model.get_submodule(parent_name) if parent_name else hf_model
            setattr(parent, child, module.hf_block)
            restored.append(name)
    return restored


__all__ = ["PatchedMoE", "patch_model", "unpatch_model", "text_config"]
