"""The python blocks of docs/recipes.md run, in order, in one namespace."""

from __future__ import annotations

import pytest
from doc_blocks import ROOT, python_blocks, run_blocks

DOC = ROOT / "docs" / "recipes.md"


@pytest.mark.usefixtures("one_thread")
def test_recipes_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC)
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    run_blocks(blocks, DOC.name)
    out = capsys.readouterr().out
    assert "'purity': 0.85" in out and "corrupt_weights" in out
