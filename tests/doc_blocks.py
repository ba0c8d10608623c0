"""Run a markdown document's code blocks: the tests that keep docs/ and the README honest."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: Path) -> list[str]:
    """The ```python blocks of a markdown file, in order (a block indented inside a list item is
    dedented, as a reader would paste it)."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    return [textwrap.dedent(block) for block in blocks]


def run_blocks(blocks: list[str], label: str, namespace: dict | None = None) -> dict:
    """exec each block in order in one namespace (a new one if not given); a traceback names
    ``label[block i]``. Returns the namespace."""
    namespace = {} if namespace is None else namespace
    for i, block in enumerate(blocks):
        exec(compile(block, f"{label}[block {i}]", "exec"), namespace)
    return namespace
