"""Fault injection and request records for tests: in memory only, never persisted, never on by default."""

from __future__ import annotations

import threading
from typing import NamedTuple


class RequestRecord(NamedTuple):
    """One request as the server saw it, so tests can assert on traffic (cache hits, resumed ranges)."""

    method: str
    path: str  # raw, still percent-encoded, with the query string
    range: str | None


class Faults:
    """In-memory fault injection, keyed by ``(type, repo_id, path)``; never persisted, never on by default."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.drops: dict[tuple[str, str, str], list[int]] = {}
        self.corrupt: dict[tuple[str, str, str], int | None] = {}

    def add_drop(self, key: tuple[str, str, str], after_bytes: int, times: int) -> None:
        if after_bytes < 0 or times < 1:
            raise ValueError("after_bytes must be >= 0 and times >= 1")
        with self.lock:
            self.drops[key] = [after_bytes, times]

    def add_corrupt(self, key: tuple[str, str, str], offset: int | None) -> None:
        with self.lock:
            self.corrupt[key] = offset

    def clear(self) -> None:
        with self.lock:
            self.drops.clear()
            self.corrupt.clear()

    def take_drop(self, key: tuple[str, str, str]) -> int | None:
        with self.lock:
            if key not in self.drops:
                return None
            after, times = self.drops[key]
            if times <= 1:
                del self.drops[key]
            else:
                self.drops[key][1] -= 1
            return after

    def corrupt_offset(self, key: tuple[str, str, str], size: int) -> int | None:
        with self.lock:
            if key not in self.corrupt or size == 0:
                return None
            offset = self.corrupt[key]
            return min(size // 2 if offset is None else offset, size - 1)
