"""Adapters applied to a plain model as a transform: LoRA on stacked experts, routers and attention."""

from .lora import (LoraConfig, LoraWeight, apply_lora, count_lora_parameters, load_adapter, lora_modules,
                   lora_parameters, merge_lora, read_adapter, remove_lora, save_adapter, unmerge_lora)

__all__ = ["LoraConfig", "LoraWeight", "apply_lora", "count_lora_parameters", "load_adapter", "lora_modules",
           "lora_parameters", "merge_lora", "read_adapter", "remove_lora", "save_adapter", "unmerge_lora"]
