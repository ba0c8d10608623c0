"""The python blocks of docs/layer.md and of the README run, in order, in one namespace."""

from __future__ import annotations

import torch
from doc_blocks import ROOT, python_blocks, run_blocks

DOC = ROOT / "docs" / "layer.md"


def test_layer_doc_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(DOC)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    run_blocks(blocks, DOC.name)
    assert (tmp_path / "moe.json").exists()


def test_readme_examples_run(tmp_path, monkeypatch):
    """Every README python block that needs no downloaded checkpoint runs as printed."""
    runnable = [b for b in python_blocks(ROOT / "README.md") if "path/to/" not in b]
    assert len(runnable) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(runnable, "README.md")
    assert namespace["deepseek"].router.selection_bias is not None
