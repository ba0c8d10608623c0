"""Dispatch: sort rows by expert, run grouped products, combine back."""

from .combine import combine, permute
from .grouped import grouped_matmul, resolve_backend
from .run import run_experts
from .plan import DispatchPlan, plan_expert_choice, plan_token_choice, token_choice_capacity

__all__ = ["DispatchPlan", "plan_token_choice", "plan_expert_choice", "token_choice_capacity",
           "grouped_matmul", "resolve_backend", "permute", "combine", "run_experts"]
