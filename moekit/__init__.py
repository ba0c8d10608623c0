"""moekit: Mixture-of-Experts layers, routers, balancing losses and tools for PyTorch.

One token's path: ``router`` (x_TD -> Routing) -> ``dispatch`` (Routing -> DispatchPlan, rows
grouped by expert) -> ``experts`` (x_RD, counts_E -> y_RD) -> ``dispatch.combine`` (y_TD), all
called by ``layer.MoE``. docs/architecture.md describes each folder, the order in which folders
may import each other (tests/test_architecture.py checks it) and the one shape-letter legend
(T tokens, D model dim, E experts, K top-k, F expert hidden, R routed rows, ...) that every
module's ``x_TD``-style names follow.

Importing moekit has no side effects: it patches nothing and touches no device.
"""

from .errors import CheckpointError
from .config import BalanceConfig, ConfigError, MoEConfig, RouterConfig, SharedExpertConfig, moe_config
from .experts import quantize_experts
from .layer import ExpertNonFiniteError, MoE, RoutingEvent
from .model_ops import (RoutingCapture, aux_loss, capture_routing, mask_experts, moe_layers, name_moe_layers,
                        reset_routing_stats, routing_report, update_router_biases)
from .stats import RoutingCollapseWarning
# Hugging Face interop; transformers is imported only inside these functions.
from .hf import from_hf, patch_model, to_hf

# The one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

__all__ = [
    "MoE", "MoEConfig", "RouterConfig", "BalanceConfig", "SharedExpertConfig", "moe_config", "ConfigError",
    "CheckpointError",
    "ExpertNonFiniteError", "RoutingCollapseWarning", "aux_loss", "update_router_biases", "routing_report",
    "reset_routing_stats", "moe_layers", "name_moe_layers", "capture_routing", "RoutingCapture", "RoutingEvent",
    "mask_experts", "quantize_experts", "from_hf", "patch_model", "to_hf", "__version__",
]
