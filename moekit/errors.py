"""Error types shared across moekit's folders, defined once at the bottom of the import order
(docs/architecture.md) so that every folder can raise and catch the same class.

``CheckpointError`` is every failure to read or write a checkpoint or model folder: moekit
training checkpoints (``ChecksumError``, ``DiskFullError``, raised by ``moekit.files``,
``moekit.train.checkpoint`` and ``moekit.parallel.dcp``) and Hugging Face / moekit model folders (``moekit.hf``: ``OutputFolderError``). The message names the
file, and the tensor where one is at fault. It is a ``ValueError``, so ``except ValueError`` keeps
catching it; the command line prints it as one line (``moekit.cli.known_errors``).

``ConfigError`` is every invalid configuration value (``moekit.config_base`` and the configs built
on it, and options checked elsewhere against a config); the message names the field and its value.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or model folder cannot be read or written; the message names the file (and tensor)."""


class ChecksumError(CheckpointError):
    """A tensor, file or the metadata of a checkpoint does not match its stored digest (it is corrupted)."""


class DiskFullError(CheckpointError):
    """A checkpoint could not be written for lack of space; nothing was left half-written."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and its value (and the file).

    ``config``, ``field`` and ``value`` name the config class, the field and its value where known
    (None otherwise), for programs that handle the error rather than print it."""

    def __init__(self, message: str, *, config: str | None = None, field: str | None = None,
                 value: object = None) -> None:
        super().__init__(message)
        self.config, self.field, self.value = config, field, value

    def within(self, where: str) -> ConfigError:
        """The same error with ``where`` (a file, or the parent's field) prefixed to the message."""
        return ConfigError(f"{where}: {self}", config=self.config, field=self.field, value=self.value)


__all__ = ["CheckpointError", "ChecksumError", "ConfigError", "DiskFullError"]
