"""Training under expert + data parallelism: batch sharding, data-parallel wrappers, clipping by
the global norm, optimizer-state resharding, and sharded checkpoints (``parallel.dcp``: each rank
writes and reads only its own expert rows).

Convention: every rank's loss is its local objective (mean over its own tokens, plus the
global balancing losses), and gradients are *averaged* over the world by
``DistributedDataParallel`` (``data_parallel.replicate``: non-expert parameters over the world,
expert shards over their expert-DP replicas, divided by the world size). With equal per-rank
batches this equals the single-process gradient of the mean loss over the whole batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .data_parallel import no_sync, replicate
from .errors import MoekitDistributedError, guarded
from .expert_parallel import ExpertParallelMoE, expert_parameters, gather_experts, shard_model
from .groups import ParallelGroups, destroy_parallel, init_parallel

T = TypeVar("T")


def shard_batch(tensor_B: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """This rank's rows of a global batch: rows [r*B/N, (r+1)*B/N) along dim 0."""
    B, N = tensor_B.shape[0], groups.world_size
    if B % N != 0:
        raise ValueError(f"batch_size={B} is not divisible by the world size {N}; use a multiple of {N}")
    per = B // N
    return tensor_B[groups.rank * per:(groups.rank + 1) * per]


def clip_grad_norm(model: nn.Module, params: list[torch.Tensor], max_norm: float,
                   groups: ParallelGroups) -> torch.Tensor:
    """Clip by the global gradient norm (call after the data-parallel backward has averaged them).

    Replicated gradients count once; expert shards' squared norms are summed over the EP group.
    Returns the total norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` does.
    """
    experts = expert_parameters(model)
    with_grad = [p for p in params if p.grad is not None]
    zero = torch.zeros((), dtype=torch.float64, device=groups.device)
    dense_sq = sum((p.grad.double().square().sum() for p in with_grad if id(p) not in experts), zero)
    expert_sq = sum((p.grad.double().square().sum() for p in with_grad if id(p) in experts), zero.clone())
    if groups.ep_size > 1:
        guarded("all_reduce(gradient norm)", lambda: dist.all_reduce(expert_sq, group=groups.ep_group),
                groups.timeout_s)
    total = (dense_sq + expert_sq).sqrt()
    if max_norm > 0 and torch.isfinite(total) and float(total) > max_norm:
        coef = max_norm / (float(total) + 1e-6)
        for p in with_grad:
            p.grad.mul_(coef)
    return total.float()


def attach_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, groups: ParallelGroups) -> None:
    """Make ``optimizer.state_dict()`` hold full (E, ...) expert states (gathered over the EP
    group) and ``load_state_dict`` accept them (keeping this rank's slice); both are collective."""
    shard_of: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, ExpertParallelMoE):
            for p in module.experts.parameters():
                shard_of[id(p)] = module.num_experts

    def indexed() -> list[tuple[int, torch.Tensor]]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return list(enumerate(params))

    def gather(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state = {}
        for idx, p in indexed():
            entry = state_dict["state"].get(idx)
            if entry is None:
                continue
            if id(p) in shard_of:
                # Sorted keys: every rank must gather the same tensors in the same order (the key
                # order of a state loaded from safetensors differs from process to process).
                entry = {k: (gather_experts(entry[k], groups) if isinstance(entry[k], torch.Tensor)
                             and entry[k].dim() >= 1 and entry[k].shape == p.shape else entry[k])
                         for k in sorted(entry)}
            state[idx] = entry
        return {"state": state, "param_groups": state_dict["param_groups"]}

    def slice_(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state = dict(state_dict["state"])
        for idx, p in indexed():
            E = shard_of.get(id(p))
            if E is None or idx not in state or p.shape[0] == E:
                continue
            ids = groups.experts_of(E)
            state[idx] = {k: (v[ids.start:ids.stop] if isinstance(v, torch.Tensor) and v.dim() >= 1
                              and v.shape[0] == E and v.shape[1:] == p.shape[1:] else v)
                          for k, v in state[idx].items()}
        return {**state_dict, "state": state}

    optimizer.register_state_dict_post_hook(gather)
    optimizer.register_load_state_dict_pre_hook(slice_)


class TrainerParallel:
    """What ``moekit.train.Trainer`` calls under ``--expert-parallel``: one object, so the trainer's
    hooks stay one line each. Every rank runs the same global batch schedule and keeps its rows."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups
        # The world DistributedDataParallel of the model (``replicate``); dropped by ``close``.
        self._wrapper: DistributedDataParallel | None = None

    @property
    def is_main(self) -> bool:
        return self.groups.is_main

    def setup_model(self, model: nn.Module) -> nn.Module:
        """Shard the experts (in place) and wrap the model for data parallelism; returns ``model``
        itself (its state-dict keys unchanged): run training forwards through ``train_module``."""
        model = shard_model(model, self.groups)
        self._wrapper = replicate(model, self.groups)
        return model

    @property
    def train_module(self) -> nn.Module:
        """The model under its data-parallel wrapper: call it for forwards whose backward trains.
        Do not keep it past ``run``: it holds the process groups (see ``data_parallel``)."""
        if self._wrapper is None:
            self.groups.require_open("train_module")
            raise RuntimeError("train_module needs setup_model first")
        return self._wrapper

    def no_sync(self, sync: bool) -> AbstractContextManager[None]:
        """Skip the gradient all-reduce unless ``sync``: for the micro-batches before a step's last."""
        return contextlib.nullcontext() if sync else no_sync(self.train_module)  # type: ignore[arg-type]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        attach_optimizer(optimizer, model, self.groups)

    def local_batch(self, batch: Any) -> Any:
        """This rank's rows of every tensor field of a batch dataclass."""
        import dataclasses

        return dataclasses.replace(batch, **{f.name: shard_batch(getattr(batch, f.name), self.groups)
                                             for f in dataclasses.fields(batch)})

    def clip(self, model: nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the (already averaged) gradients by their global norm; returns the norm."""
        return clip_grad_norm(model, params, max_norm, self.groups)

    def mean_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.groups.device)
        guarded("all_reduce(metrics)", lambda: dist.all_reduce(t), self.groups.timeout_s)
        return {k: float(v) / self.groups.world_size for k, v in zip(keys, t.tolist())}

    def save(self, folder: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> Path:
        """Save ``folder/step_<step>.dcp`` (``dcp.save_dcp``, collective): no rank gathers the experts."""
        from .dcp import save_dcp

        meta = {**meta, "expert_parallel": self.groups.ep_size, "world_size": self.groups.world_size}
        return save_dcp(folder, step, model, optimizer, meta, self.groups)

    def load(self, folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load a DCP checkpoint whose files the caller has verified (``dcp.verify_dcp``) into the
        sharded ``model`` and ``optimizer`` under this run's EP size (collective); returns its metadata."""
        from .dcp import load_dcp_parallel

        return load_dcp_parallel(folder, model, optimizer, self.groups, verified=True)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then on the others (e.g. building a shared data cache once)."""
        if self.is_main:
            result = fn()
        guarded("barrier(main first)", lambda: dist.barrier(), self.groups.timeout_s)
        if not self.is_main:
            result = fn()
        return result

    def run(self, fn: Callable[[], int]) -> int:
        """Run the training entry point, then tear torch.distributed down (``close``) on every path.

        A failed collective prints one line and returns 3; any other exception propagates after
        the teardown. Build everything that uses the groups (data, trainer) inside ``fn``.
        """
        try:
            return fn()
        except MoekitDistributedError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 3
        except BaseException as err:
            _release_frames(err)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Drop the data-parallel wrapper, destroy the process groups and join gloo's threads now
        (``destroy_parallel``); idempotent."""
        self._wrapper = None
        destroy_parallel(self.groups)


def _release_frames(err: BaseException) -> None:
    """Clear the locals of the finished frames in ``err``'s traceback and its chained causes.

    A step that failed half way leaves activations in those frames whose autograd graph holds a
    process group (the all-to-all saves it); cleared, the groups can go in the teardown that
    follows, instead of when the exception is freed, possibly at interpreter exit. The traceback
    itself (files, lines) is kept for the error report.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def start_parallel(ep_size: int, timeout_s: float = 300.0) -> TrainerParallel:
    """Initialise torch.distributed from torchrun's environment and build the EP/DP groups."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return TrainerParallel(init_parallel(ep_size, timeout_s))
