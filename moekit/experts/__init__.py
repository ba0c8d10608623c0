"""Experts: stacked-weight SwiGLU/MLP experts, arbitrary module experts, and shared experts."""

from .dense import MLP, GatedMLP, SharedExperts
from .modules import ModuleExperts
from .stacked import MLPExperts, SwiGLUExperts

__all__ = ["SwiGLUExperts", "MLPExperts", "ModuleExperts", "GatedMLP", "MLP", "SharedExperts"]
