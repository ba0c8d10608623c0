"""From a corpus name to token arrays: build the corpus once (cached under ``data_dir``), then load
it tokenised. A name is "polyglot" (the demo corpus), a user source to build (a folder, a .jsonl
file or ``hf:<name>``), or a corpus already built under ``data_dir``."""

from __future__ import annotations

from pathlib import Path

from .corpus import TokenData, build_from_source, build_polyglot, load_tokens
from .tokenizer import load_tokenizer


def is_source(corpus: str) -> bool:
    """A user source to build (a folder, .jsonl file or hf:<name>) rather than a corpus name; a
    path with folders or a .jsonl suffix is one even when it does not exist from here."""
    return (corpus.startswith("hf:") or corpus.endswith(".jsonl") or Path(corpus).name != corpus
            or (corpus != "polyglot" and Path(corpus).exists()))


def corpus_folder(corpus: str, data_dir: str | Path) -> Path:
    """The folder under ``data_dir`` that holds (or will hold) the corpus ``corpus`` names."""
    if is_source(corpus):
        return Path(data_dir) / Path(corpus.removeprefix("hf:")).stem.replace("/", "_")
    return Path(data_dir) / corpus


def prepare_corpus(corpus: str, data_dir: str | Path, tokenizer: str, build: bool = True) -> TokenData:
    """Build (once, cached) and load ``corpus`` tokenised with ``tokenizer``.

    ``build=False`` only loads (a corpus not built is a DataError)."""
    folder = corpus_folder(corpus, data_dir)
    if build and corpus == "polyglot":
        build_polyglot(data_dir)
    elif build and is_source(corpus) and not (folder / "report.json").is_file():
        build_from_source(corpus, data_dir, name=folder.name)
    return load_tokens(folder, load_tokenizer(tokenizer))
