"""`moekit train CONFIG --expert-parallel P` under torchrun (gloo, CPU): the same losses as one
process, and checkpoints that resume under another EP size.

Runs: A single process, 6 steps; B torchrun 2 ranks EP=2, 6 steps (sharded DCP checkpoints);
C torchrun 4 ranks EP=4 and D single process, both resumed from B's step-3 DCP folder; E torchrun
2 ranks EP=2 resumed from A's step-3 single-process file. Per-step losses agree to 1e-4
(observed: equal to 6 decimals); fp32, differences come only from the order of gradient sums.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moekit import moe_config
from moekit.lm import LMConfig
from moekit.train import TrainConfig, load_trained
from moekit.train.checkpoint import load_checkpoint

TOL = 1e-4


def _write_run(tmp: Path) -> Path:
    rng = random.Random(0)
    with open(tmp / "docs.jsonl", "w") as f:
        for i in range(60):
            label = "letters" if i % 2 else "digits"
            alphabet = "abcdefgh " if i % 2 else "0123456789+-*/ "
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(300)), "label": label}) + "\n")
    model = LMConfig(vocab_size=257, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=16,
                     moe=moe_config(dim=16, num_experts=4, expert_hidden=16, top_k=2, aux_loss_coef=0.01,
                                    z_loss_coef=1e-3))
    cfg = TrainConfig(model=model, corpus=str(tmp / "docs.jsonl"), data_dir=str(tmp / "data"), seq_len=16,
                      batch_size=4, steps=6, warmup_steps=2, eval_every=3, ckpt_every=3, eval_tokens=128,
                      log_every=1, out_dir=str(tmp / "run"), progress=False, tensorboard=False, threads=1)
    cfg.save(tmp / "cfg.json")
    return tmp / "cfg.json"


def _moekit(args: list[str], nproc: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "moekit", *args]
    else:
        cmd = [sys.executable, "-m", "moekit", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _losses(run: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r.get("kind", "train"), r["step"]): r["loss"] for r in rows}


def _resume_dir(src: Path, dst: Path, name: str) -> None:
    (dst / "checkpoints").mkdir(parents=True)
    if name.endswith(".dcp"):
        shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    else:
        shutil.copy(src / "checkpoints" / name, dst / "checkpoints")
    (dst / "checkpoints" / "latest").write_text(name)


@pytest.mark.slow
def test_torchrun_ep2_matches_single_process_and_resumes_under_ep1_ep4(tmp_path):
    cfg = _write_run(tmp_path)
    _moekit(["train", str(cfg), "--out-dir", "A"], 0, tmp_path)
    _moekit(["train", str(cfg), "--out-dir", "B", "--expert-parallel", "2"], 2, tmp_path)
    A, B = _losses(tmp_path / "A"), _losses(tmp_path / "B")
    assert sorted(A) == sorted(B) and len(A) >= 8
    for key, loss in A.items():
        assert abs(B[key] - loss) <= TOL, f"{key}: EP=2 loss {B[key]} vs single process {loss}"

    # Under EP every checkpoint is a sharded DCP folder (each rank wrote its own experts); keep=2.
    assert sorted(p.name for p in (tmp_path / "B" / "checkpoints").iterdir()) == \
        ["latest", "step_00000003.dcp", "step_00000006.dcp"]
    _resume_dir(tmp_path / "B", tmp_path / "C", "step_00000003.dcp")
    _resume_dir(tmp_path / "B", tmp_path / "D", "step_00000003.dcp")
    _resume_dir(tmp_path / "A", tmp_path / "E", "step_00000003.safetensors")
    _moekit(["train", str(cfg), "--out-dir", "C", "--expert-parallel", "4", "--resume"], 4, tmp_path)
    _moekit(["train", str(cfg), "--out-dir", "D", "--resume"], 0, tmp_path)
    _moekit(["train", str(cfg), "--out-dir", "E", "--expert-parallel", "2", "--resume"], 2, tmp_path)
    for name in ("C", "D", "E"):
        resumed = _losses(tmp_path / name)
        assert min(step for _, step in resumed) == 4
        for key, loss in resumed.items():
            assert abs(loss - A[key]) <= TOL, f"{name} {key}: resumed loss {loss} vs uninterrupted {A[key]}"

    # Every run's final checkpoint (file or DCP folder) loads in one process to (nearly) the same tensors.
    ref, _ = load_checkpoint(tmp_path / "A" / "checkpoints" / "step_00000006.safetensors")
    for name, kind in (("B", "dcp"), ("C", "dcp"), ("D", "safetensors"), ("E", "dcp")):
        got, meta = load_checkpoint(tmp_path / name / "checkpoints" / f"step_00000006.{kind}")
        assert meta["step"] == 6 and meta["moe"], name
        assert sorted(got) == sorted(ref)
        for key, value in ref.items():
            assert got[key].shape == value.shape, key
            assert torch.allclose(got[key], value, atol=1e-5), f"{name} {key}"
    # load_trained takes the run folder of an EP run: the one-process model of the DCP folder.
    model, _, meta = load_trained(tmp_path / "B")
    assert meta["step"] == 6 and meta["expert_parallel"] == 2
    for key, value in model.state_dict().items():
        assert torch.allclose(value, ref[f"model.{key}"], atol=1e-5), key
