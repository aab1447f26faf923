"""Fault injection and request records for tests: in memory only, never persisted, never on by default."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple


class RequestRecord(NamedTuple):
    """One request as the server saw it, so tests can assert on traffic (cache hits, resumed ranges)."""

    method: str
    path: str  # raw, still percent-encoded, with the query string
    range: str | None
    authorized: bool = False  # whether it carried an Authorization header
    port: int = 0  # the port it came in on: the Hub's or its storage host's


# How a storage server can get Range wrong: answer 200 with the whole file, or 206 for another range.
RANGE_FAULTS = ("ignore", "shifted")


class Throttle:
    """Paces every response body of a server to ``rate`` bytes per second in total, over all its connections.

    A virtual clock: each write reserves ``n / rate`` seconds after the previous reservation (never earlier than
    ``burst`` seconds ago) and sleeps until its slot, so parallel connections share the bandwidth.
    """

    def __init__(self, rate: float, burst: float = 0.05) -> None:
        if rate <= 0:
            raise ValueError("the bandwidth limit must be positive")
        self.rate, self.burst = float(rate), burst
        self.lock = threading.Lock()
        self._clock = 0.0

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self._clock = max(self._clock, now - self.burst) + n / self.rate
            wait = self._clock - now
        if wait > 0:
            time.sleep(wait)


class Faults:
    """In-memory fault injection, keyed by ``(type, repo_id, path)``; never persisted, never on by default."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.drops: dict[tuple[str, str, str], list[int]] = {}
        self.corrupt: dict[tuple[str, str, str], int | None] = {}
        self.range_faults: dict[tuple[str, str, str], str] = {}

    def add_drop(self, key: tuple[str, str, str], after_bytes: int, times: int) -> None:
        if after_bytes < 0 or times < 1:
            raise ValueError("after_bytes must be >= 0 and times >= 1")
        with self.lock:
            self.drops[key] = [after_bytes, times]

    def add_corrupt(self, key: tuple[str, str, str], offset: int | None) -> None:
        with self.lock:
            self.corrupt[key] = offset

    def add_range_fault(self, key: tuple[str, str, str], kind: str) -> None:
        if kind not in RANGE_FAULTS:
            raise ValueError(f"kind must be one of {', '.join(RANGE_FAULTS)}")
        with self.lock:
            self.range_faults[key] = kind

    def range_fault(self, key: tuple[str, str, str]) -> str | None:
        with self.lock:
            return self.range_faults.get(key)

    def clear(self) -> None:
        with self.lock:
            self.drops.clear()
            self.corrupt.clear()
            self.range_faults.clear()

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
