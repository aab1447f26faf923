"""Streaming safetensors writer and all-or-nothing output folders.

A shard's header is known before any tensor is computed (names, dtypes and shapes come from the
source headers), so it is written first and tensor bytes are appended as they are produced: no shard
is ever held in memory. Outputs are built in a hidden temporary folder beside the target and renamed
into place at the end, so an interrupted or failed merge never leaves a folder that looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import OutputError

TEMP_SUFFIX = ".hubmerge-partial"


def safetensors_header(entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Serialise a safetensors header for ``(name, dtype, shape, nbytes)`` entries laid out in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Appends tensor bytes to a safetensors file whose header is already written, hashing as it goes."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]):
        self.path = path
        header = safetensors_header(entries, metadata)
        self.expected = len(header) + sum(e[3] for e in entries)
        self._sha = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.written = 0
        self.write(header)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        try:
            self._file.write(view)
        except OSError as e:
            raise _output_error(self.path, e) from e
        self._sha.update(view)
        self.written += len(view)

    def close(self) -> str:
        """Flush and close; return the file's sha256. Refuses a shard whose size is not what the header says."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise _output_error(self.path, e) from e
        finally:
            self._file.close()
        if self.written != self.expected:
            raise OutputError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}; output discarded")
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._file.close()


def _output_error(path: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: disk full; free space or choose another output.path (nothing was kept)")
    return OutputError(f"{path}: cannot write ({e.strerror})")


def sha256_file(path: Path, bufsize: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class OutputDir:
    """A hidden temporary folder beside ``target`` that becomes ``target`` only on :meth:`commit`.

    Used as a context manager: leaving the block without committing (an exception, Ctrl-C) removes the
    temporary folder. A process killed outright leaves only a hidden ``.NAME.*.hubmerge-partial``
    folder, never ``target``; :func:`stale_partials` finds such leftovers.
    """

    def __init__(self, target: Path, force: bool = False) -> None:
        self.target = target
        self.force = force
        self.path: Path | None = None

    def __enter__(self) -> Path:
        if self.target.exists() and not self.force:
            raise OutputError(f"{self.target} already exists; pass --force to replace it")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=TEMP_SUFFIX, dir=self.target.parent)
            )
        except OSError as e:
            raise _output_error(self.target.parent, e) from e
        return self.path

    def commit(self) -> None:
        assert self.path is not None
        old = None
        if self.target.exists():
            if not self.force:
                raise OutputError(f"{self.target} appeared while merging; pass --force to replace it")
            old = self.target.with_name(f".{self.target.name}.replaced{TEMP_SUFFIX}")
            if old.exists():
                shutil.rmtree(old)
            self.target.rename(old)
        os.replace(self.path, self.target)
        self.path = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def stale_partials(parent: Path) -> list[Path]:
    """Temporary folders left by merges that were killed (not merely interrupted) in ``parent``."""
    return sorted(p for p in parent.glob(f".*{TEMP_SUFFIX}") if p.is_dir())
