"""What identifies a model and a task in the results store: the content, not the name.

A model is the sha256 of its weight files' sha256s (:func:`model_key`), so one revision reached under two names
is one model and is scored once; a task is its name and the hash of its examples (:func:`task_key`), so edited
data is never mixed with old scores.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from hubmerge.errors import SourceError, StoreError
from hubmerge.io.checkpoint import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, local_weight_layout
from hubmerge.io.env import cache_dir
from hubmerge.io.files import sha256_file, try_atomic_write
from hubmerge.io.provenance import recorded_files

HEX64 = re.compile(r"[0-9a-f]{64}")


def model_key(weight_hashes: Iterable[str]) -> str:
    """A model's content key: sha256 over its weight files' sha256 digests (sorted, so file order is irrelevant)."""
    hashes = sorted(h.lower() for h in weight_hashes)
    if not hashes:
        raise StoreError("a model key needs the sha256 of at least one weight file")
    for h in hashes:
        if not HEX64.fullmatch(h):
            raise StoreError(f"{h!r} is not a sha256 hex digest; a model key is built from weight file sha256s")
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def task_key(name: str, data_hash: str) -> str:
    """A task's key: readable name plus 64 bits of its data hash (``arc_easy@3f1c...``)."""
    return f"{name}@{data_hash[:16]}"


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a model folder, found as :func:`hubmerge.io.checkpoint.weight_layout` finds them.

    A single file (e.g. a ``.gguf``) is its own weight file; a folder without safetensors or ``.bin`` weights
    falls back to its ``*.gguf`` files.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SourceError(f"{path}: no such model folder or weight file", path=path)
    layout = local_weight_layout(path)
    if layout.missing:
        raise SourceError(f"{path}: {layout.index_file} lists {layout.missing[0]}, which is missing", path=path)
    if layout.files:
        return [path / n for n in layout.files]
    gguf = sorted(path.glob("*.gguf"))
    if gguf:
        return gguf
    raise SourceError(
        f"{path}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX}, "
        f"{BIN_SINGLE}, *.gguf)",
        path=path,
    )


def _hash_cache_file() -> Path:
    return cache_dir() / "hashes.json"


def weight_hashes_of_folder(path: str | Path) -> list[str]:
    """The sha256 of each weight file of a local model, hashing only what is not already known.

    Known are: hashes recorded in the folder's ``hubmerge.json`` (a merge output), files in the Hugging Face
    cache (LFS blobs are named by their sha256, which ``hubmerge pull`` verified), and files hashed before
    with the same path, size and mtime (remembered in ``$HUBMERGE_CACHE/hashes.json``). Hashing a 3 GB
    checkpoint costs seconds, and evaluating ten revisions should not re-read 30 GB to learn their keys.
    """
    files = weight_files(path)
    recorded = recorded_files(path) if Path(path).is_dir() else {}
    cache_file = _hash_cache_file()
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    out = []
    for f in files:
        digest = recorded.get(f.name, "").lower()
        blob = f.resolve()
        if not HEX64.fullmatch(digest):
            digest = blob.name if HEX64.fullmatch(blob.name) else ""
        if not digest:
            st = blob.stat()
            key = f"{blob}:{st.st_size}:{st.st_mtime_ns}"
            digest = cache.get(key) or sha256_file(blob)
            changed |= cache.get(key) != digest
            cache[key] = digest
        out.append(digest)
    if changed:
        try_atomic_write(cache_file, json.dumps(cache))  # the cache only saves hashing next time
    return out
