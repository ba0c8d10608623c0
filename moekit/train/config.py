"""``TrainConfig``: everything a training run needs besides the data, validated on construction and
round-tripped through JSON; ``resolve_device`` turns its ``device`` field into a ``torch.device``;
``prepare_data`` builds and loads the corpus it names."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, _check
from ..data.corpus import TokenData
from ..data.prepare import corpus_folder, prepare_corpus
from ..lm.config import LMConfig, read_json

AUTOCAST = ("none", "bf16")
# "auto": CUDA when this torch build sees a GPU, else the CPU. "cuda:N" picks one GPU.
DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d+|auto")


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; round-trips to JSON (``save``/``load``)."""

    model: LMConfig = field(default_factory=LMConfig)
    # Corpus: "polyglot" (the demo corpus) or a built corpus name / user source (see `moekit data`).
    corpus: str = "polyglot"
    data_dir: str = "data_cache"
    tokenizer: str = "byte"
    out_dir: str = "runs/train"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    autocast: str = "none"
    # Where the model trains: "cpu", "cuda", "cuda:N" or "auto". A config saved on a GPU machine
    # still loads anywhere; only a Trainer asks for the device (resolve_device).
    device: str = "cpu"
    eval_every: int = 100
    eval_tokens: int = 65536
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = LMConfig.from_dict(self.model, where="model")
        _check(isinstance(self.model, LMConfig), f"model={self.model!r} must be an LMConfig or a JSON object of its "
                                                 f"fields")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_tokens", "ckpt_every",
                     "log_every", "keep_checkpoints", "warmup_steps", "seed", "threads"):
            value, low = getattr(self, name), 0 if name in ("warmup_steps", "seed") else 1
            _check((value is None and name == "threads")
                   or (isinstance(value, int) and not isinstance(value, bool) and value >= low),
                   f"{name}={value!r} must be an int >= {low}" + (" or null" if name == "threads" else ""))
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                   f"{name}={value!r} must be a finite number")
        for name in ("corpus", "data_dir", "tokenizer", "out_dir"):
            _check(isinstance(getattr(self, name), str) and getattr(self, name) != "",
                   f"{name}={getattr(self, name)!r} must be a non-empty string")
        for name in ("tensorboard", "progress"):
            _check(isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be true or false")
        # AdamW moves every weight by about lr per step, so lr > 1 only ever diverges.
        _check(0 < self.lr <= 1, f"lr={self.lr} must be in (0, 1]")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        _check(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        _check(self.autocast in AUTOCAST, f"autocast={self.autocast!r} is not one of {list(AUTOCAST)}")
        _check(isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None,
               f"device={self.device!r} is not one of ['cpu', 'cuda', 'cuda:N', 'auto']")
        _check(self.seq_len <= self.model.max_seq_len,
               f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "TrainConfig") -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        _check(not unknown, f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_json(path), where=str(path))


def resolve_device(name: str) -> torch.device:
    """``TrainConfig.device`` as a ``torch.device``; asking for CUDA where there is none is a ConfigError.

    Plain "cuda" (and "auto" on a GPU machine) is the current CUDA device, so a launcher that set
    it per rank (``torch.cuda.set_device``, as expert parallelism does) keeps that choice."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    _check(DEVICE_PATTERN.fullmatch(name) is not None,
           f"device={name!r} is not one of ['cpu', 'cuda', 'cuda:N', 'auto']")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but this machine has no CUDA device this torch build can use "
                          f"(torch {torch.__version__}); use device='cpu' or 'auto'")
    index = torch.cuda.current_device() if name == "cuda" else int(name.split(":")[1])
    _check(index < torch.cuda.device_count(),
           f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def corpus_dir(cfg: TrainConfig, data_dir: str | Path) -> Path:
    """The folder under ``data_dir`` that holds (or will hold) the corpus ``cfg.corpus`` names."""
    return corpus_folder(cfg.corpus, data_dir)


def prepare_data(cfg: TrainConfig, build: bool = True) -> TokenData:
    """Build (once, cached) and load the corpus ``cfg.corpus`` names, tokenised with ``cfg.tokenizer``
    (see ``moekit.data.prepare``). ``build=False`` only loads (a corpus not built is a DataError)."""
    return prepare_corpus(cfg.corpus, cfg.data_dir, cfg.tokenizer, build=build)
