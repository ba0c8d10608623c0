"""Training: the Trainer (AdamW, warm-up + cosine, accumulation, MoE losses) and checkpoints."""

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .trainer import Batch, TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "Batch", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint"]
