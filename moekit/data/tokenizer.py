"""Tokenizers: byte-level by default (every script, nothing to download), or a Hugging Face
``tokenizers``/transformers tokenizer loaded from a local path.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_id``
and ``name`` (a string that identifies the tokenizer in caches and checkpoints). The byte tokenizer
also has what serving needs (``moekit.serve.text``): ``eos_ids``, ``render_chat`` and
``stream_decoder``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus an end-of-document id 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    chat_template = None  # render_chat raises; HF tokenizers hold their template here

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Drops the end-of-document id; a byte sequence cut inside a character decodes to U+FFFD."""
        bad = [i for i in ids if not 0 <= int(i) <= 256]
        if bad:
            raise ValueError(f"byte tokenizer ids must be in [0, 256], got {bad[:5]}")
        return bytes(int(i) for i in ids if int(i) != self.eos_id).decode("utf-8", errors="replace")

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset([self.eos_id])

    def render_chat(self, messages: list[dict]) -> str:
        """The byte tokenizer carries no chat template."""
        raise ValueError("model has no chat template")

    def stream_decoder(self, context: Sequence[int] = ()) -> Utf8StreamDecoder:
        """Incremental decoding of one sequence's ids (bytes decode alike in any context)."""
        return Utf8StreamDecoder(self.eos_id)


class Utf8StreamDecoder:
    """Byte ids to text one id at a time: an incomplete UTF-8 sequence is held back until its last
    byte arrives (or ``flush`` ends the text, giving U+FFFD), so the pieces join to ``decode(ids)``."""

    def __init__(self, eos_id: int = 256) -> None:
        self.eos_id = eos_id
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id == self.eos_id:
            return ""
        if not 0 <= token_id <= 255:
            raise ValueError(f"byte tokenizer ids must be in [0, 256], got {token_id}")
        return self._utf8.decode(bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokenizer:
    """A tokenizer.json (``tokenizers``) or a transformers tokenizer folder, from a local path."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist (expected tokenizer.json or a folder)")
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file():
            from tokenizers import Tokenizer as RustTokenizer

            self._tok = RustTokenizer.from_file(str(file))
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: self._tok.decode(ids, skip_special_tokens=True)
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]") if self._tok.token_to_id(t) is not None),
                       None)
            self.eos_id = self._tok.token_to_id(eos) if eos is not None else self.vocab_size - 1
        else:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._encode = lambda text: self._tok.encode(text, add_special_tokens=False)
            self._decode = lambda ids: self._tok.decode(ids, skip_special_tokens=True)
            self.vocab_size = len(self._tok)
            self.eos_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self.vocab_size - 1
        self.name = "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(path.resolve()))[-80:]

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._decode([int(i) for i in ids])


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None``/"byte" -> ByteTokenizer; anything else is a local path for HFTokenizer."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec)
