"""Training recipes that turn and keep models as MoE: sparse upcycling, Branch-Train-MiX,
supervised routing, selective expert fine-tuning and expert surgery. Each is a plain function
on ``moekit.lm.LM`` models that reuses ``moekit.train.Trainer`` for any training it does."""

from .btx import btx, mix_branches
from .common import filter_labels, save_model
from .lora import lora_finetune
from .selective import finetune_experts, freeze_except
from .supervised_routing import LabelRoutingLoss, routing_purity
from .surgery import add_experts, merge_experts, remove_experts
from .upcycle import upcycle

__all__ = ["upcycle", "btx", "mix_branches", "LabelRoutingLoss", "routing_purity", "finetune_experts",
           "freeze_except", "add_experts", "remove_experts", "merge_experts", "save_model", "filter_labels",
           "lora_finetune"]
