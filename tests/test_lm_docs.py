"""The python blocks of docs/training.md run, in order, in one namespace (tiny sizes)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"


def test_training_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert namespace["logits"].shape == (1, namespace["input_ids"].shape[1], 257)
    assert set(namespace["result"]["per_label"]) == {"de", "en"}
    assert (tmp_path / "runs" / "mine" / "metrics.jsonl").is_file()
    assert "Привет" in capsys.readouterr().out
