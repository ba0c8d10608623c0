"""SIGKILL at random moments (timers, and inside checkpoint writes, fsyncs and renames), then
resume: the finished run equals an uninterrupted one bit for bit (weights, optimizer state, MoE
state, every metrics row). The campaign itself is tests/checkpoint_kill.py, run in a fresh
interpreter because it forks one child per attempt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KILLS = 18


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    script = Path(__file__).with_name("checkpoint_kill.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--kills", str(KILLS), "--seed", "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["failures"] == [], summary
    assert summary["kills"] == KILLS and summary["kills_survived"] == KILLS, summary
    # Most kills land inside a write, fsync or rename (the rest on timers).
    assert sum(summary["by_kind"][k] for k in ("write", "fsync", "replace", "replaced")) >= KILLS // 2, summary
    assert summary["episodes"] >= 2 and summary["bit_identical_episodes"] == summary["episodes"], summary
