"""moekit: Mixture-of-Experts layers, routers, balancing losses and tools for PyTorch.

Importing moekit has no side effects: it patches nothing and touches no device.
"""

from .config import BalanceConfig, ConfigError, MoEConfig, RouterConfig, SharedExpertConfig, moe_config
from .layer import ExpertNonFiniteError, MoE
from .model_ops import aux_loss, mask_experts, moe_layers, reset_routing_stats, routing_report, update_router_biases
from .stats import RoutingCollapseWarning
# Hugging Face interop; transformers is imported only inside these functions.
from .hf import from_hf, patch_model, to_hf

__version__ = "0.1.0"

__all__ = [
    "MoE", "MoEConfig", "RouterConfig", "BalanceConfig", "SharedExpertConfig", "moe_config", "ConfigError",
    "ExpertNonFiniteError", "RoutingCollapseWarning", "aux_loss", "update_router_biases", "routing_report",
    "reset_routing_stats", "moe_layers", "mask_experts", "from_hf", "patch_model", "to_hf", "__version__",
]
