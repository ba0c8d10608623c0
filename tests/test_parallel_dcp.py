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
