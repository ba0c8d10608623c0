"""Checkpoints in safetensors, written atomically and verified on every load.

One file per checkpoint, ``step_XXXXXXXX.safetensors``, holds the model weights (``model.*``),
the optimizer's tensors (``optim.*``) and, in the file's string metadata, everything else as JSON:
config, optimizer hyper-parameters, trainer state and RNG states (``meta``, ``optim``) and each
MoE layer's routing statistics and masked/frozen experts (``moe``).

Integrity: the metadata holds a SHA-256 digest of every tensor (over its dtype, shape and bytes)
and one of the metadata itself; ``load_checkpoint`` recomputes them and a mismatch raises
``ChecksumError`` naming the file and the tensor. (SHA-256 runs at about 1.6 GB/s with the CPU's
SHA instructions; a byte flipped anywhere in the file is caught, including values that stay finite.)

Atomicity: a file is written to ``.<name>.<pid>.tmp`` in the same folder, fsynced and renamed into
place, then the ``latest`` pointer is replaced the same way. A kill at any moment leaves only
complete checkpoint files under their final names; the newest of them by step number is the
resume point (``latest`` is kept for people and tools, but a kill between the rename and the
pointer update must not lose the newer file). Temporary files of dead writers are removed on the
next save or resume. A full disk raises ``DiskFullError`` with the space needed and removes the
temporary file, so the previous checkpoint stays the resume point.

Files written before checksums (``moekit-checkpoint-v1``) still load, unverified.

Sharded checkpoints: an expert-parallel run saves ``step_XXXXXXXX.dcp/`` folders instead
(``moekit.parallel.dcp``: torch.distributed.checkpoint, each rank writes its own expert rows, a
sha256 digest of every file). Listing, resuming (newest verified first, across both kinds),
loading (``load_checkpoint`` returns the same single-process tensors in one process), pruning to
the newest ``keep`` and removing dead writers' ``step_XXXXXXXX.dcp.tmp`` folders treat both kinds alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ChecksumError, DiskFullError
from ..files import NO_SPACE, atomic_write_bytes, fsync_dir, process_alive, writer_gone
from ..model_ops import moe_state, restore_moe_state

FORMAT = "moekit-checkpoint-v2"
LEGACY_FORMATS = ("moekit-checkpoint-v1",)
STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")
STEP_DCP = re.compile(r"^step_(\d+)\.dcp$")
DCP_TEMP = re.compile(r"^step_\d+\.dcp\.tmp$")
TEMP_FILE = re.compile(r"^\.(?:step_\d+\.safetensors|latest|metrics\.jsonl|config\.json)\.(\d+)\.tmp$")


# ---------------------------------------------------------------------- writing
def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline in one write; a short write (full disk) is cut back off, so the
    file never ends in half a line. Raises DiskFullError when there is no space."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError as err:
            os.ftruncate(fd, start)
            if err.errno in NO_SPACE:
                raise DiskFullError(f"no space left to append {len(data)} bytes to {path}") from None
            raise
        if written != len(data):
            os.ftruncate(fd, start)
            raise DiskFullError(f"no space left to append {len(data)} bytes to {path} "
                                f"(only {written} could be written; they were removed)")
    finally:
        os.close(fd)


def remove_stale_temp(folder: str | Path) -> list[Path]:
    """Remove temporary files of ``atomic_write_bytes`` (checkpoint, ``latest``, ``metrics.jsonl``,
    ``config.json``) and sharded checkpoints' ``step_*.dcp.tmp`` folders whose writer process is gone
    (or is this one, which has no write in progress when this is called); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if DCP_TEMP.match(p.name) and p.is_dir():
            if writer_gone(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            continue
        m = TEMP_FILE.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and process_alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------- digests and state
def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 over a CPU contiguous tensor's dtype, shape and bytes (as safetensors stores them)."""
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _meta_digest(metadata: dict[str, str]) -> str:
    body = json.dumps({k: v for k, v in metadata.items() if k != "meta_sha256"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied weights (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = v.data_ptr() if v.numel() else id(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


# ---------------------------------------------------------------------- save
def step_of(path: Path) -> int | None:
    """The step of a checkpoint's name (``step_N.safetensors`` or ``step_N.dcp``), else None."""
    m = STEP_FILE.match(path.name) or STEP_DCP.match(path.name)
    return int(m.group(1)) if m else None


def is_dcp(path: str | Path) -> bool:
    """Whether ``path`` is a sharded (DCP) checkpoint folder, ``step_N.dcp``."""
    path = Path(path)
    return STEP_DCP.match(path.name) is not None and path.is_dir()


def checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, files and DCP folders, newest first (temporary files and
    folders never carry the final name); at one step a DCP folder sorts before a file."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step_of(p), is_dcp(p), p) for p in folder.iterdir()
             if (STEP_FILE.match(p.name) and p.is_file()) or is_dcp(p)]
    return [p for *_, p in sorted(found, key=lambda s: s[:2], reverse=True)]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file, or a DCP folder by renaming it to its temporary name first (a kill
    during the removal leaves a folder ``remove_stale_temp`` clears, never a damaged checkpoint)."""
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    doomed = path.with_name(path.name + ".tmp")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(folder: str | Path, keep: int, newest: Path) -> None:
    """Keep the newest ``keep`` checkpoints of ``folder`` (both kinds) and ``newest``; ``keep`` <= 0 keeps all."""
    for p in checkpoints(folder)[keep:] if keep > 0 else []:
        if p != newest:
            remove_checkpoint(p)


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write ``folder/step_<step>.safetensors`` atomically with per-tensor digests, then the ``latest``
    pointer; keep the newest ``keep`` files. ``model``/``optimizer`` need only ``state_dict()``."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(folder)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in _unique_state(model).items()}
    optim_meta: dict[str, Any] = {}
    if optimizer is not None:
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
    metadata = {"format": FORMAT, "step": str(step), "meta": json.dumps(meta), "optim": json.dumps(optim_meta),
                "moe": json.dumps(moe_state(model)),
                "tensors_sha256": json.dumps({k: tensor_digest(v) for k, v in tensors.items()}, sort_keys=True)}
    metadata["meta_sha256"] = _meta_digest(metadata)
    path = folder / f"step_{step:08d}.safetensors"
    previous = next((p for p in checkpoints(folder) if p != path), None)
    keeps = f"; the previous checkpoint {previous.name} stays the resume point" if previous else \
        "; there is no earlier checkpoint to resume from"
    atomic_write_bytes(path, save(tensors, metadata=metadata), on_full=keeps)
    atomic_write_bytes(folder / "latest", path.name.encode(),
                       on_full=f"; {path.name} was written in full and is the resume point")
    prune_checkpoints(folder, keep, path)
    return path


# ---------------------------------------------------------------------- load
def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint file in ``folder`` (by step), or None if there is none yet.

    The ``latest`` pointer is only consulted to report a dangling pointer in a folder without files."""
    folder = Path(folder)
    found = checkpoints(folder)
    if found:
        return found[0]
    pointer = folder / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        raise CheckpointError(f"{pointer} names {name!r}, which does not exist in {folder}")
    return None


def checkpoint_folder(path: str | Path) -> Path | None:
    """The folder holding a run's checkpoints: ``path`` itself or ``path/checkpoints``."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if checkpoints(folder) or (folder / "latest").is_file():
            return folder
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or DCP folder, or a run/checkpoint folder (its newest checkpoint)."""
    path = Path(path)
    if is_dcp(path):
        return path
    if path.is_dir():
        folder = checkpoint_folder(path)
        found = latest_checkpoint(folder) if folder is not None else None
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint (no step_*.safetensors or step_*.dcp in it "
                                  f"or in {path / 'checkpoints'})")
        return found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _verify(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    stored_meta = metadata.get("meta_sha256")
    if stored_meta is None or stored_meta != _meta_digest(metadata):
        raise ChecksumError(f"checkpoint {path}: its metadata (config, optimizer settings, RNG and MoE state) "
                            f"fails its sha256 checksum; the file is corrupted")
    try:
        stored = json.loads(metadata["tensors_sha256"])
    except (KeyError, ValueError):
        raise ChecksumError(f"checkpoint {path}: its tensor checksums are missing or unreadable; "
                            f"the file is corrupted") from None
    missing = sorted(set(stored) - set(tensors))
    if missing:
        raise ChecksumError(f"checkpoint {path}: tensor {missing[0]!r} listed in the checksums is missing "
                            f"from the file; the file is corrupted")
    bad = [k for k in tensors if stored.get(k) != tensor_digest(tensors[k])]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ChecksumError(f"checkpoint {path}: tensor {bad[0]!r}{more} fails its sha256 checksum; "
                            f"the file is corrupted (resume from an older checkpoint)")


def load_checkpoint(path: str | Path, dcp_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a moekit checkpoint, every tensor verified against its digest.

    Metadata: {"step", "meta", "optim", "moe"}. A truncated, foreign or corrupted file raises
    CheckpointError (ChecksumError for a digest mismatch) naming the file. A DCP folder gives the
    same single-process tensors (``parallel.dcp.load_dcp``), or, without ``dcp_tensors``, none: its
    files verified, for an expert-parallel resume that reads each rank's rows itself."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = resolve_checkpoint(path)
    if is_dcp(path):
        from ..parallel.dcp import load_dcp, verify_dcp

        return load_dcp(path) if dcp_tensors else ({}, verify_dcp(path))
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({err})") from None
    metadata = header.get("__metadata__") or {}
    fmt = metadata.get("format")
    if fmt != FORMAT and fmt not in LEGACY_FORMATS:
        raise CheckpointError(f"{path} is a safetensors file but not a moekit checkpoint "
                              f"(metadata format={fmt!r}, expected {FORMAT!r})")
    if fmt == FORMAT or "meta_sha256" in metadata or "tensors_sha256" in metadata:
        _verify(path, tensors, metadata)
    try:
        meta = {"step": int(metadata["step"]), "meta": json.loads(metadata["meta"]),
                "optim": json.loads(metadata["optim"]), "moe": json.loads(metadata.get("moe", "{}"))}
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged moekit metadata ({err!r})") from None
    return tensors, meta


def load_newest(path: str | Path, dcp_tensors: bool = True
                ) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any], list[str]] | None:
    """The newest checkpoint of a run/checkpoint folder that loads and verifies, files and DCP
    folders alike: (path, tensors, metadata, one line per newer checkpoint skipped and why); None if
    the folder has none. If every one fails, the newest one's error is raised. ``dcp_tensors``: as
    ``load_checkpoint``."""
    folder = checkpoint_folder(path)
    if folder is None:
        return None
    remove_stale_temp(folder)
    files = checkpoints(folder)
    if not files:
        latest_checkpoint(folder)  # raises for a dangling pointer
        return None
    skipped: list[str] = []
    first: CheckpointError | None = None
    for f in files:
        try:
            tensors, meta = load_checkpoint(f, dcp_tensors)
        except CheckpointError as err:
            first = first or err
            skipped.append(f"skipped {f.name}: {err}")
            continue
        return f, tensors, meta, skipped
    assert first is not None
    raise type(first)(f"{first} (and no older checkpoint of {folder} loads either)" if len(files) > 1
                      else str(first))


def model_state(tensors: dict[str, torch.Tensor], model: torch.nn.Module, path: str | Path) -> None:
    """Load the ``model.*`` tensors into ``model``; missing/unexpected/mis-shaped keys name the file."""
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"checkpoint {path} has tensors of the wrong shape for the model: {bad[:3]}")
    model.load_state_dict(state, strict=False)


def optimizer_state(tensors: dict[str, torch.Tensor], optim_meta: dict[str, Any], optimizer: torch.optim.Optimizer,
                    path: str | Path) -> None:
    """Rebuild and load the optimizer state saved by ``save_checkpoint``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, scalars in optim_meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = optim_meta.get("param_groups")
    if groups is None:
        raise CheckpointError(f"checkpoint {path} has no optimizer state")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this optimizer ({err})") from None
