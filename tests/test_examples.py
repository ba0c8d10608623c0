"""The examples in examples/ run end to end at a tiny size: MoE and the dense baseline of the same
active size both learn (well above chance), the active-parameter counts differ only by the
routers, and the routing report covers every expert."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="scikit-learn is not installed; pip install -e '.[dev]' (or '.[examples]')")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"moekit_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_results(results: dict, chance: float, floor: float, experts: int, router_params: int) -> None:
    for kind in ("moe", "dense"):
        acc = results[kind]["mean_accuracy"]
        assert floor <= acc <= 1.0, f"{kind} accuracy {acc:.3f} is below {floor} (chance {chance:.2f})"
    # The dense baseline has top_k * expert_hidden hidden units: per token, the two differ by the routers only.
    assert results["moe"]["active_params"] - results["dense"]["active_params"] == router_params
    assert results["moe"]["total_params"] > results["moe"]["active_params"]
    for name, s in results["routing"].items():
        assert len(s["share"]) == experts
        assert sum(s["share"]) == pytest.approx(1.0, abs=0.01)
        assert 0 < s["entropy"] <= s["max_entropy"]


def test_vision_example_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "vision.json"
    results = load_example("vision_moe").main(["--tiny", "--json", str(out)])
    # tiny: dim 24, 1 block of 4 experts; 10 classes.
    check_results(results, chance=0.1, floor=0.3, experts=4, router_params=4 * 24)
    assert json.loads(out.read_text())["moe"]["accuracy"] == results["moe"]["accuracy"]
    text = capsys.readouterr().out
    assert "digits (sklearn)" in text and "blocks.0.ffn" in text


@pytest.mark.slow  # a fresh interpreter imports torch and scikit-learn (~10 s)
def test_tabular_example_runs_as_a_script(tmp_path) -> None:
    out = tmp_path / "tabular.json"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "tabular_moe.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "breast_cancer (sklearn)" in proc.stdout
    # tiny: dim 16, 1 block of 4 experts; 2 classes, majority class ~63%.
    check_results(json.loads(out.read_text()), chance=0.63, floor=0.85, experts=4, router_params=4 * 16)


def test_tabular_example_wine(tmp_path) -> None:
    results = load_example("tabular_moe").main(["--tiny", "--dataset", "wine"])
    check_results(results, chance=0.4, floor=0.75, experts=4, router_params=4 * 16)
