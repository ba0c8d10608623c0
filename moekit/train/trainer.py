"""The trainer's names in one place, as imported before the split (``from moekit.train.trainer import
Trainer, TrainConfig, eval_batches, load_trained, prepare_data, ...``). The code lives in
``config.py`` (TrainConfig, device), ``loop.py`` (Trainer), ``eval.py`` (validation) and
``moekit.data.batches`` (Batch, random_batch, eval_batches)."""

from ..data.batches import Batch, eval_batches, random_batch
from .config import AUTOCAST, TrainConfig, corpus_dir, prepare_data, resolve_device
from .eval import evaluate_batches
from .loop import LossFn, Trainer, adamw_options, load_checked, load_trained

__all__ = ["AUTOCAST", "Batch", "LossFn", "TrainConfig", "Trainer", "adamw_options", "corpus_dir", "eval_batches",
           "evaluate_batches", "load_checked", "load_trained", "prepare_data", "random_batch", "resolve_device"]
