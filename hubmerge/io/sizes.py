"""Byte sizes as people write them: ``5GB`` (decimal, as transformers' ``max_shard_size``) or ``4GiB``."""

from __future__ import annotations

import re

from hubmerge.errors import InvalidValueError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Parse ``5GB``/``500MB``/``2GiB``/``123`` into bytes; a malformed size is an :class:`InvalidValueError`."""
    if isinstance(value, bool):
        raise InvalidValueError("expected a size such as 5GB, 500MB or 2GiB")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidValueError("a size must be positive")
        return value
    match = _SIZE.match(str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise InvalidValueError(f"{value!r} is not a size: write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    number = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if number < 1:
        raise InvalidValueError("a size must be at least one byte")
    return int(number)


def format_size(n: float) -> str:
    """Human-readable decimal size, the unit the Hub and transformers show."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.2f} {unit}"
    return f"{n / 1000:.2f} TB"
