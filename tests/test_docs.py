"""The python blocks of docs/layer.md and of the README run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "layer.md"


def test_layer_doc_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    assert (tmp_path / "moe.json").exists()


def test_readme_examples_run(tmp_path, monkeypatch):
    """Every README python block that needs no downloaded checkpoint runs as printed."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    runnable = [b for b in blocks if "path/to/" not in b]
    assert len(runnable) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(runnable):
        exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
    assert namespace["deepseek"].router.selection_bias is not None
