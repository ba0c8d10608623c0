"""Training: ``config`` (TrainConfig, device), ``loop`` (the Trainer: AdamW, warm-up + cosine,
accumulation, MoE losses), ``eval`` (validation loss and routing per label) and ``checkpoint``; ``load_trained`` and
``load_checked`` (the same plus a scan for corrupt experts) load a trained run."""

from ..data.batches import Batch
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import Trainer, load_checked, load_trained

__all__ = ["Trainer", "TrainConfig", "Batch", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "load_trained", "load_checked"]
