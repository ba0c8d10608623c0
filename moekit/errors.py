"""Error types shared across moekit's folders, defined once at the bottom of the import order
(docs/architecture.md) so that every folder can raise and catch the same class.

``CheckpointError`` is every failure to read or write a checkpoint or model folder: moekit
training checkpoints (``moekit.train.checkpoint``: ``ChecksumError``, ``DiskFullError``) and
Hugging Face / moekit model folders (``moekit.hf``: ``OutputFolderError``). The message names the
file, and the tensor where one is at fault. It is a ``ValueError``, so ``except ValueError`` keeps
catching it; the command line prints it as one line (``moekit.cli.known_errors``).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or model folder cannot be read or written; the message names the file (and tensor)."""


__all__ = ["CheckpointError"]
