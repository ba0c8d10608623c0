"""The python blocks of docs/training.md run, in order, in one namespace (tiny sizes)."""

from __future__ import annotations

import shutil

import pytest
from doc_blocks import ROOT, python_blocks, run_blocks

DOC = ROOT / "docs" / "training.md"


@pytest.mark.usefixtures("one_thread")
def test_training_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(DOC)
    assert len(blocks) >= 2
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(blocks, DOC.name)
    assert namespace["logits"].shape == (1, namespace["input_ids"].shape[1], 257)
    assert set(namespace["result"]["per_label"]) == {"de", "en"}
    assert (tmp_path / "runs" / "mine" / "metrics.jsonl").is_file()
    assert "Привет" in capsys.readouterr().out
