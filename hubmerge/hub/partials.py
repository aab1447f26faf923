"""Resuming the partial downloads a killed pull leaves in the Hugging Face cache.

``huggingface_hub`` downloads each blob into ``blobs/<sha256>.<random>.incomplete`` and deletes it when the
download fails, but a process killed with ``kill -9`` (or by the OOM killer, or a lost machine) cannot: the file
stays, and the next ``hf_hub_download`` starts a new one from byte 0. For a real checkpoint that is gigabytes
fetched twice and left on disk. Before downloading an LFS file, :func:`resume_partial` finds such leftovers of
the same blob, takes the client's own lock for it (so a live download in another process is never touched),
hashes what the largest one holds, fetches only the rest by range requests, and moves the blob into place when
its sha256 is the Hub's; the client then finds the blob and only links it into the snapshot. The other leftovers
are removed. A leftover whose bytes do not hash to the Hub's sha256 is deleted and the file downloaded afresh.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hubmerge.hub.client import HubClient, RemoteFile
from hubmerge.hub.ranges import RangeClient, StreamFile
from hubmerge.io.writer import current_umask

CHUNK = 4 * 2**20


def blob_folder(repo: str) -> Path:
    """``<HF_HUB_CACHE>/models--ORG--NAME/blobs``, the cache layout ``huggingface_hub`` documents."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"


def leftovers(repo: str, sha256: str) -> list[Path]:
    """Partial downloads of one blob: the client's ``<sha>.<random>.incomplete`` and the older ``<sha>.incomplete``."""
    folder = blob_folder(repo)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{sha256}*.incomplete") if p.is_file())


def resume_partial(client: HubClient, repo: str, revision: str, commit: str, remote: RemoteFile) -> bool:
    """Complete a dead download's leftover of ``remote`` into the cache's blob; whether it did.

    Returns False when there was nothing to resume (no leftover, a live download holds the lock, or the leftover was
    corrupt and removed): the caller then downloads as usual.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import WeakFileLock

    if remote.sha256 is None or not leftovers(repo, remote.sha256):
        return False
    blob = blob_folder(repo) / remote.sha256
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / repo_folder_name(repo_id=repo, repo_type="model")
    lock.mkdir(parents=True, exist_ok=True)
    try:
        with WeakFileLock(lock / f"{remote.sha256}.lock", timeout=0.5):
            return _resume_locked(client, repo, revision, commit, remote, blob)
    except TimeoutError:  # the lock is held: another process is downloading this blob now
        return False


def _resume_locked(client: HubClient, repo: str, revision: str, commit: str, remote: RemoteFile, blob: Path) -> bool:
    parts = leftovers(repo, str(remote.sha256))
    parts.sort(key=lambda p: p.stat().st_size, reverse=True)
    best, rest = parts[0], parts[1:]
    for p in rest:
        p.unlink(missing_ok=True)
    if blob.exists():  # completed meanwhile: the leftover is only litter
        best.unlink(missing_ok=True)
        return False
    held = best.stat().st_size
    if held > remote.size:
        best.unlink(missing_ok=True)
        return False
    digest = hashlib.sha256()
    with best.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if held < remote.size:
        _fetch_rest(client, repo, revision, commit, remote, best, held, digest)
    if digest.hexdigest() != remote.sha256:
        best.unlink(missing_ok=True)  # the leftover held other bytes: download afresh
        return False
    os.chmod(best, 0o666 & ~current_umask())
    os.replace(best, blob)
    return True


def _fetch_rest(
    client: HubClient,
    repo: str,
    revision: str,
    commit: str,
    remote: RemoteFile,
    partial: Path,
    start: int,
    digest: hashlib._Hash,
) -> None:
    """Append bytes ``start..size`` to ``partial`` by range requests, hashing them as they are written."""
    ranges = RangeClient(client)
    f = StreamFile(repo, revision, commit, remote.path, remote.size, str(remote.sha256), b"")
    buffer = bytearray(CHUNK)
    with partial.open("r+b") as out:
        out.seek(start)
        pos = start
        while pos < remote.size:
            n = min(CHUNK, remote.size - pos)
            view = memoryview(buffer)[:n]
            ranges.read(f, pos, view)
            out.write(view)
            digest.update(view)
            pos += n
        out.flush()
        os.fsync(out.fileno())
