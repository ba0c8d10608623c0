"""Corpora for language-model training: Debian polyglot text, user folders/JSONL/HF datasets,
the deterministic split, tokenizers and token arrays."""

from .corpus import TokenData, build_from_source, build_polyglot, load_tokens, split_documents
from .sources import DataError, Document, load_folder, load_hf, load_jsonl
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["build_polyglot", "build_from_source", "load_tokens", "TokenData", "split_documents", "DataError",
           "Document", "load_folder", "load_jsonl", "load_hf", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]
