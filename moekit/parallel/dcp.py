"""Sharded checkpoints of an expert-parallel model with torch.distributed.checkpoint (DCP): every
rank writes only the expert rows it holds (no rank gathers all experts); the folder loads under
any EP size (DCP reshards) and in one process, without a process group.

Layout of ``folder/step_<step>.dcp/``: DCP's files, holding the same logical tensors as the
single-process safetensors checkpoint (``model.<name>``, full (E, ...) expert tensors stored as
their shards; ``optim.<index>.<name>`` for the optimizer), ``moekit.json`` with the rest of the
metadata (``{"step", "meta", "optim", "moe"}``, as ``train.checkpoint.load_checkpoint`` returns
it) and ``sha256.json``, the digest of every other file. The folder is written as
``step_<step>.dcp.tmp`` (holding its writer's process id until the shards are written, so
``train.checkpoint.remove_stale_temp`` leaves a live save alone) and renamed when complete, so a
killed save leaves no folder that looks whole; a file that changes afterwards fails its digest
on load (ChecksumError). ``train.checkpoint`` lists, resumes, loads and prunes these folders
beside the single-process files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import CheckpointError, ChecksumError
from ..files import WRITER_FILE, atomic_write_bytes, fsync_dir, mark_writer
from ..model_ops import moe_state
from .errors import guarded
from .expert_parallel import ExpertParallelMoE
from .groups import ParallelGroups

META_FILE, DIGEST_FILE = "moekit.json", "sha256.json"


def _expert_keys(model: nn.Module) -> dict[str, int]:
    """Parameter name -> global expert count, for every expert shard of ``model``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for p, _ in module.experts.named_parameters():
                out[f"{name}.experts.{p}" if name else f"experts.{p}"] = module.num_experts
    return out


def _local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name, this rank's tensors (no state-dict hooks,
    hence no gather); the second name of a tied weight is left out, as the safetensors layout does."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        items = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
        for n, t in items:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            out[f"{mod_name}.{n}" if mod_name else n] = t.detach()
    return out


def _sharded(local: torch.Tensor, num_experts: int, groups: ParallelGroups) -> DTensor:
    """This rank's (E/P, ...) rows as a DTensor of the full (E, ...) tensor: Shard(0) over "ep",
    Replicate over "dp" (DCP writes each shard once)."""
    shape = torch.Size((num_experts, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, groups.mesh, [Replicate(), Shard(0)], run_check=False, shape=shape, stride=stride)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
           groups: ParallelGroups) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The DCP state (tensors sharing storage with the model and optimizer) and the optimizer's
    JSON part ({"param_groups", "scalars"}, as ``train.checkpoint.optimizer_tensors``)."""
    experts = _expert_keys(model)
    state: dict[str, torch.Tensor] = {}
    for k, t in _local_state(model).items():
        state[f"model.{k}"] = _sharded(t, experts[k], groups) if k in experts else t
    optim: dict[str, Any] = {"param_groups": [], "scalars": {}}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        idx = 0
        for group in optimizer.param_groups:
            optim["param_groups"].append({**{k: v for k, v in group.items() if k != "params"},
                                          "params": list(range(idx, idx + len(group["params"])))})
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor):
                        optim["scalars"].setdefault(str(idx), {})[key] = value
                    elif names.get(id(p)) in experts and value.shape == p.shape:
                        state[f"optim.{idx}.{key}"] = _sharded(value, experts[names[id(p)]], groups)
                    else:
                        state[f"optim.{idx}.{key}"] = value
                idx += 1
    return state, optim


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file() and f.name != DIGEST_FILE}


def save_dcp(folder: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             meta: dict[str, Any], groups: ParallelGroups) -> Path:
    """Write ``folder/step_<step>.dcp`` (collective: every rank writes its shards; rank 0 the
    metadata, the digests, the rename and the ``latest`` pointer). Returns the folder. Pruning
    older checkpoints is the caller's (``train.checkpoint.prune_checkpoints``)."""
    groups.require_open("save_dcp")
    folder = Path(folder)
    final, tmp = folder / f"step_{step:08d}.dcp", folder / f"step_{step:08d}.dcp.tmp"
    if groups.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mark_writer(tmp)
    guarded("barrier(checkpoint folder)", lambda: dist.barrier(), groups.timeout_s)
    state, optim = _state(model, optimizer, groups)
    guarded("dcp.save", lambda: dcp.save(state, checkpoint_id=tmp), groups.timeout_s)
    if groups.is_main:
        record = {"step": step, "meta": meta, "optim": optim, "moe": moe_state(model)}
        (tmp / WRITER_FILE).unlink()
        atomic_write_bytes(tmp / META_FILE, json.dumps(record).encode())
        atomic_write_bytes(tmp / DIGEST_FILE, json.dumps(_digests(tmp), sort_keys=True).encode())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(folder)
        atomic_write_bytes(folder / "latest", final.name.encode())
    guarded("barrier(checkpoint written)", lambda: dist.barrier(), groups.timeout_s)
    return final


def verify_dcp(folder: str | Path) -> dict[str, Any]:
    """Check every file of a DCP checkpoint against ``sha256.json``; returns its metadata
    ({"step", "meta", "optim", "moe"}). A missing, extra or changed file raises ChecksumError,
    a folder without its metadata CheckpointError; both name the folder."""
    folder = Path(folder)
    try:
        stored = json.loads((folder / DIGEST_FILE).read_text())
        record = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"DCP checkpoint {folder} is incomplete or damaged ({err})") from None
    found = _digests(folder)
    bad = sorted(n for n in set(stored) | set(found) if stored.get(n) != found.get(n))
    if bad:
        raise ChecksumError(f"DCP checkpoint {folder}: file {bad[0]!r} is missing, extra or fails its "
                              f"sha256 checksum; the checkpoint is corrupted")
    return record


def load_dcp(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a DCP checkpoint in one process, without a process group: full tensors
    in the single-process layout, as ``train.checkpoint.load_checkpoint`` returns them. Verifies
    every file's digest first."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    record = verify_dcp(folder)
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    tensors = {k: torch.empty(md.size, dtype=md.properties.dtype)
               for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}
    with warnings.catch_warnings():
        # DCP says it assumes a single process without a process group: that is this function's intent.
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    return tensors, record


def load_dcp_parallel(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                      groups: ParallelGroups, verified: bool = False) -> dict[str, Any]:
    """Load a DCP checkpoint into an expert-parallel ``model`` (and ``optimizer``) under any EP size,
    in place: each rank reads the rows of the experts it holds. Collective. Returns the metadata.
    The optimizer's missing state entries are made as zeros of the stored shapes (this rank's rows
    for expert moments), then filled. ``verified``: the caller has just run ``verify_dcp`` on this
    folder (the digests are not computed again)."""
    folder = Path(folder)
    record = json.loads((folder / META_FILE).read_text()) if verified else verify_dcp(folder)
    if optimizer is not None:
        stored = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for key, md in stored.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                p = params[int(idx)]
                entry = optimizer.state.setdefault(p, {})
                if name not in entry:
                    full_like_param = tuple(md.size)[1:] == tuple(p.shape[1:]) and len(md.size) == p.dim()
                    entry[name] = torch.zeros_like(p) if full_like_param else torch.zeros(md.size, dtype=md.properties.dtype)
    state, _ = _state(model, optimizer, groups)
    guarded("dcp.load", lambda: dcp.load(state, checkpoint_id=folder), groups.timeout_s)
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for idx, scalars in record["optim"].get("scalars", {}).items():
            optimizer.state[params[int(idx)]].update(scalars)
        for group, saved in zip(optimizer.param_groups, record["optim"]["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    return record
