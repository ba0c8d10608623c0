"""docs/hf.md runs: its python blocks in order in one namespace, its ``moekit`` shell commands
through the CLI, all in one temporary folder (tiny local models, no hub)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from moekit.cli import main as cli_main  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "hf.md"


def test_hf_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(), flags=re.S)
    assert sum(kind == "python" for kind, _ in blocks) >= 6
    commands = [line for kind, text in blocks if kind == "bash" for line in text.splitlines()]
    assert any("--from-hf" in c for c in commands) and any("--to-hf" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch.manual_seed(0)
    for i, (kind, text) in enumerate(blocks):
        if kind == "python":
            exec(compile(text, f"{DOC.name}[block {i}]", "exec"), namespace)
            continue
        for line in text.splitlines():
            argv = shlex.split(line)
            assert argv[0] == "moekit", line
            assert cli_main(argv[1:]) == 0, line
    assert (tmp_path / "tiny-qwen3-moekit" / "moekit_lm.json").is_file()
    assert (tmp_path / "tiny-qwen3-hf" / "config.json").is_file()
    assert (tmp_path / "tiny-qwen3-hf2" / "model.safetensors.index.json").is_file()
