"""Thin, typed access to a Hub (huggingface.co, a mirror, or ``hubmerge hub serve``).

Everything goes through the real ``huggingface_hub`` client. The endpoint is read from ``--endpoint``
or ``HF_ENDPOINT`` at call time (the client itself reads ``HF_ENDPOINT`` only when it is imported),
and tokens come from the client's usual sources (``HF_TOKEN``, ``hf auth login``); hubmerge never
prints or stores them. Client exceptions become :class:`~hubmerge.errors.HubError` with a message
that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, SIDECAR_FILES
from .errors import HubError, RevisionError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def endpoint_from_env(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the client caches it at import, which tests and notebooks outlive)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def api(endpoint: str | None = None, token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint_from_env(endpoint), token=token, library_name="hubmerge")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def hub_errors(repo: str, revision: str | None = None, action: str = "read") -> Iterator[None]:
    """Turn the client's exceptions into one-line HubErrors naming the repo, revision and remedy."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        HTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo}@{revision}" if revision else repo
    try:
        yield
    except GatedRepoError as e:
        raise HubError(f"{repo} is gated: accept its conditions on its Hub page, then {LOGIN_HINT}") from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"repo {repo!r} was not found, or it is private and this request was not authorised: check the name; "
            f"for a private repo {LOGIN_HINT}"
        ) from e
    except RevisionNotFoundError as e:
        raise RevisionError(f"revision {revision!r} not found in {repo}; `hubmerge revisions {repo}` lists them") from e
    except EntryNotFoundError as e:
        raise HubError(f"{at}: file not found ({_first_line(e)})") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise HubError(
            f"{at}: not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network); "
            "pull it once online first"
        ) from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubError(f"not authorised to {action} {at} (HTTP {status}): {LOGIN_HINT}") from e
        raise HubError(f"could not {action} {at}: {_first_line(e)}") from e
    except HFValidationError as e:
        raise HubError(f"{repo!r} is not a valid repo id ('owner/name'): {_first_line(e)}") from e
    except (HTTPError, OSError) as e:  # connection refused or dropped, DNS, timeouts
        raise HubError(f"could not reach the Hub to {action} {at}: {_first_line(e)}") from e


def with_retries(fn: Any, *args: Any, tries: int = 5, **kwargs: Any) -> Any:
    """Call ``fn``, retrying dropped connections and timeouts with exponential backoff.

    Downloads resume on retry: the client continues from the cache's ``.incomplete`` file, and renames it
    into place only once it is complete and of the advertised size, so a partial file is never used.
    """
    import time

    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e) or attempt == tries - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def is_transient(err: BaseException) -> bool:
    """A dropped connection or timeout (worth retrying), as opposed to an HTTP error status."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    return isinstance(err, HTTPError | ConnectionError | TimeoutError) and not isinstance(err, HfHubHTTPError)


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the content's sha256, as the Hub reports it
    blob_id: str | None = None  # regular files: the git blob id


@dataclass
class RevisionFiles:
    """What one revision holds that a merge needs: its weight files (and index), and sidecar files."""

    revision: str
    commit: str | None
    files: dict[str, RemoteFile] = field(default_factory=dict)
    weight_format: str | None = None  # "safetensors" | "bin" | None (no weights)
    index_file: str | None = None
    weights: list[str] = field(default_factory=list)  # weight files the revision uses
    missing: list[str] = field(default_factory=list)  # weight files its index names but it lacks

    @property
    def weight_bytes(self) -> int:
        return sum(self.files[w].size for w in self.weights if w in self.files)

    @property
    def sidecars(self) -> list[str]:
        return [f for f in SIDECAR_FILES if f in self.files]


def list_files(client: Any, repo: str, revision: str, commit: str | None = None) -> dict[str, RemoteFile]:
    """A revision's files with sizes and LFS sha256, from one recursive tree listing (no downloads)."""
    from huggingface_hub.hf_api import RepoFile

    files = {}
    with hub_errors(repo, revision, "list the files of"):
        for entry in client.list_repo_tree(repo, revision=commit or revision, recursive=True):
            if isinstance(entry, RepoFile):
                sha = entry.lfs.sha256 if entry.lfs else None
                files[entry.path] = RemoteFile(entry.path, entry.size, sha, entry.blob_id)
    return files


def read_index(client: Any, repo: str, revision: str, commit: str | None, index_file: str) -> dict[str, str]:
    """Download (into the HF cache) and parse a weight index; it is small and tells which shards are needed."""
    import json

    from huggingface_hub import hf_hub_download

    with hub_errors(repo, revision, "download the weight index of"):
        path = hf_hub_download(
            repo, index_file, revision=commit or revision, endpoint=client.endpoint, token=client.token
        )
    try:
        weight_map = json.loads(Path(path).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise HubError(f"{repo}@{revision}: {index_file} is not a valid weight index ({e})") from e
    return weight_map


def revision_files(client: Any, repo: str, revision: str, commit: str | None = None) -> RevisionFiles:
    """Which weight files a revision serves, in the order transformers prefers, and which it lacks."""
    files = list_files(client, repo, revision, commit)
    info = RevisionFiles(revision, commit, files)
    for index, single, fmt in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        if index in files:
            shards = sorted(set(read_index(client, repo, revision, commit, index).values()))
            info.weight_format, info.index_file = fmt, index
            info.weights = [s for s in shards if s in files]
            info.missing = [s for s in shards if s not in files]
            return info
        if single in files:
            info.weight_format, info.weights = fmt, [single]
            return info
    return info
