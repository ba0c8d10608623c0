"""Crash-safe file writes shared by the checkpoint writers (``train.checkpoint``, ``parallel.dcp``).

``atomic_write_bytes`` writes a temporary file ``.<name>.<pid>.tmp`` in the same folder, fsyncs it
and renames it into place, so a kill at any moment leaves the old file or the new one; a full
disk raises ``DiskFullError`` (the temporary file removed). ``fsync_dir`` makes a rename in a
folder durable. A temporary *folder* (a sharded checkpoint being written) records its writer's
process id (``mark_writer``), so a cleaner removes it only once that writer is gone
(``writer_gone``).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .errors import DiskFullError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
WRITER_FILE = ".writer.pid"


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries: renames and new files); a no-op where the file system cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"12 bytes"``, ``"1.5 KiB"``, ... ``"3.0 GiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def free_bytes(folder: Path) -> int | None:
    """Free space in ``folder``'s file system, or None if it cannot be read."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write_bytes(path: Path, data: bytes, on_full: str = "") -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename.

    A failure removes the temporary file; no space (ENOSPC/EDQUOT) raises DiskFullError naming the
    size needed, the space free and ``on_full`` (what the caller keeps)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in NO_SPACE:
            free = free_bytes(path.parent)
            raise DiskFullError(f"no space left to write {path}: it needs {human_bytes(len(data))}"
                                f"{'' if free is None else f', {human_bytes(free)} free'} in {path.parent}; "
                                f"the partial file was removed{on_full}") from None
        raise
    fsync_dir(path.parent)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_writer(folder: Path) -> None:
    """Record this process as the writer of the temporary folder ``folder``."""
    (Path(folder) / WRITER_FILE).write_text(str(os.getpid()))


def writer_gone(folder: Path) -> bool:
    """Whether the temporary folder ``folder`` may be removed: its writer (``mark_writer``) is dead or
    is this process (which has no write in progress when it cleans), or it names none."""
    try:
        pid = int((Path(folder) / WRITER_FILE).read_text())
    except (OSError, ValueError):
        return True
    return pid == os.getpid() or not process_alive(pid)


__all__ = ["NO_SPACE", "WRITER_FILE", "atomic_write_bytes", "free_bytes", "fsync_dir", "human_bytes", "mark_writer",
           "process_alive", "writer_gone"]
