"""Whole-file writes that never leave half a file, and content hashes.

Every small file hubmerge writes beside a user's data (provenance, caches, cards, exports, refs) goes through
:func:`atomic_write`: the bytes land in a hidden temporary file in the same folder, which is renamed over the
target only when complete, so a reader (or a crash) sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from hubmerge.errors import OutputError
from hubmerge.io.sizes import format_size

HASH_BUFFER = 8 * 2**20


def sha256_file(path: str | Path, bufsize: int = HASH_BUFFER) -> str:
    """The sha256 of a file's content, read in large blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def output_error(path: Path, e: OSError, what: str = "output.path") -> OutputError:
    """One-line error for a failed write; a full disk says so and what to do."""
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free space or choose another {what} (nothing was kept)", path=path)
    return OutputError(f"{path}: cannot write ({e.strerror})", path=path)


def free_space(path: Path) -> tuple[Path, int]:
    """The nearest existing folder at or above ``path`` and the bytes free on its disk."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def check_free_space(folder: Path, needed: int, free: int, what: str = "output.path") -> None:
    """Refuse (:class:`OutputError`, exit 4) an output of ``needed`` bytes on a disk with ``free`` bytes free."""
    if needed > free:
        raise OutputError(
            f"{folder}: not enough free space: the output needs {format_size(needed)} ({needed} bytes), "
            f"{format_size(free)} ({free} bytes) free; free space or choose another {what} (nothing was read)",
            path=folder,
        )


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Raises :class:`~hubmerge.errors.OutputError` (nothing changed at ``path``) when the write fails.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise output_error(path, e, "folder") from e
    return path


def try_atomic_write(path: str | Path, data: bytes | str) -> bool:
    """:func:`atomic_write` for files that only save work next time (caches): a failure is not an error."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except (OSError, OutputError):
        return False
    return True
