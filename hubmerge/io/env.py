"""The process around hubmerge: environment variables it reads, and process-wide settings it changes.

One place for both, as ``huggingface_hub.constants`` is for the client. Every setting changed here is changed by
a context manager that gives the previous value back on exit, error or not: a library call (or a test) never
leaves torch's thread count, an environment variable or a client constant different from what it found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
DEFAULT_RESULTS_DIR = "hubmerge-results"


def hf_endpoint(explicit: str | None = None) -> str | None:
    """``--endpoint`` when given, else ``HF_ENDPOINT``, else None (the client's default, huggingface.co).

    Read at call time: the client reads ``HF_ENDPOINT`` once, when it is imported, which a notebook outlives.
    """
    return explicit or os.environ.get("HF_ENDPOINT") or None


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the client caches it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in TRUE_VALUES


def results_dir() -> Path:
    """``$HUBMERGE_RESULTS`` or ``./hubmerge-results``: where the results store lives by default."""
    return Path(os.environ.get("HUBMERGE_RESULTS") or DEFAULT_RESULTS_DIR)


def cache_dir() -> Path:
    """``$HUBMERGE_CACHE`` or ``~/.cache/hubmerge``: hashes already computed, blobs already verified."""
    return Path(os.environ.get("HUBMERGE_CACHE") or Path.home() / ".cache" / "hubmerge")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block on ``n`` torch threads (``None``: leave torch's setting) and restore the caller's count."""
    if n is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def isolated_hf_cache(cache: str | Path) -> Iterator[Path]:
    """Point the Hugging Face cache at ``cache`` and go online for a block, then restore everything.

    Sets ``HF_HUB_CACHE`` (and the client's already-imported ``constants.HF_HUB_CACHE``) and unsets
    ``HF_HUB_OFFLINE``; on exit both variables and the constant are as they were.
    """
    folder = Path(cache).resolve()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE")}
    from huggingface_hub import constants

    saved_constant = constants.HF_HUB_CACHE
    os.environ["HF_HUB_CACHE"] = str(folder)
    os.environ.pop("HF_HUB_OFFLINE", None)
    constants.HF_HUB_CACHE = str(folder)
    try:
        yield folder
    finally:
        constants.HF_HUB_CACHE = saved_constant
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
