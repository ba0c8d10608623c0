"""Training loop for ``moekit.lm.LM``: AdamW (Loshchilov & Hutter 2019) with linear warm-up and
cosine decay, gradient clipping and accumulation, optional bf16 autocast, the MoE balancing
losses of every layer (``moekit.aux_loss``) and aux-loss-free bias updates after each step.

Batches are a pure function of (seed, step, micro-step), so the data position is the step
count; a checkpoint holds model, optimizer, step, RNG states, routing statistics and masked
experts, and resuming (from the newest checkpoint that verifies) reproduces the uninterrupted
run's losses, weights and optimizer state bit for bit on the same machine; ``metrics.jsonl``
loses the rows past the resumed step, so it reads as one uninterrupted run.

Reuse hooks: ``Trainer.add_loss(name, fn)`` adds a term computed from (model, batch, logits) to
each micro-batch's loss (batches carry every token's document label); ``param_filter`` picks
what trains; ``evaluate`` returns loss overall, per label and, optionally, expert use per label.

Shape legend: B batch, S sequence, V vocabulary, K top-k, E experts, N label count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.corpus import TokenData, TokenSplit
from ..lm.config import LMConfig, read_json
from ..lm.model import LM
from ..model_ops import aux_loss, moe_layers, reset_routing_stats, routing_report, update_router_biases
from .checkpoint import CheckpointError, append_line, atomic_write_bytes, load_checkpoint, load_newest, model_state, \
    optimizer_state, remove_stale_temp, restore_moe_state, save_checkpoint

AUTOCAST = ("none", "bf16")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


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


@dataclass
class Batch:
    """input_ids (B, S) and targets (B, S) long; labels (B, S) long: document label of each target."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor

    @property
    def seq_labels(self) -> torch.Tensor:
        """(B,) the most frequent label of each sequence."""
        return torch.mode(self.labels, dim=1).values


def random_batch(split: TokenSplit, batch_size: int, seq_len: int, seed: int) -> Batch:
    """``batch_size`` windows of seq_len + 1 tokens at offsets drawn from ``seed`` alone."""
    n = len(split.tokens) - seq_len - 1
    if n <= 0:
        raise ValueError(f"the training split has {len(split.tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    offsets = np.random.default_rng(seed).integers(0, n, size=batch_size)
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    toks = torch.from_numpy(split.tokens[idx].astype(np.int64))
    labels = torch.from_numpy(split.labels[idx[:, 1:]].astype(np.int64))
    return Batch(toks[:, :-1], toks[:, 1:], labels)


def eval_batches(split: TokenSplit, batch_size: int, seq_len: int, max_tokens: int) -> list[Batch]:
    """Non-overlapping windows spread evenly over the split (every label is seen), up to ``max_tokens`` targets."""
    available = (len(split.tokens) - 1) // seq_len
    if available < 1:
        raise ValueError(f"the validation split has {len(split.tokens)} tokens, fewer than seq_len + 1")
    n_windows = min(available, max(1, max_tokens // seq_len))
    starts = (np.arange(n_windows) * available // n_windows) * seq_len
    batches = []
    for first in range(0, n_windows, batch_size):
        idx = starts[first:first + batch_size, None] + np.arange(seq_len + 1)[None, :]
        toks = torch.from_numpy(split.tokens[idx].astype(np.int64))
        batches.append(Batch(toks[:, :-1], toks[:, 1:], torch.from_numpy(split.labels[idx[:, 1:]].astype(np.int64))))
    return batches


LossFn = Callable[[LM, Batch, torch.Tensor], torch.Tensor]


class Trainer:
    """Trains ``model`` (built from ``cfg.model`` if not given) on ``data``; writes to ``cfg.out_dir``."""

    def __init__(self, cfg: TrainConfig, data: TokenData, model: LM | None = None,
                 param_filter: Callable[[str, torch.nn.Parameter], bool] | None = None,
                 parallel: Any = None) -> None:
        self.cfg = cfg
        self.data = data
        # Expert/data parallelism hook: a moekit.parallel.training.TrainerParallel, or None.
        self.parallel = parallel
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.model.vocab_size < _vocab_needed(data):
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{_vocab_needed(data)} ids (tokenizer {data.tokenizer_name})")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = model if model is not None else LM(cfg.model)
        if parallel is not None:
            self.model = parallel.setup_model(self.model)
        self.out_dir = Path(cfg.out_dir)
        self.extra_losses: dict[str, LossFn] = {}
        named = [(n, p) for n, p in self.model.named_parameters() if param_filter is None or param_filter(n, p)]
        if not named:
            raise ValueError("param_filter selected no parameters to train")
        selected = {id(p) for _, p in named}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in selected)
        # No weight decay on norms, biases and the router (decaying router weights pulls scores together).
        decay = [p for n, p in named if p.dim() >= 2 and "router" not in n]
        no_decay = [p for n, p in named if not (p.dim() >= 2 and "router" not in n)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), fused=False, foreach=False)
        if parallel is not None:
            parallel.attach_optimizer(self.optimizer, self.model)
        self.step = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self._tb = None
        self._stop = False
        self.resume_skipped: list[str] = []

    # ------------------------------------------------------------------ pieces
    def add_loss(self, name: str, fn: LossFn) -> None:
        """Add ``fn(model, batch, logits_BSV) -> scalar`` to every micro-batch's loss, logged as ``name``."""
        if name in self.extra_losses or name in ("loss", "ce", "aux"):
            raise ValueError(f"a loss named {name!r} already exists")
        self.extra_losses[name] = fn

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

    def batch(self, step: int, micro: int) -> Batch:
        seed = (self.cfg.seed * 1_000_003 + step) * 64 + micro
        b = random_batch(self.data.train, self.cfg.batch_size, self.cfg.seq_len, seed)
        return b if self.parallel is None else self.parallel.local_batch(b)

    def _autocast(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16")

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        cfg, model = self.cfg, self.model
        model.train()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        start = time.perf_counter()
        for micro in range(cfg.grad_accum):
            b = self.batch(self.step, micro)
            with self._autocast():
                logits_BSV = model(b.input_ids)
                ce = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), b.targets.reshape(-1))
                terms = {"ce": ce, "aux": aux_loss(model)}
                for name, fn in self.extra_losses.items():
                    terms[name] = fn(model, b, logits_BSV)
            loss = sum(terms.values())
            (loss / cfg.grad_accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.parallel is not None:
            grad_norm = self.parallel.reduce_and_clip(model, params, cfg.grad_clip)
            sums = self.parallel.mean_metrics(sums)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {self.step}: gradient norm is {float(grad_norm)}; "
                                     f"lower lr={cfg.lr} or check the data")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_router_biases(model)
        self.train_time += time.perf_counter() - start
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step
        record = {"step": self.step, "tokens": self.tokens_seen, "time_s": self.train_time, "lr": lr,
                  "loss": sums["ce"], **{k: v for k, v in sums.items() if k != "ce"}, "grad_norm": float(grad_norm)}
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, max_tokens: int | None = None, routing_by_label: bool = False) -> dict[str, Any]:
        """Validation loss overall and per label (mean over target tokens carrying that label).

        With ``routing_by_label``, also ``routing_by_label[layer] = (N labels, E) counts`` of top-k picks.
        """
        model, cfg = self.model, self.cfg
        was_training = model.training
        model.eval()
        n_labels = len(self.data.label_names)
        loss_sum_N = torch.zeros(n_labels, dtype=torch.float64)
        count_N = torch.zeros(n_labels, dtype=torch.float64)
        layers = moe_layers(model)
        by_label = {name: torch.zeros(n_labels, layer.num_experts, dtype=torch.float64) for name, layer in layers}
        train_stats = {name: _stat_snapshot(layer) for name, layer in layers}
        reset_routing_stats(model)
        for b in eval_batches(self.data.val, cfg.batch_size, cfg.seq_len, max_tokens or cfg.eval_tokens):
            with self._autocast():
                logits_BSV = model(b.input_ids)
            nll_T = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), b.targets.reshape(-1),
                                    reduction="none").double()
            labels_T = b.labels.reshape(-1)
            loss_sum_N.index_add_(0, labels_T, nll_T)
            count_N.index_add_(0, labels_T, torch.ones_like(nll_T))
            if routing_by_label:
                for name, layer in layers:
                    idx_TK = layer.last_routing.topk_idx_TK if layer.last_routing is not None else None
                    if idx_TK is None:
                        continue
                    K = idx_TK.shape[1]
                    flat = labels_T.repeat_interleave(K) * layer.num_experts + idx_TK.reshape(-1)
                    by_label[name].view(-1).index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float64))
        eval_routing = {name: r.to_dict() for name, r in routing_report(model, warn=False).items()}
        for name, layer in layers:
            _stat_restore(layer, train_stats[name])
        model.train(was_training)
        seen = count_N > 0
        result: dict[str, Any] = {
            "loss": float(loss_sum_N.sum() / count_N.sum()),
            "per_label": {self.data.label_names[i]: float(loss_sum_N[i] / count_N[i]) for i in range(n_labels)
                          if seen[i]},
            "tokens_per_label": {self.data.label_names[i]: int(count_N[i]) for i in range(n_labels) if seen[i]},
            "routing": {name: {k: r[k] for k in ("utilization", "dropped_fraction", "mean_entropy", "max_entropy",
                                                 "max_over_mean_load", "dead_experts")}
                        for name, r in eval_routing.items()},
        }
        if routing_by_label:
            result["routing_by_label"] = {name: m.tolist() for name, m in by_label.items()}
        return result

    # ------------------------------------------------------------------ checkpoints
    def state_meta(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(), "step": self.step, "train_time": self.train_time,
            "tokens_seen": self.tokens_seen, "label_names": self.data.label_names,
            "tokenizer": self.data.tokenizer_name,
            "rng": {"torch": torch.get_rng_state().tolist(), "python": _py_state(random.getstate()),
                    "numpy": _np_state(np.random.get_state())},
        }

    def save(self) -> Path:
        if self.parallel is not None:
            return self.parallel.save(self.out_dir / "checkpoints", self.step, self.model, self.optimizer,
                                      self.state_meta(), keep=self.cfg.keep_checkpoints)
        return save_checkpoint(self.out_dir / "checkpoints", self.step, self.model, self.optimizer, self.state_meta(),
                               keep=self.cfg.keep_checkpoints)

    def resume(self, path: str | Path) -> Path:
        """Load model, optimizer, step, timers, RNG states, routing statistics and masked experts.

        ``path`` is a checkpoint file, or a run/checkpoint folder: its newest checkpoint that loads and
        verifies (newer ones that do not are named in ``self.resume_skipped``). Returns the file used."""
        path = Path(path)
        self.resume_skipped = []
        if path.is_dir():
            found = load_newest(path)
            if found is None:
                raise CheckpointError(f"{path} holds no checkpoint (no step_*.safetensors in it or in "
                                      f"{path / 'checkpoints'})")
            path, tensors, meta, self.resume_skipped = found
        else:
            tensors, meta = load_checkpoint(path)
        model_state(tensors, self.model, path)
        optimizer_state(tensors, meta["optim"], self.optimizer, path)
        restore_moe_state(meta["moe"], self.model, path, stats=True)
        m = meta["meta"]
        self.step, self.train_time, self.tokens_seen = m["step"], m["train_time"], m["tokens_seen"]
        torch.set_rng_state(torch.tensor(m["rng"]["torch"], dtype=torch.uint8))
        random.setstate((m["rng"]["python"][0], tuple(m["rng"]["python"][1]), m["rng"]["python"][2]))
        np_state = m["rng"]["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        return path

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict[str, Any]) -> None:
        if self.parallel is not None and not self.parallel.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        append_line(self.out_dir / "metrics.jsonl", json.dumps(record))
        if self.cfg.tensorboard and self._tb is not False:
            if self._tb is None:
                from ..report.optional import tensorboard_writer

                # False: tensorboard is not installed (noted once), so the run logs metrics.jsonl only.
                self._tb = tensorboard_writer(self.out_dir / "tensorboard") or False
            if self._tb is False:
                return
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
                elif k == "per_label":
                    for label, value in v.items():
                        self._tb.add_scalar(f"{prefix}/loss_{label}", value, record["step"])

    def trim_metrics(self) -> None:
        """Drop the rows of ``metrics.jsonl`` this run will write again, and any torn line; the file is
        replaced atomically. Rows at the starting step were written before its checkpoint was saved,
        so they stay, except at step 0, whose evaluation runs again."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        first_new = self.step + 1 if self.step > 0 else 0
        keep = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < first_new:
                keep.append(line + "\n")
        if "".join(keep) != text:
            atomic_write_bytes(path, "".join(keep).encode())

    def run_eval(self, routing_by_label: bool = False) -> dict[str, Any]:
        train_routing = {name: r.to_dict() for name, r in routing_report(self.model, warn=False).items()}
        reset_routing_stats(self.model)
        result = self.evaluate(routing_by_label=routing_by_label)
        record = {"kind": "eval", "step": self.step, "tokens": self.tokens_seen, "time_s": self.train_time,
                  **{k: v for k, v in result.items() if k != "routing_by_label"},
                  "train_routing": {name: {k: r[k] for k in ("utilization", "dropped_fraction", "mean_entropy")}
                                    for name, r in train_routing.items()}}
        self.evals.append({**record, **({"routing_by_label": result["routing_by_label"]} if routing_by_label else {})})
        self._log(record)
        return self.evals[-1]

    def fit(self, steps: int | None = None, on_eval: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Train until ``steps`` (default cfg.steps). Ctrl-C finishes the current step, saves and returns."""
        cfg = self.cfg
        target = cfg.steps if steps is None else steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = self.parallel is None or self.parallel.is_main
        if main:
            remove_stale_temp(self.out_dir)
            atomic_write_bytes(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
            self.trim_metrics()
        previous = signal.getsignal(signal.SIGINT)
        installed = False
        try:
            signal.signal(signal.SIGINT, self._on_sigint)
            installed = True
        except ValueError:
            pass  # not the main thread: Ctrl-C stays a KeyboardInterrupt
        bar = None
        if cfg.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=target, initial=self.step, unit="step", dynamic_ncols=True)
        try:
            if self.step == 0:
                self.run_eval()
            while self.step < target and not self._stop:
                record = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == target:
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", aux=f"{record['aux']:.3f}",
                                    tok_s=f"{self.tokens_seen / max(self.train_time, 1e-9):.0f}")
                if self.step % cfg.eval_every == 0 or self.step == target:
                    result = self.run_eval(routing_by_label=self.step == target)
                    if on_eval is not None:
                        on_eval(result)
                if self.step % cfg.ckpt_every == 0 or self.step == target:
                    self.save()
            if self._stop:
                path = self.save()
                if bar is not None:
                    bar.write(f"interrupted: saved {path} at step {self.step}; continue with --resume")
        finally:
            if bar is not None:
                bar.close()
            if installed:
                signal.signal(signal.SIGINT, previous)
            if self._tb:
                self._tb.flush()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True

    @property
    def interrupted(self) -> bool:
        return self._stop


def _vocab_needed(data: TokenData) -> int:
    arrays = [data.train.tokens, data.val.tokens]
    return int(max(int(a.max()) for a in arrays if len(a))) + 1


def _py_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _np_state(state: tuple) -> list:
    return [state[0], state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in state[2:]]]


def _stat_snapshot(layer: torch.nn.Module) -> dict[str, Any]:
    return {"buffers": {k: v.clone() for k, v in layer.stats.named_buffers(recurse=False)},
            "passes": layer.stats.forward_passes}


def _stat_restore(layer: torch.nn.Module, snap: dict[str, Any]) -> None:
    for k, v in layer.stats.named_buffers(recurse=False):
        v.copy_(snap["buffers"][k])
    layer.stats.forward_passes = snap["passes"]


# ---------------------------------------------------------------------- run helpers
def prepare_data(cfg: TrainConfig, build: bool = True) -> TokenData:
    """Build (once, cached) and load the corpus ``cfg.corpus`` names, tokenised with ``cfg.tokenizer``.

    "polyglot" is the demo corpus; a folder, .jsonl file or ``hf:<name>`` is built under data_dir;
    any other name must be a corpus already built under data_dir. ``build=False`` only loads
    (a corpus not built is a DataError).
    """
    from ..data.corpus import build_from_source, build_polyglot, load_tokens
    from ..data.tokenizer import load_tokenizer

    data_dir = Path(cfg.data_dir)
    folder = corpus_dir(cfg, data_dir)
    if build and cfg.corpus == "polyglot":
        build_polyglot(data_dir)
    elif build and _is_source(cfg.corpus) and not (folder / "report.json").is_file():
        build_from_source(cfg.corpus, data_dir, name=folder.name)
    return load_tokens(folder, load_tokenizer(cfg.tokenizer))


def corpus_dir(cfg: TrainConfig, data_dir: str | Path) -> Path:
    """The folder under ``data_dir`` that holds (or will hold) the corpus ``cfg.corpus`` names."""
    if _is_source(cfg.corpus):
        return Path(data_dir) / Path(cfg.corpus.removeprefix("hf:")).stem.replace("/", "_")
    return Path(data_dir) / cfg.corpus


def _is_source(corpus: str) -> bool:
    """A user source to build (a folder, .jsonl file or hf:<name>) rather than a corpus name; a
    path with folders or a .jsonl suffix is one even when it does not exist from here."""
    return (corpus.startswith("hf:") or corpus.endswith(".jsonl") or Path(corpus).name != corpus
            or (corpus != "polyglot" and Path(corpus).exists()))


def load_trained(path: str | Path) -> tuple[LM, TrainConfig, dict[str, Any]]:
    """(model in eval mode, its TrainConfig, checkpoint metadata) from a checkpoint file or run folder.

    Every tensor is verified against its stored digest; experts masked in training stay masked."""
    tensors, meta = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(meta["meta"]["config"], where=f"config stored in {path}")
    except KeyError:
        raise CheckpointError(f"checkpoint {path} stores no training config") from None
    model = LM(cfg.model)
    model_state(tensors, model, path)
    restore_moe_state(meta["moe"], model, path, stats=False)
    model.eval()
    return model, cfg, meta["meta"]
