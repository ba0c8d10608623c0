"""Documents from a user's own data: a folder with one sub-folder per label, a JSONL file, or a
Hugging Face ``datasets`` name. Each document carries one label (its language or domain).

Files are decoded as UTF-8 (a leading BOM, or a UTF-16 BOM, is honoured); bytes that are not
valid UTF-8 are replaced with U+FFFD and the file is listed in the load report, so a folder of
mixed encodings loads and says which files were damaged. Files containing NUL bytes are treated
as binary and skipped (also reported).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Input data cannot be used; the message names the file, folder or key."""


@dataclass
class Document:
    text: str
    label: str
    source: str


@dataclass
class LoadReport:
    """What a loader read and what it had to repair or skip."""

    files: int = 0
    replaced_bytes_files: list[str] = field(default_factory=list)
    skipped_binary: list[str] = field(default_factory=list)
    skipped_empty: int = 0
    notes: list[str] = field(default_factory=list)

    def merge(self, other: LoadReport) -> None:
        self.files += other.files
        self.replaced_bytes_files += other.replaced_bytes_files
        self.skipped_binary += other.skipped_binary
        self.skipped_empty += other.skipped_empty
        self.notes += other.notes


def decode_bytes(raw: bytes) -> tuple[str, bool]:
    """(text, had_invalid_bytes). UTF-8 with replacement; UTF-16 when it starts with its BOM."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16"), False
        except UnicodeDecodeError:
            return raw.decode("utf-16", errors="replace"), True
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def read_text_file(path: Path, report: LoadReport) -> str | None:
    """Decoded text, or None for a binary file (recorded in ``report``)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    report.files += 1
    if b"\x00" in raw and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        report.skipped_binary.append(str(path))
        return None
    text, damaged = decode_bytes(raw)
    if damaged:
        report.replaced_bytes_files.append(str(path))
    return text


def load_folder(root: str | Path) -> tuple[list[Document], LoadReport]:
    """``root/<label>/**/<file>``: every regular file under a label's sub-folder is one document."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected one sub-folder per label)")
    try:
        label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError:
        raise DataError(f"data folder {root} is not readable (permission denied)") from None
    if not label_dirs:
        raise DataError(f"data folder {root} has no sub-folders; expected one sub-folder per label "
                        f"(e.g. {root}/english/*.txt, {root}/python/*.py)")
    docs: list[Document] = []
    report = LoadReport()
    for label_dir in label_dirs:
        try:
            files = sorted(p for p in label_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        except PermissionError:
            raise DataError(f"label folder {label_dir} is not readable (permission denied)") from None
        for path in files:
            text = read_text_file(path, report)
            if text is None:
                continue
            if not text.strip():
                report.skipped_empty += 1
                continue
            docs.append(Document(text, label_dir.name, str(path)))
    if not docs:
        raise DataError(f"data folder {root} has no non-empty text files under its label sub-folders "
                        f"{[d.name for d in label_dirs]}")
    return docs, report


def load_jsonl(path: str | Path, text_field: str = "text", label_field: str = "label",
               default_label: str = "default") -> tuple[list[Document], LoadReport]:
    """One JSON object per line with ``text_field`` and an optional ``label_field``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"JSONL file {path} does not exist")
    report = LoadReport()
    text = read_text_file(path, report)
    if text is None:
        raise DataError(f"{path} looks binary (contains NUL bytes), not JSONL")
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(f"{path}:{lineno}: no {text_field!r} field in the object")
        if not isinstance(row[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(row[text_field]).__name__}, not a string")
        if not row[text_field].strip():
            report.skipped_empty += 1
            continue
        docs.append(Document(row[text_field], str(row.get(label_field, default_label)), f"{path}:{lineno}"))
    if not docs:
        raise DataError(f"JSONL file {path} has no non-empty documents")
    return docs, report


def load_hf(name: str, split: str = "train", text_field: str = "text", label_field: str | None = "label",
            max_docs: int | None = None, **load_kwargs: Any) -> tuple[list[Document], LoadReport]:
    """Documents from ``datasets.load_dataset(name, split=split, **load_kwargs)``.

    ``name`` is a hub name (needs network) or a builder such as "json" with ``data_files=``
    (works offline). Integer class labels are mapped to their names when the feature has them.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("loading a Hugging Face dataset needs the 'datasets' package: "
                        "pip install 'moekit[data]'") from None
    try:
        ds = datasets.load_dataset(name, split=split, **load_kwargs)
    except (OSError, ValueError) as err:  # ConnectionError offline, DatasetNotFoundError, a bad split
        raise DataError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    names = None
    if label_field and label_field in ds.column_names:
        feature = ds.features[label_field]
        names = getattr(feature, "names", None)
    docs, report = [], LoadReport()
    for i, row in enumerate(ds):
        if max_docs is not None and i >= max_docs:
            break
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            report.skipped_empty += 1
            continue
        label = row.get(label_field, "default") if label_field else "default"
        if names is not None and isinstance(label, int):
            label = names[label]
        docs.append(Document(text, str(label), f"{name}[{split}][{i}]"))
    report.files = 1
    if not docs:
        raise DataError(f"dataset {name!r} split {split!r} has no non-empty {text_field!r} texts")
    return docs, report
