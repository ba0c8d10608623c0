"""Routers: x (T, D) -> Routing (which experts, with which weights)."""

from torch import nn

from ..config import RouterConfig
from .expert_choice import ExpertChoiceRouter, expert_choice_capacity
from .routing import Routing
from .topk import TopKRouter, group_limited_mask


def build_router(dim: int, num_experts: int, config: RouterConfig) -> nn.Module:
    if config.kind == "expert_choice":
        return ExpertChoiceRouter(dim, num_experts, config)
    return TopKRouter(dim, num_experts, config)


__all__ = ["Routing", "TopKRouter", "ExpertChoiceRouter", "build_router", "group_limited_mask",
           "expert_choice_capacity"]
