"""Training loop for ``moekit.lm.LM``: AdamW (Loshchilov & Hutter 2019) with linear warm-up and
cosine decay, gradient clipping and accumulation, optional bf16 autocast, the MoE balancing
losses of every layer (``moekit.aux_loss``) and aux-loss-free bias updates after each step.

The model trains on ``TrainConfig.device`` (cpu, cuda, auto); autocast follows that device's type
and AdamW uses torch's fused kernel (``adamw_options``). Loss terms stay on the device as float64
sums across micro-batches and are read with the gradient norm once per optimizer step: one host sync.

Batches are a pure function of (seed, step, micro-step) (``moekit.data.batches``), so the data
position is the step count; a checkpoint holds model, optimizer, step, RNG states, routing
statistics and masked experts, and resuming (from the newest checkpoint that verifies) reproduces
the uninterrupted run's losses, weights and optimizer state bit for bit on the same machine;
``metrics.jsonl`` loses the rows past the resumed step, so it reads as one uninterrupted run.

Reuse hooks: ``Trainer.add_loss(name, fn)`` adds a term computed from (model, batch, logits) to
each micro-batch's loss (batches carry every token's document label); ``param_filter`` picks
what trains; ``evaluate`` returns loss overall, per label and, optionally, expert use per label;
``parallel`` (a ``moekit.parallel.training.TrainerParallel``) shards experts and batches.

Shape legend: B batch, S sequence, V vocabulary, L loss terms.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.batches import Batch, eval_batches, random_batch, train_batch_seed
from ..data.corpus import TokenData
from ..health import CorruptExpert, CorruptExpertError, quarantine_experts, scan_weights
from ..lm.model import LM
from ..model_ops import aux_loss, reset_routing_stats, routing_report, update_router_biases
from .checkpoint import CheckpointError, append_line, atomic_write_bytes, is_dcp, load_checkpoint, load_newest, \
    model_state, optimizer_state, prune_checkpoints, remove_stale_temp, restore_moe_state, save_checkpoint
from .config import TrainConfig, resolve_device
from .eval import evaluate_batches

LossFn = Callable[[LM, Batch, torch.Tensor], torch.Tensor]


def adamw_options(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation for parameters on ``device``: torch's fused kernel on CUDA and on the
    CPU. It makes one pass over each parameter (moments, decay and update together) where torch's
    CPU default, the single-tensor loop, runs about ten ops per parameter tensor, so it does less
    work on any CPU: the demo MoE's 3.5M parameters took 2.8 ms per step against 12.5 ms (1 thread,
    ``benchmarks/lm_step.py``). Results differ from the loop in the last bits only; a checkpoint
    saved by the loop resumes with the loop (its parameter groups carry the choice)."""
    if device.type in ("cuda", "cpu"):
        return {"fused": True}
    return {}


class Trainer:
    """Trains ``model`` (built from ``cfg.model`` if not given) on ``data``; writes to ``cfg.out_dir``."""

    def __init__(self, cfg: TrainConfig, data: TokenData, model: LM | None = None,
                 param_filter: Callable[[str, torch.nn.Parameter], bool] | None = None,
                 parallel: Any = None) -> None:
        self.cfg = cfg
        self.data = data
        # Expert/data parallelism hook: a moekit.parallel.training.TrainerParallel, or None.
        self.parallel = parallel
        self.device = resolve_device(cfg.device)
        parallel_device = getattr(getattr(parallel, "groups", None), "device", None)
        if parallel_device is not None and parallel_device.type != self.device.type:
            raise ConfigError(f"device={cfg.device!r} resolves to {self.device}, but expert parallelism runs its "
                              f"collectives on {parallel_device}; set device to match (or 'auto')")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.model.vocab_size < _vocab_needed(data):
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{_vocab_needed(data)} ids (tokenizer {data.tokenizer_name})")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # Built on the CPU from the seeded CPU generator, then moved: the same initial weights on every device.
        self.model = (model if model is not None else LM(cfg.model)).to(self.device)
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
                                           betas=(cfg.beta1, cfg.beta2), **adamw_options(self.device))
        if parallel is not None:
            parallel.attach_optimizer(self.optimizer, self.model)
        self.step = 0
        self.train_time = 0.0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self._tb: Any = None
        self._purge_from: int | None = None
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
        """Micro-batch ``micro`` of optimizer step ``step``: this rank's rows, on the training device."""
        b = random_batch(self.data.train, self.cfg.batch_size, self.cfg.seq_len,
                         train_batch_seed(self.cfg.seed, step, micro))
        return (b if self.parallel is None else self.parallel.local_batch(b)).to(self.device)

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast on the training device's type when ``cfg.autocast == "bf16"``, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16")

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        cfg, model = self.cfg, self.model
        model.train()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        names = ["ce", "aux", *self.extra_losses]
        # Each term / grad_accum summed in float64, as Python floats were: the same logged values.
        sums_L = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        start = time.perf_counter()
        # Under parallelism the forward runs through the data-parallel wrapper, which averages the
        # gradients during the last micro-batch's backward.
        forward = model if self.parallel is None else self.parallel.train_module
        for micro in range(cfg.grad_accum):
            b = self.batch(self.step, micro)
            last = micro == cfg.grad_accum - 1
            with nullcontext() if self.parallel is None else self.parallel.no_sync(last):
                with self.autocast():
                    logits_BSV = forward(b.input_ids)
                    ce = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), b.targets.reshape(-1))
                    terms = {"ce": ce, "aux": aux_loss(model)}
                    for name, fn in self.extra_losses.items():
                        terms[name] = fn(model, b, logits_BSV)
                loss = sum(terms.values())
                (loss / cfg.grad_accum).backward()
            sums_L += torch.stack([_as_float64(terms[k], self.device) for k in names]) / cfg.grad_accum
        del forward
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.parallel is not None:
            grad_norm = self.parallel.clip(model, params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # The step's one host sync: every loss term and the gradient norm in one read.
        *values, norm = torch.cat([sums_L, grad_norm.detach().to(self.device, torch.float64).reshape(1)]).tolist()
        sums = dict(zip(names, values))
        if self.parallel is not None:
            sums = self.parallel.mean_metrics(sums)
        if not math.isfinite(norm):
            raise FloatingPointError(f"step {self.step}: gradient norm is {norm}; "
                                     f"lower lr={cfg.lr} or check the data")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_router_biases(model)
        self.train_time += time.perf_counter() - start
        self.step += 1
        self.tokens_seen += cfg.tokens_per_step
        record = {"step": self.step, "tokens": self.tokens_seen, "time_s": self.train_time, "lr": lr,
                  "loss": sums["ce"], **{k: v for k, v in sums.items() if k != "ce"}, "grad_norm": norm}
        self.history.append(record)
        return record

    def evaluate(self, max_tokens: int | None = None, routing_by_label: bool = False) -> dict[str, Any]:
        """Validation loss overall and per label (mean over target tokens carrying that label).

        With ``routing_by_label``, also ``routing_by_label[layer] = (N labels, E) counts`` of top-k picks.
        """
        batches = eval_batches(self.data.val, self.cfg.batch_size, self.cfg.seq_len, max_tokens or self.cfg.eval_tokens)
        return evaluate_batches(self.model, batches, self.data.label_names, self.device, self.autocast,
                                routing_by_label=routing_by_label)

    # ------------------------------------------------------------------ checkpoints
    def state_meta(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _py_state(random.getstate()),
                               "numpy": _np_state(np.random.get_state())}
        if self.device.type == "cuda":
            # Router noise on a GPU draws from the device's generator; CPU runs keep the CPU-only layout.
            rng["cuda"] = torch.cuda.get_rng_state(self.device).tolist()
        return {
            "config": self.cfg.to_dict(), "step": self.step, "train_time": self.train_time,
            "tokens_seen": self.tokens_seen, "label_names": self.data.label_names,
            "tokenizer": self.data.tokenizer_name, "rng": rng,
        }

    def save(self) -> Path:
        """Save a checkpoint (one process: ``step_N.safetensors``; expert-parallel: a sharded
        ``step_N.dcp`` folder, each rank writing its own experts) and keep the newest ``keep_checkpoints``."""
        folder = self.out_dir / "checkpoints"
        if self.parallel is None:
            return save_checkpoint(folder, self.step, self.model, self.optimizer, self.state_meta(),
                                   keep=self.cfg.keep_checkpoints)
        if self.parallel.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temp(folder)
        path = self.parallel.save(folder, self.step, self.model, self.optimizer, self.state_meta())
        if self.parallel.is_main:
            prune_checkpoints(folder, self.cfg.keep_checkpoints, path)
        return path

    def resume(self, path: str | Path) -> Path:
        """Load model, optimizer, step, timers, RNG states, routing statistics and masked experts.

        ``path`` is a checkpoint file or DCP folder, or a run/checkpoint folder: its newest checkpoint
        (of either kind) that loads and verifies (newer ones that do not are named in
        ``self.resume_skipped``). Returns the checkpoint used. Under expert parallelism each rank
        reads only its experts' rows of a DCP folder; a single-process file loads whole and is sliced."""
        path = Path(path)
        self.resume_skipped = []
        # Expert-parallel ranks verify a DCP folder's files but read its tensors through the DCP loader.
        full = self.parallel is None
        if path.is_dir() and not is_dcp(path):
            found = load_newest(path, dcp_tensors=full)
            if found is None:
                raise CheckpointError(f"{path} holds no checkpoint (no step_*.safetensors or step_*.dcp in it "
                                      f"or in {path / 'checkpoints'})")
            path, tensors, meta, self.resume_skipped = found
        else:
            tensors, meta = load_checkpoint(path, dcp_tensors=full)
        if not full and is_dcp(path):
            self.parallel.load(path, self.model, self.optimizer)
        else:
            model_state(tensors, self.model, path)
            # load_state_dict casts optimizer moments to their parameter's device (and dtype).
            optimizer_state(tensors, meta["optim"], self.optimizer, path)
        restore_moe_state(meta["moe"], self.model, path, stats=True)
        m = meta["meta"]
        self.step, self.train_time, self.tokens_seen = m["step"], m["train_time"], m["tokens_seen"]
        rng = m["rng"]
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8), self.device)
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np_state = rng["numpy"]
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

                # purge_step: events a killed run wrote past the step this run starts from are dropped,
                # as trim_metrics drops its metrics.jsonl rows. False: tensorboard is not installed
                # (noted once), so the run logs metrics.jsonl only.
                self._tb = tensorboard_writer(self.out_dir / "tensorboard", purge_step=self._purge_from) or False
            if self._tb is False:
                return
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
                elif k == "per_label":
                    for label, value in v.items():
                        self._tb.add_scalar(f"{prefix}/loss_{label}", value, record["step"])

    def _first_new_step(self) -> int:
        """The first step whose rows this run writes: rows at the resumed step were written before its
        checkpoint was saved, except at step 0, whose evaluation runs again."""
        return self.step + 1 if self.step > 0 else 0

    def trim_metrics(self) -> None:
        """Drop the rows of ``metrics.jsonl`` this run will write again, and any torn line; the file is
        replaced atomically (see ``_first_new_step``)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        first_new = self._first_new_step()
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
            self._purge_from = self._first_new_step()
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


def _as_float64(term: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A scalar loss term as a float64 0-dim tensor on ``device``, exactly. A term left on the host
    (``aux_loss`` of a model without MoE layers is a CPU zero) is filled in on the device rather
    than copied there: a copy from pageable host memory would block the host."""
    term = term.detach().reshape(())
    if term.device != device:
        return torch.full((), float(term), dtype=torch.float64, device=device)
    return term.to(torch.float64)


def _vocab_needed(data: TokenData) -> int:
    arrays = [data.train.tokens, data.val.tokens]
    return int(max(int(a.max()) for a in arrays if len(a))) + 1


def _py_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _np_state(state: tuple) -> list:
    return [state[0], state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in state[2:]]]


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[LM, TrainConfig, dict[str, Any]]:
    """(model in eval mode on ``device``, its TrainConfig, checkpoint metadata) from a checkpoint file or
    run folder. Every tensor is verified against its stored digest; experts masked in training stay masked."""
    tensors, meta = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(meta["meta"]["config"], where=f"config stored in {path}")
    except KeyError:
        raise CheckpointError(f"checkpoint {path} stores no training config") from None
    model = LM(cfg.model)
    model_state(tensors, model, path)
    restore_moe_state(meta["moe"], model, path, stats=False)
    model.to(device).eval()
    return model, cfg, meta["meta"]


def load_checked(path: str | Path, quarantine: bool = False,
                 device: str | torch.device = "cpu") -> tuple[LM, TrainConfig, list[CorruptExpert]]:
    """``load_trained`` plus a weight scan (``moekit.health.scan_weights``): (model, TrainConfig,
    findings). Corrupted experts raise CorruptExpertError naming the file, unless ``quarantine``
    masks them (``moekit.health.quarantine_experts``)."""
    model, cfg, _ = load_trained(path, device)
    findings = scan_weights(model)
    if findings:
        if not quarantine:
            raise CorruptExpertError(findings, str(path))
        quarantine_experts(model, findings)
    return model, cfg, findings
