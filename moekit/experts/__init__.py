"""Experts: stacked-weight SwiGLU/MLP experts (and their int8 form), arbitrary module experts, and shared experts."""

from .dense import MLP, GatedMLP, SharedExperts
from .int8 import Int8Experts, quantize_experts
from .modules import ModuleExperts
from .stacked import MLPExperts, SwiGLUExperts

__all__ = ["SwiGLUExperts", "MLPExperts", "ModuleExperts", "GatedMLP", "MLP", "SharedExperts",
           "Int8Experts", "quantize_experts"]
