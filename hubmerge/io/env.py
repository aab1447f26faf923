"""The process around hubmerge: environment variables it reads, and process-wide settings it changes.

One place for both, as ``huggingface_hub.constants`` is for the client. Every setting changed here is changed by
a context manager that gives the previous value back on exit, error or not: a library call (or a test) never
leaves torch's thread count, an environment variable or a client constant different from what it found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


# Every cache a run of hubmerge (and the libraries it drives) may write, as a variable and its folder under a root.
CACHE_VARIABLES = {
    "HF_HOME": "caches/hf-home",  # transformers' caches too (its own TRANSFORMERS_CACHE is deprecated)
    "HF_XET_CACHE": "caches/hf-home/xet",
    "HF_ASSETS_CACHE": "caches/hf-home/assets",
    "HF_DATASETS_CACHE": "caches/hf-home/datasets",
    "HUBMERGE_CACHE": "caches/hubmerge",
    "TORCH_HOME": "caches/torch",
    "TORCHINDUCTOR_CACHE_DIR": "caches/torch/inductor",
    "TRITON_CACHE_DIR": "caches/triton",
    "MPLCONFIGDIR": "caches/matplotlib",
    "XDG_CACHE_HOME": "caches/xdg",
}
# The same folders as huggingface_hub's constants, which it reads from the environment once, at import.
CACHE_CONSTANTS = {"HF_HOME": "HF_HOME", "HF_XET_CACHE": "HF_XET_CACHE", "HF_ASSETS_CACHE": "HF_ASSETS_CACHE"}


@contextmanager
def isolated_caches(root: str | Path) -> Iterator[Path]:
    """Point every cache in :data:`CACHE_VARIABLES` (and the Hub cache, :func:`isolated_hf_cache`) under ``root``
    for a block, then give back every variable and client constant as it was."""
    folder = Path(root).resolve()
    saved = {k: os.environ.get(k) for k in CACHE_VARIABLES}
    from huggingface_hub import constants

    saved_constants = {c: getattr(constants, c) for c in CACHE_CONSTANTS.values() if hasattr(constants, c)}
    for key, sub in CACHE_VARIABLES.items():
        os.environ[key] = str(folder / sub)
    for var, const in CACHE_CONSTANTS.items():
        if const in saved_constants:
            setattr(constants, const, os.environ[var])
    try:
        with isolated_hf_cache(folder / "hf-cache") as hub_cache:
            yield hub_cache
    finally:
        for const, value in saved_constants.items():
            setattr(constants, const, value)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def quiet_client_warnings() -> Iterator[None]:
    """Keep ``huggingface_hub``'s retry warnings ("Trying to resume download...", "Retrying in 1s") off the
    console for a block: hubmerge retries and reports the outcome in one line itself. Errors still show; the
    logger's level is put back on exit."""
    import logging

    import huggingface_hub.utils.logging  # noqa: F401 - it sets the level on import: set ours after

    logger = logging.getLogger("huggingface_hub")
    previous = logger.level
    logger.setLevel(max(logging.ERROR, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Put SIGTERM's and SIGINT's handlers back after a block: ``ray.init`` installs its own (``sys.exit`` on
    SIGTERM) and ``ray.shutdown`` leaves them, so a later fork or Ctrl-C in the same process met Ray's."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with suppress(ValueError, TypeError):  # not the main thread, or a handler set from C: leave it
                signal.signal(sig, handler)
