"""The built wheel with no extras, in a fresh virtual environment, runs the main job to the end:
``moekit demo --size tiny`` (report with its plots) and ``moekit train`` on the tiny config.
Optional features whose package is missing (TensorBoard here) are skipped with one note."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Packages only the extras bring; none may be in the fresh environment.
EXTRA_ONLY = ("tensorboard", "transformers", "datasets", "tokenizers", "fastapi", "uvicorn", "huggingface_hub")


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_wheel_without_extras_runs_demo_and_train(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".schemathesis", "data_cache",
        "runs"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
          src], tmp_path, 300)
    wheel = next((tmp_path / "dist").glob("moekit-*.whl"))
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    py, moekit = env / "bin" / "python", env / "bin" / "moekit"
    # torch first, pinned: its CPU build lies on the machine's disk (as the Makefile installs it).
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, 600)
    _run([py, "-m", "pip", "install", "-q", wheel], tmp_path, 600)
    found = _run([py, "-c", "import importlib.util as u, sys; "
                  f"print([m for m in {EXTRA_ONLY!r} if u.find_spec(m)])"], tmp_path, 60)
    assert found.stdout.strip() == "[]", f"the base install pulled in extras: {found.stdout}"

    demo = _run([moekit, "demo", "--size", "tiny", "--no-apt", "--no-progress", "--threads", "1",
                 "--out-dir", "demo", "--data-dir", "data"], tmp_path, 600)
    assert "Traceback" not in demo.stderr
    assert "demo finished" in demo.stdout
    notes = [line for line in demo.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: TensorBoard logging skipped: tensorboard is not installed (pip install 'moekit[train]')"]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["models"]) == {"dense", "moe"}
    assert (tmp_path / "demo" / "report.html").read_text().count("data:image/png;base64,") >= 5

    docs = [{"text": f"document {i} " * 40, "label": "ab"[i % 2]} for i in range(40)]
    (tmp_path / "tiny.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    train = _run([moekit, "train", src / "configs" / "tiny_moe.json", "--steps", "2", "--corpus", "tiny.jsonl",
                  "--data-dir", "data", "--out-dir", "train"], tmp_path, 600)
    assert "Traceback" not in train.stderr and "step 2: validation loss" in train.stdout
    assert (tmp_path / "train" / "checkpoints" / "latest").is_file()
