"""Sharded DCP checkpoints of an expert-parallel layer (gloo, 2 processes on loopback): saved under
EP=2 (each rank writes its own expert rows), loaded under EP=1 x DP=2 and in one process without
a process group; digests catch a changed file."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from moekit.errors import CheckpointError
from moekit.parallel.dcp import load_dcp
from moekit.parallel.testing import dcp_worker, free_port


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(dcp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


def test_reload_under_another_ep_size_restores_model_and_optimizer(saved):
    for rank in range(2):
        err = json.loads((saved / f"rank{rank}.json").read_text())
        assert err.pop("expert_rows_here") == 8  # EP=1: every rank holds all experts after the reload
        bad = {k: v for k, v in err.items() if not v <= 1e-7}
        assert not bad, f"rank {rank}: reload differs from the saved run: {bad}"


def test_one_process_load_without_a_process_group(saved):
    ref = torch.load(saved / "reference.pt")
    tensors, meta = load_dcp(saved / "step_00000001.dcp")
    assert meta["step"] == 1 and meta["meta"] == {"note": "dcp test"} and "moe" in meta
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    assert sorted(model) == sorted(ref["model"])
    for k, v in ref["model"].items():
        assert torch.equal(model[k], v), k
    assert model["experts.gate_up_proj"].shape[0] == 8
    optim = [k for k in tensors if k.startswith("optim.")]
    assert any(k.endswith(".exp_avg_sq") for k in optim) and (saved / "latest").read_text() == "step_00000001.dcp"
    assert not list(saved.glob("*.tmp"))


def test_changed_file_fails_its_digest(saved, tmp_path):
    import shutil

    copy = tmp_path / "step_00000001.dcp"
    shutil.copytree(saved / "step_00000001.dcp", copy)
    shard = next(f for f in copy.iterdir() if f.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"file '{shard.name}' is missing, extra or fails its sha256"):
        load_dcp(copy)


def _mixed_run(saved, folder):
    """A checkpoint folder with a single-process file at steps 0 and 2 around the EP=2 DCP folder at step 1."""
    import shutil

    from moekit.train.checkpoint import save_checkpoint

    folder.mkdir()
    save_checkpoint(folder, 0, torch.nn.Linear(2, 2), None, {"note": "file"}, keep=0)
    shutil.copytree(saved / "step_00000001.dcp", folder / "step_00000001.dcp")
    return folder


def test_newest_verified_checkpoint_across_files_and_dcp_folders(saved, tmp_path):
    from moekit.errors import ChecksumError
    from moekit.train.checkpoint import checkpoints, load_checkpoint, load_newest, save_checkpoint

    folder = _mixed_run(saved, tmp_path / "checkpoints")
    ref = torch.load(saved / "reference.pt")
    path, tensors, meta, skipped = load_newest(tmp_path)
    assert path.name == "step_00000001.dcp" and not skipped and meta["meta"] == {"note": "dcp test"}
    for k, v in ref["model"].items():
        assert torch.equal(tensors[f"model.{k}"], v), k
    assert load_checkpoint(tmp_path)[1]["step"] == 1  # a run folder resolves to its newest, a DCP folder
    # Verified without tensors (an expert-parallel resume reads its rows itself).
    assert load_newest(tmp_path, dcp_tensors=False)[2] == meta and load_newest(tmp_path, dcp_tensors=False)[1] == {}

    shard = next(f for f in (folder / "step_00000001.dcp").iterdir() if f.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    path, _, meta, skipped = load_newest(tmp_path)
    assert path.name == "step_00000000.safetensors" and meta["meta"] == {"note": "file"}
    assert len(skipped) == 1 and "step_00000001.dcp" in skipped[0] and "sha256" in skipped[0]
    with pytest.raises(ChecksumError):
        load_checkpoint(folder / "step_00000001.dcp")

    # keep=2 counts both kinds: the next file removes the oldest checkpoint, whatever its kind.
    save_checkpoint(folder, 2, torch.nn.Linear(2, 2), None, {"note": "file"}, keep=2)
    assert [p.name for p in checkpoints(folder)] == ["step_00000002.safetensors", "step_00000001.dcp"]
    save_checkpoint(folder, 3, torch.nn.Linear(2, 2), None, {"note": "file"}, keep=2)
    assert [p.name for p in checkpoints(folder)] == ["step_00000003.safetensors", "step_00000002.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000002.safetensors",
                                                       "step_00000003.safetensors"]


def test_stale_dcp_temp_folders_are_removed_unless_their_writer_lives(tmp_path):
    import subprocess
    import sys

    from moekit.files import WRITER_FILE
    from moekit.train.checkpoint import remove_stale_temp

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    writers = {"step_00000001.dcp.tmp": dead.stdout.strip(),  # its writer exited
               "step_00000002.dcp.tmp": None,                  # killed before it named its writer
               "step_00000003.dcp.tmp": str(os.getppid())}     # a live writer (another process)
    for name, pid in writers.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"x")
        if pid is not None:
            (tmp_path / name / WRITER_FILE).write_text(pid)
    removed = remove_stale_temp(tmp_path)
    assert sorted(p.name for p in removed) == ["step_00000001.dcp.tmp", "step_00000002.dcp.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.dcp.tmp"]
