"""One client context for a Hub (huggingface.co, a mirror, or ``hubmerge hub serve``).

A :class:`HubClient` carries what every Hub call needs, decided once: the endpoint (``--endpoint``, else
``HF_ENDPOINT``), the token (given, else the client's usual sources: ``HF_TOKEN``, ``hf auth login``), and
whether to work offline (``HF_HUB_OFFLINE``). It hands out the real ``huggingface_hub.HfApi``, retries dropped
connections, and turns the client's exceptions into :class:`~hubmerge.errors.HubError` lines that say what to
do. hubmerge never prints or stores the token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hubmerge.errors import HubError, RepoIdError, RevisionError
from hubmerge.io.checkpoint import SIDECAR_FILES, weight_layout
from hubmerge.io.env import hf_endpoint, hf_offline
from hubmerge.version import __version__

if TYPE_CHECKING:
    from huggingface_hub import HfApi

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
T = TypeVar("T")


def first_line(err: BaseException) -> str:
    """The first line of an exception's text (the client appends a second line with a link)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_transient(err: BaseException) -> bool:
    """A dropped connection or timeout (worth retrying), as opposed to an HTTP error status or offline mode.

    The client's ``OfflineModeIsEnabled`` is a ``ConnectionError``, but retrying it only sleeps: it is final.
    """
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    if isinstance(err, HfHubHTTPError | OfflineModeIsEnabled):
        return False
    return isinstance(err, HTTPError | ConnectionError | TimeoutError) or is_closed_session(err)


def is_closed_session(err: BaseException) -> bool:
    """httpx's error for a request on a session another thread's connect error made the client close: the
    next attempt gets the client's new session."""
    return isinstance(err, RuntimeError) and "client has been closed" in str(err)


def request_timeouts() -> dict[str, float]:
    """The bounds every Hub request gets: connect ``HF_HUB_ETAG_TIMEOUT``, read/write/pool
    ``HF_HUB_DOWNLOAD_TIMEOUT`` (the client's own variables, 10 s each by default)."""
    from huggingface_hub import constants

    connect, read = float(constants.HF_HUB_ETAG_TIMEOUT), float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    return {"connect": connect, "read": read, "write": read, "pool": read}


def _bound_request(request: Any) -> None:
    """Fill in the timeouts a request was sent without.

    The client's shared httpx session has no timeout, and most ``HfApi`` calls (``list_repo_refs``,
    ``list_repo_tree``, commits) pass none: against a server that accepts the connection and then stalls they
    wait forever. Timeouts a call did set (downloads, range reads) are kept.
    """
    given = request.extensions.get("timeout") or {}
    bounds = request_timeouts()
    request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else v for k, v in bounds.items()}


_bound_lock = threading.Lock()
_bound_users = 0
_bound_sessions: list[Any] = []


def _hook_session() -> None:
    """Put the timeout hook on the client's current session (it replaces the session after a connect error)."""
    from huggingface_hub.utils import get_session

    session = get_session()
    with _bound_lock:
        if _bound_users and _bound_request not in session.event_hooks["request"]:
            hooks = session.event_hooks
            session.event_hooks = {**hooks, "request": [*hooks["request"], _bound_request]}
            _bound_sessions.append(session)


@contextmanager
def bounded_requests() -> Iterator[None]:
    """Give every request of the shared ``huggingface_hub`` session a timeout for a block, then take the hook
    off again (nested and concurrent blocks share one hook; the last one out removes it)."""
    global _bound_users
    with _bound_lock:
        _bound_users += 1
    try:
        _hook_session()
        yield
    finally:
        with _bound_lock:
            _bound_users -= 1
            if _bound_users == 0:
                for session in _bound_sessions:
                    hooks = session.event_hooks
                    session.event_hooks = {**hooks, "request": [h for h in hooks["request"] if h is not _bound_request]}
                _bound_sessions.clear()


def is_unreachable(err: HubError) -> bool:
    """A HubError raised because the Hub could not be reached at all (no network, offline mode, timeouts)."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    cause = err.__cause__  # offline mode and a missing cache entry are OSErrors; a refused connection, an HTTPError
    return isinstance(cause, HTTPError | OSError) and not isinstance(cause, HfHubHTTPError)


@dataclass(frozen=True)
class HubClient:
    """Endpoint, token and offline mode for every Hub call of one command.

    ``HubClient()`` reads the environment now; ``HubClient(endpoint=URL, token=T)`` pins them. ``tries`` bounds
    the attempts on a dropped connection.
    """

    endpoint: str | None = field(default_factory=hf_endpoint)
    token: str | None = field(default=None, repr=False)
    offline: bool = field(default_factory=hf_offline)
    tries: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoint", hf_endpoint(self.endpoint))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the cached ``HfApi`` (Ray ships clients to workers; each makes its own)."""
        state = dict(self.__dict__)
        state.pop("api", None)
        return state

    @cached_property
    def api(self) -> HfApi:
        """The real client, aimed at this endpoint with this token."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token, library_name="hubmerge", library_version=__version__)

    @contextmanager
    def errors(self, repo: str, revision: str | None = None, action: str = "read") -> Iterator[None]:
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
        where = {"repo": repo, "revision": revision}
        try:
            with bounded_requests():
                yield
        except GatedRepoError as e:
            raise HubError(f"{repo} is gated: accept its conditions on its Hub page, then {LOGIN_HINT}", **where) from e
        except RepositoryNotFoundError as e:
            raise HubError(
                f"repo {repo!r} was not found, or it is private and this request was not authorised: check the "
                f"name; for a private repo {LOGIN_HINT}",
                **where,
            ) from e
        except RevisionNotFoundError as e:
            raise RevisionError(
                f"revision {revision!r} not found in {repo}; `hubmerge revisions {repo}` lists them", **where
            ) from e
        except EntryNotFoundError as e:
            raise HubError(f"{at}: file not found ({first_line(e)})", **where) from e
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            raise HubError(
                f"{at}: not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE is set, or no "
                "network); pull it once online first",
                **where,
            ) from e
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise HubError(f"not authorised to {action} {at} (HTTP {status}): {LOGIN_HINT}", **where) from e
            raise HubError(f"could not {action} {at}: {first_line(e)}", **where) from e
        except HFValidationError as e:
            raise RepoIdError(f"{repo!r} is not a valid repo id ('owner/name'): {first_line(e)}", **where) from e
        except (HTTPError, OSError) as e:  # connection refused or dropped, DNS, timeouts
            raise HubError(f"could not reach the Hub to {action} {at}: {first_line(e)}", **where) from e
        except RuntimeError as e:
            if not is_closed_session(e):
                raise
            raise HubError(f"could not reach the Hub to {action} {at}: the connection kept failing", **where) from e

    def retry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn``, retrying dropped connections and timeouts with exponential backoff.

        Downloads resume on retry: the client continues from the cache's ``.incomplete`` file, and renames it
        into place only once it is complete and of the advertised size, so a partial file is never used.
        """
        for attempt in range(self.tries):
            try:
                _hook_session()
                return fn(*args, **kwargs)
            except Exception as e:
                if not is_transient(e) or attempt == self.tries - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise HubError(f"{getattr(fn, '__name__', 'a Hub call')}: no attempt was made (tries={self.tries})")

    def download(self, repo: str, filename: str, revision: str, *, label: str | None = None, **kwargs: Any) -> Path:
        """``hf_hub_download`` into the HF cache through this endpoint and token, with retries; a local path.

        ``revision`` is what is fetched (a commit sha pins it); ``label`` is how errors name it (the branch).
        """
        from huggingface_hub import hf_hub_download

        with self.errors(repo, label or revision, "download"):
            return Path(
                self.retry(
                    hf_hub_download,
                    repo,
                    filename,
                    revision=revision,
                    endpoint=self.endpoint,
                    token=self.token,
                    **kwargs,
                )
            )

    def card_license(self, repo: str, revision: str | None = None) -> dict[str, str]:
        """``license`` (with ``license_name``/``license_link`` for ``other``) as the repo's card states it on the Hub,
        at ``revision`` and else on the default branch (a checkpoint branch may predate the card); empty
        when neither states one. A Hub that cannot be reached is a HubError, so a caller can say it did not check.
        """
        keys = ("license", "license_name", "license_link")
        for rev in dict.fromkeys([revision, None]):
            with self.errors(repo, rev, "read the model card of"):
                info = self.retry(self.api.model_info, repo, revision=rev)
            data = info.card_data.to_dict() if info.card_data is not None else {}
            if isinstance(data.get("license"), str) and data["license"]:
                return {k: data[k] for k in keys if isinstance(data.get(k), str) and data[k]}
        return {}

    def branches(self, repo: str) -> list[tuple[str, str | None]]:
        """``(name, commit)`` of every branch of a model repo (tags and PR refs are not checkpoints)."""
        with self.errors(repo, action="list the branches of"):
            refs = self.retry(self.api.list_repo_refs, repo, repo_type="model")
        return [(b.name, b.target_commit) for b in refs.branches]


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files: the content's sha256, as the Hub reports it
    blob_id: str | None = None  # regular files: the git blob id

    @property
    def identity(self) -> str:
        """What makes two files the same content: the LFS sha256, else the git blob id."""
        return f"sha256:{self.sha256}" if self.sha256 else f"git:{self.blob_id}"


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

    @classmethod
    def from_files(
        cls, revision: str, commit: str | None, files: dict[str, RemoteFile], read_index: Callable[[str], Any]
    ) -> RevisionFiles:
        """The weight layout of a listing (the same rule as for local folders)."""
        layout = weight_layout(files, read_index)
        return cls(revision, commit, files, layout.format, layout.index_file, list(layout.files), list(layout.missing))


def list_files(client: HubClient, repo: str, revision: str, commit: str | None = None) -> dict[str, RemoteFile]:
    """A revision's files with sizes and LFS sha256, from one recursive tree listing (no downloads)."""
    from huggingface_hub.hf_api import RepoFile

    files = {}
    with client.errors(repo, revision, "list the files of"):
        for entry in client.retry(
            lambda: list(client.api.list_repo_tree(repo, revision=commit or revision, recursive=True))
        ):
            if isinstance(entry, RepoFile):
                sha = entry.lfs.sha256 if entry.lfs else None
                files[entry.path] = RemoteFile(entry.path, entry.size, sha, entry.blob_id)
    return files


def read_index(client: HubClient, repo: str, revision: str, commit: str | None, index_file: str) -> dict[str, str]:
    """Download (into the HF cache) and parse a weight index; it is small and tells which shards are needed."""
    path = client.download(repo, index_file, commit or revision, label=revision)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise HubError(
            f"{repo}@{revision}: {index_file} is not a valid weight index ({e})", repo=repo, revision=revision
        ) from e
    if not isinstance(weight_map, dict):
        raise HubError(f"{repo}@{revision}: {index_file} has no 'weight_map' mapping", repo=repo, revision=revision)
    return weight_map


def revision_files(client: HubClient, repo: str, revision: str, commit: str | None = None) -> RevisionFiles:
    """Which weight files a revision serves, in the order transformers prefers, and which it lacks."""
    files = list_files(client, repo, revision, commit)
    return RevisionFiles.from_files(
        revision, commit, files, lambda index: read_index(client, repo, revision, commit, index)
    )
