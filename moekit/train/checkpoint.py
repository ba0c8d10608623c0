"""Checkpoints in safetensors, written atomically, with a "latest" pointer written last.

One file per checkpoint, ``step_XXXXXXXX.safetensors``, holds the model weights (``model.*``),
the optimizer's tensors (``optim.*``) and, in the file's string metadata, everything else as JSON
(config, optimizer hyper-parameters, trainer state, RNG states). A file is written to a temporary
name in the same folder, fsynced and renamed into place; then ``latest`` (holding the file name)
is replaced the same way. A crash therefore leaves either the old or the new checkpoint as
latest, never a half-written one; leftover ``*.tmp`` files are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "moekit-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def save_checkpoint(folder: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write ``folder/step_<step>.safetensors`` atomically, then the ``latest`` pointer; keep the newest ``keep``."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in _unique_state(model).items()}
    optim_meta: dict[str, Any] = {}
    if optimizer is not None:
        optim_tensors, optim_meta = optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
    metadata = {"format": FORMAT, "step": str(step), "meta": json.dumps(meta), "optim": json.dumps(optim_meta)}
    path = folder / f"step_{step:08d}.safetensors"
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    atomic_write_bytes(folder / "latest", path.name.encode())
    old = sorted(folder.glob("step_*.safetensors"))[:-keep] if keep > 0 else []
    for p in old:
        if p != path:
            p.unlink(missing_ok=True)
    return path


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


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``folder/latest`` names, or None if there is none yet."""
    folder = Path(folder)
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = folder / name
    if not name or not path.is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which does not exist in {folder}")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run/checkpoint folder (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for folder in (path, path / "checkpoints"):
            found = latest_checkpoint(folder)
            if found is not None:
                return found
        raise CheckpointError(f"{path} holds no checkpoint (no 'latest' pointer in it or in {path / 'checkpoints'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a moekit checkpoint; a truncated or foreign file raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = resolve_checkpoint(path)
    data = path.read_bytes()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({err})") from None
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a moekit checkpoint "
                              f"(metadata format={metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        meta = {"step": int(metadata["step"]), "meta": json.loads(metadata["meta"]),
                "optim": json.loads(metadata["optim"])}
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged moekit metadata ({err})") from None
    return tensors, meta


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
