"""``TrainConfig``: everything a training run needs besides the data, a ``moekit.config_base.Config``
(validated on construction, round-tripped through JSON, ``--set`` overrides); ``resolve_device``
turns its ``device`` field into a ``torch.device``; ``prepare_data`` builds and loads the corpus it
names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config_base import Config, ConfigError, check, spec
from ..data.corpus import TokenData
from ..data.prepare import corpus_folder, prepare_corpus
from ..lm.config import LMConfig

AUTOCAST = ("none", "bf16")
# "auto": CUDA when this torch build sees a GPU, else the CPU. "cuda:N" picks one GPU.
DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d+|auto")


@dataclass
class TrainConfig(Config):
    """Everything a run needs besides the data; round-trips to JSON (``save``/``load``)."""

    model: LMConfig = field(default_factory=LMConfig)
    # Corpus: "polyglot" (the demo corpus) or a built corpus name / user source (see `moekit data`).
    corpus: str = spec("polyglot", nonempty=True)
    data_dir: str = spec("data_cache", nonempty=True)
    tokenizer: str = spec("byte", nonempty=True)
    out_dir: str = spec("runs/train", nonempty=True)
    seq_len: int = spec(256, ge=1)
    batch_size: int = spec(16, ge=1)
    grad_accum: int = spec(1, ge=1)
    steps: int = spec(1000, ge=1)
    # AdamW moves every weight by about lr per step, so lr > 1 only ever diverges.
    lr: float = spec(3e-3, gt=0, le=1)
    min_lr_ratio: float = spec(0.1, ge=0, le=1)
    warmup_steps: int = spec(50, ge=0)
    weight_decay: float = spec(0.1, ge=0)
    beta1: float = spec(0.9, ge=0, lt=1)
    beta2: float = spec(0.95, ge=0, lt=1)
    grad_clip: float = spec(1.0, ge=0, hint="0 disables clipping")
    seed: int = spec(0, ge=0)
    autocast: str = spec("none", choices=AUTOCAST)
    # Where the model trains: "cpu", "cuda", "cuda:N" or "auto". A config saved on a GPU machine
    # still loads anywhere; only a Trainer asks for the device (resolve_device).
    device: str = "cpu"
    eval_every: int = spec(100, ge=1)
    eval_tokens: int = spec(65536, ge=1)
    ckpt_every: int = spec(200, ge=1)
    keep_checkpoints: int = spec(2, ge=1)
    log_every: int = spec(10, ge=1)
    threads: int | None = spec(None, ge=1)
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        check(DEVICE_PATTERN.fullmatch(self.device) is not None,
              f"device={self.device!r} is not one of ['cpu', 'cuda', 'cuda:N', 'auto']")
        check(self.seq_len <= self.model.max_seq_len,
              f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


def resolve_device(name: str) -> torch.device:
    """``TrainConfig.device`` as a ``torch.device``; asking for CUDA where there is none is a ConfigError.

    Plain "cuda" (and "auto" on a GPU machine) is the current CUDA device, so a launcher that set
    it per rank (``torch.cuda.set_device``, as expert parallelism does) keeps that choice."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    check(DEVICE_PATTERN.fullmatch(name) is not None,
          f"device={name!r} is not one of ['cpu', 'cuda', 'cuda:N', 'auto']")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but this machine has no CUDA device this torch build can use "
                          f"(torch {torch.__version__}); use device='cpu' or 'auto'")
    index = torch.cuda.current_device() if name == "cuda" else int(name.split(":")[1])
    check(index < torch.cuda.device_count(),
          f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def corpus_dir(cfg: TrainConfig, data_dir: str | Path) -> Path:
    """The folder under ``data_dir`` that holds (or will hold) the corpus ``cfg.corpus`` names."""
    return corpus_folder(cfg.corpus, data_dir)


def prepare_data(cfg: TrainConfig, build: bool = True) -> TokenData:
    """Build (once, cached) and load the corpus ``cfg.corpus`` names, tokenised with ``cfg.tokenizer``
    (see ``moekit.data.prepare``). ``build=False`` only loads (a corpus not built is a DataError)."""
    return prepare_corpus(cfg.corpus, cfg.data_dir, cfg.tokenizer, build=build)
