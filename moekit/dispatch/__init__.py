"""Dispatch: sort rows by expert (``DispatchPlan``), run the experts on them, combine back.

The kernels themselves (grouped products, the fused and int8 expert ops, gather/scatter) are in
``moekit.ops``; ``grouped_matmul`` and ``resolve_backend`` are re-exported here by their old names.
"""

from ..ops.grouped import grouped_matmul, resolve_backend
from .combine import combine, permute
from .plan import DispatchPlan, plan_expert_choice, plan_token_choice, token_choice_capacity
from .run import run_experts

__all__ = ["DispatchPlan", "plan_token_choice", "plan_expert_choice", "token_choice_capacity",
           "grouped_matmul", "resolve_backend", "permute", "combine", "run_experts"]
