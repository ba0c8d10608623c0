"""Corpus building, the deterministic train/validation split, and token arrays for training.

``build_polyglot`` assembles the demo corpus from text no one here wrote: Debian fortune files in
seven languages and translated man pages (French, Japanese), plus the Python standard library's
source as code. Without apt (or without network) it falls back to what every Python install has:
standard-library code and the bundled pydoc topic texts (English), and says so in the report.

Each document gets one label; documents are assigned to validation by a hash of their text, so
the split does not depend on order or on which other documents exist. Per-label bytes are capped
(documents drawn in a hash order, not file order) to bound the corpus deterministically.

On disk (``<data_dir>/<name>/``): ``documents.jsonl`` (text, label, split), ``report.json``, and
per tokenizer ``tokens-<tokenizer>/{train,val}.{tokens,labels}.npy``: documents joined with the
end-of-document id, and the label id of every token.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .debian import fetch_debs, package_documents, unpack_deb
from .sources import DataError, Document, LoadReport, load_folder, load_hf, load_jsonl, read_text_file
from .tokenizer import Tokenizer

# Debian package -> label. Fortunes in seven languages, man pages for two more; fortunes-it
# installs next to the English files, so labels come from the package, not the path.
POLYGLOT_PACKAGES: dict[str, str] = {
    "fortunes": "en", "fortunes-min": "en", "fortunes-de": "de", "fortunes-es": "es", "fortunes-it": "it",
    "fortunes-pl": "pl", "fortunes-ru": "ru", "fortunes-zh": "zh", "manpages-fr": "fr", "manpages-ja": "ja",
}
CORPUS_VERSION = 3


def doc_hash(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha1((salt + text).encode("utf-8", "surrogatepass")).digest()[:8], "little")


def split_documents(docs: list[Document], val_fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Deterministic split by a hash of each document's text (identical texts share a side)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in (0, 1)")
    cut = int(val_fraction * 2**64)
    train, val = [], []
    for d in docs:
        (val if doc_hash(d.text, f"split{seed}") < cut else train).append(d)
    return train, val


def chunk_documents(docs: list[Document], max_chars: int = 3000) -> list[Document]:
    """Split long documents at line ends into pieces of at most about ``max_chars`` characters,
    so a few long files (man pages, modules) do not make a label's validation split one document."""
    out = []
    for d in docs:
        if len(d.text) <= max_chars:
            out.append(d)
            continue
        piece: list[str] = []
        size = 0
        n = 0
        for para in d.text.split("\n"):
            if piece and size + len(para) > max_chars:
                out.append(Document("\n".join(piece), d.label, f"{d.source}#chunk{n}"))
                piece, size, n = [], 0, n + 1
            piece.append(para)
            size += len(para) + 1
        if piece and "".join(piece).strip():
            out.append(Document("\n".join(piece), d.label, f"{d.source}#chunk{n}"))
    return out


def cap_per_label(docs: list[Document], max_bytes: int | None, seed: int = 0) -> list[Document]:
    """At most ``max_bytes`` UTF-8 bytes per label, documents taken in a seeded hash order."""
    if max_bytes is None:
        return docs
    order = sorted(docs, key=lambda d: (d.label, doc_hash(d.text + d.source, f"cap{seed}")))
    kept, used = [], Counter()
    for d in order:
        n = len(d.text.encode("utf-8", "surrogatepass"))
        if used[d.label] + n <= max_bytes or used[d.label] == 0:
            kept.append(d)
            used[d.label] += n
    return kept


def stdlib_documents(max_bytes: int | None, report: LoadReport) -> list[Document]:
    """The Python standard library's .py files, label "python" (test suites excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
                   and "idlelib" not in p.parts)
    docs = []
    for p in files:
        text = read_text_file(p, report)
        if text and text.strip():
            docs.append(Document(text, "python", str(p)))
    return cap_per_label(chunk_documents(docs), max_bytes)


def pydoc_documents(report: LoadReport) -> list[Document]:
    """English prose bundled with every Python: the pydoc help topics, one document per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        report.notes.append("pydoc_data.topics is missing; no English fallback text")
        return []
    return [Document(text, "en", f"pydoc_data.topics[{key}]") for key, text in sorted(topics.items()) if text.strip()]


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def save_corpus(out: Path, docs: list[Document], val_fraction: float, seed: int, report: LoadReport,
                info: dict[str, Any]) -> dict[str, Any]:
    """Split, write documents.jsonl and report.json (written last: its presence marks a complete build)."""
    train, val = split_documents(docs, val_fraction, seed)
    if not train or not val:
        raise DataError(f"corpus of {len(docs)} documents gives an empty {'train' if not train else 'validation'} "
                        f"split with val_fraction={val_fraction}; add documents or change the fraction")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"text": d.text, "label": d.label, "split": s, "source": d.source}
            for s, part in (("train", train), ("val", val)) for d in part]
    _write_jsonl_atomic(out / "documents.jsonl", rows)
    per_label: dict[str, dict[str, int]] = {}
    for s, part in (("train", train), ("val", val)):
        for d in part:
            entry = per_label.setdefault(d.label, {"train_docs": 0, "val_docs": 0, "train_bytes": 0, "val_bytes": 0})
            entry[f"{s}_docs"] += 1
            entry[f"{s}_bytes"] += len(d.text.encode("utf-8", "surrogatepass"))
    summary = {
        **info, "version": CORPUS_VERSION, "val_fraction": val_fraction, "seed": seed,
        "documents": {"train": len(train), "val": len(val)},
        "bytes": {"train": sum(v["train_bytes"] for v in per_label.values()),
                  "val": sum(v["val_bytes"] for v in per_label.values())},
        "labels": sorted(per_label), "per_label": dict(sorted(per_label.items())),
        "files_read": report.files, "files_with_replaced_bytes": report.replaced_bytes_files[:50],
        "num_files_with_replaced_bytes": len(report.replaced_bytes_files),
        "skipped_binary_files": report.skipped_binary[:50], "skipped_empty": report.skipped_empty,
        "notes": report.notes,
    }
    _write_json_atomic(out / "report.json", summary)
    return summary


def build_polyglot(data_dir: str | Path, max_bytes_per_label: int = 400_000, val_fraction: float = 0.05,
                   seed: int = 0, use_apt: bool = True, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) ``<data_dir>/polyglot``; returns its report."""
    data_dir = Path(data_dir)
    out = data_dir / "polyglot"
    settings = {"source": "polyglot", "max_bytes_per_label": max_bytes_per_label, "use_apt": use_apt}
    if not force and (out / "report.json").is_file():
        old = json.loads((out / "report.json").read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in settings.items()) and old.get("val_fraction") == val_fraction \
                and old.get("seed") == seed and old.get("version") == CORPUS_VERSION:
            return {**old, "cached": True}
    report = LoadReport()
    docs: list[Document] = []
    fallback = True
    if use_apt:
        fetched = fetch_debs(sorted(POLYGLOT_PACKAGES), data_dir / "debs")
        report.notes += fetched.notes
        for pkg, reason in sorted(fetched.missing.items()):
            report.notes.append(f"package {pkg} unavailable: {reason}")
        for pkg, deb in sorted(fetched.debs.items()):
            root = unpack_deb(deb, data_dir / "unpacked" / pkg)
            docs += package_documents(root, POLYGLOT_PACKAGES[pkg], report)
        fallback = len({d.label for d in docs}) < 3
    if fallback:
        report.notes.append("FALLBACK: Debian fortunes/manpages could not be had (or use_apt=False); the corpus "
                            "is Python standard-library code and its bundled pydoc text only (English)")
        docs = pydoc_documents(report)
    docs = cap_per_label(chunk_documents(docs), max_bytes_per_label, seed)
    docs += stdlib_documents(max_bytes_per_label, report)
    info = {**settings, "fallback": fallback, "python": sys.version.split()[0],
            "packages": {p: POLYGLOT_PACKAGES[p] for p in sorted(POLYGLOT_PACKAGES)}}
    return save_corpus(out, docs, val_fraction, seed, report, info)


def build_from_source(source: str, data_dir: str | Path, name: str | None = None, val_fraction: float = 0.05,
                      seed: int = 0, max_bytes_per_label: int | None = None, text_field: str = "text",
                      label_field: str = "label", hf_split: str = "train") -> dict[str, Any]:
    """Corpus from a folder (one sub-folder per label), a .jsonl file, or ``hf:<dataset name>``."""
    if source.startswith("hf:"):
        docs, report = load_hf(source[3:], split=hf_split, text_field=text_field, label_field=label_field)
    elif Path(source).is_dir():
        docs, report = load_folder(source)
    elif source.endswith(".jsonl") or Path(source).is_file():
        docs, report = load_jsonl(source, text_field, label_field)
    else:
        raise DataError(f"data source {source!r} is not a folder, a .jsonl file or hf:<name>")
    name = name or Path(source.removeprefix("hf:")).stem.replace("/", "_") or "custom"
    docs = cap_per_label(chunk_documents(docs), max_bytes_per_label, seed)
    info = {"source": source, "max_bytes_per_label": max_bytes_per_label}
    return save_corpus(Path(data_dir) / name, docs, val_fraction, seed, report, info)


# ---------------------------------------------------------------------- token arrays
@dataclass
class TokenSplit:
    """One split as flat arrays: tokens (N,) and the label id of each token (N,)."""

    tokens: np.ndarray
    labels: np.ndarray


@dataclass
class TokenData:
    train: TokenSplit
    val: TokenSplit
    label_names: list[str]
    tokenizer_name: str
    corpus_dir: Path


def load_tokens(corpus_dir: str | Path, tokenizer: Tokenizer) -> TokenData:
    """Token arrays of a built corpus for ``tokenizer`` (tokenised once, then cached beside it)."""
    corpus_dir = Path(corpus_dir)
    report_path, docs_path = corpus_dir / "report.json", corpus_dir / "documents.jsonl"
    if not report_path.is_file() or not docs_path.is_file():
        raise DataError(f"{corpus_dir} is not a built corpus (no report.json/documents.jsonl); "
                        f"run `moekit data build` first")
    labels = json.loads(report_path.read_text(encoding="utf-8"))["labels"]
    cache = corpus_dir / f"tokens-{tokenizer.name}"
    done = cache / "done.json"
    if not done.is_file():
        label_id = {name: i for i, name in enumerate(labels)}
        parts: dict[str, tuple[list[int], list[int]]] = {"train": ([], []), "val": ([], [])}
        with open(docs_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{docs_path}:{lineno}: invalid JSON; rebuild the corpus") from None
                ids = tokenizer.encode(row["text"]) + [tokenizer.eos_id]
                toks, labs = parts[row["split"]]
                toks += ids
                labs += [label_id[row["label"]]] * len(ids)
        cache.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.int32
        for split, (toks, labs) in parts.items():
            for kind, arr in (("tokens", np.asarray(toks, dtype=dtype)), ("labels", np.asarray(labs, dtype=np.int16))):
                tmp = cache / f"{split}.{kind}.tmp.npy"
                np.save(tmp, arr)
                os.replace(tmp, cache / f"{split}.{kind}.npy")
        _write_json_atomic(done, {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size})
    splits = {s: TokenSplit(np.load(cache / f"{s}.tokens.npy"), np.load(cache / f"{s}.labels.npy"))
              for s in ("train", "val")}
    return TokenData(splits["train"], splits["val"], labels, tokenizer.name, corpus_dir)
