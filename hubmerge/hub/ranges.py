"""Range reads of Hub files: one byte range per request through the client's session, resumed where it dropped.

Used by ``fetch: stream`` (:mod:`hubmerge.hub.stream`) and to complete a killed pull's partial downloads
(:mod:`hubmerge.hub.partials`). Every request goes through the ``huggingface_hub`` client's own HTTP session,
headers (user agent, token) and timeouts (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``), to the resolve
URL pinned to a commit; the storage location an LFS file redirects to is resolved once and cached, and the token
is sent there only when it is the Hub's own origin, the rule the client applies to its downloads. A range must
come back as 206 with exactly the ``Content-Range`` asked for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from hubmerge.errors import StreamError
from hubmerge.hub.client import HubClient, is_transient
from hubmerge.version import __version__

CACHE_HINT = "use `fetch: cache` (or drop --stream) to download the files into the HF cache instead"


@dataclass(frozen=True)
class StreamFile:
    """One remote weight file of one revision: where it is, how big, its LFS sha256 and its header bytes."""

    repo: str
    revision: str  # the branch, for messages
    commit: str
    name: str
    size: int
    sha256: str
    header: bytes  # the file's first 8 + n bytes, already read when planning (hashed first)

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.revision}: {self.name}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


class RangeClient:
    """Range reads of Hub files through the client's session, headers and token; storage locations cached."""

    def __init__(self, client: HubClient) -> None:
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        self.client = client
        self.headers = build_hf_headers(token=client.token, library_name="hubmerge", library_version=__version__)
        self.headers["Accept-Encoding"] = "identity"  # Content-Range counts stored bytes
        self.timeout = _timeout(constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT)
        self._locations: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, tuple[HubClient]]:
        """Pickled as its client alone (Ray ships a streamed plan to its workers): each process builds its own
        headers, timeouts and lock, and resolves storage locations afresh."""
        return (RangeClient, (self.client,))

    def resolve_url(self, repo: str, commit: str, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo, name, revision=commit, endpoint=self.client.endpoint)

    def location(self, repo: str, revision: str, commit: str, name: str, *, refresh: bool = False) -> tuple[str, dict]:
        """Where the bytes of a file are served (the storage URL the Hub redirects to), and the headers to send."""
        key = (repo, commit, name)
        with self._lock:
            if not refresh and key in self._locations:
                return self._locations[key]
        from huggingface_hub.utils import hf_raise_for_status

        url = self.resolve_url(repo, commit, name)
        with self.client.errors(repo, revision, "stream"):
            response = self.client.retry(
                lambda: _session().head(url, headers=self.headers, follow_redirects=False, timeout=self.timeout)
            )
            if response.status_code not in (301, 302, 303, 307, 308):
                hf_raise_for_status(response)
        target = urljoin(url, response.headers["Location"]) if "Location" in response.headers else url
        headers = dict(self.headers)
        if _origin(target) != _origin(url):
            headers.pop("authorization", None)  # a presigned storage URL: the token stays with the Hub
        with self._lock:
            self._locations[key] = (target, headers)
        return target, headers

    def read(self, f: StreamFile, start: int, into: memoryview, stop: threading.Event | None = None) -> None:
        """Fill ``into`` with the file's bytes from ``start``: one range per request, resumed where it dropped."""
        where = {"repo": f.repo, "revision": f.revision, "path": f.name}
        length, got, failures, refreshed, refresh = len(into), 0, 0, False, False
        while got < length:
            if stop is not None and stop.is_set():
                raise StreamError(f"{f.where}: streaming was stopped", **where)
            first, last = start + got, start + length - 1
            url, headers = self.location(f.repo, f.revision, f.commit, f.name, refresh=refresh)
            refresh = False
            filled = [got]  # advanced as bytes arrive, so a dropped connection resumes from the last byte
            error: BaseException | None = None
            try:
                outcome = self._get(f, url, {**headers, "Range": f"bytes={first}-{last}"}, first, last, into, filled)
            except Exception as e:  # noqa: BLE001 - sorted here: transient ones are resumed
                if not is_transient(e):
                    raise
                outcome, error = "dropped", e
            if outcome == "expired":
                if refreshed:
                    raise StreamError(
                        f"{f.where}: the storage host refused the range even after resolving the file again; "
                        f"{CACHE_HINT}",
                        **where,
                    )
                refreshed = refresh = True  # resolved again once; a second refusal is final
                continue
            progressed, got = filled[0] > got, filled[0]
            if got >= length:
                return
            failures = 0 if progressed else failures + 1
            if failures >= self.client.tries:
                why = type(error).__name__ if error is not None else outcome
                raise StreamError(
                    f"{f.where}: the connection dropped {failures} times at byte {start + got} of {f.size} "
                    f"without progress ({why}); check the network and run again, or {CACHE_HINT}",
                    **where,
                ) from error
            time.sleep(0.2 * 2 ** max(0, failures - 1))

    def _get(
        self, f: StreamFile, url: str, headers: dict[str, str], first: int, last: int, into: memoryview, filled: list
    ) -> str:
        """One range GET into ``into[filled[0]:]``, advancing ``filled[0]`` as bytes arrive.

        Returns "done", "short" (the body ended early), "busy" (a 5xx answer: retried like a drop) or "expired"
        (the storage host refused a presigned URL: resolve the file again); raises on a wrong answer.
        """
        from huggingface_hub.utils import hf_raise_for_status

        where = {"repo": f.repo, "revision": f.revision, "path": f.name}
        with _session().stream("GET", url, headers=headers, follow_redirects=True, timeout=self.timeout) as r:
            if r.status_code in (401, 403, 410) and url != self.resolve_url(f.repo, f.commit, f.name):
                return "expired"
            if r.status_code == 200:
                raise StreamError(
                    f"{f.where}: the server answered a range request (bytes {first}-{last}) with the whole file "
                    f"(HTTP 200): it does not serve range reads; {CACHE_HINT}",
                    **where,
                )
            if r.status_code != 206:
                if r.status_code >= 500:
                    return "busy"
                with self.client.errors(f.repo, f.revision, "stream"):
                    hf_raise_for_status(r)
                raise StreamError(
                    f"{f.where}: unexpected HTTP {r.status_code} to a range request; {CACHE_HINT}", **where
                )
            expected = f"bytes {first}-{last}/{f.size}"
            if r.headers.get("Content-Range", "").strip() != expected:
                raise StreamError(
                    f"{f.where}: asked for {expected}, the server sent Content-Range "
                    f"{r.headers.get('Content-Range')!r}; it serves ranges wrongly; {CACHE_HINT}",
                    **where,
                )
            if r.headers.get("Content-Encoding", "identity") not in ("identity", ""):
                raise StreamError(f"{f.where}: the server encoded a range ({r.headers['Content-Encoding']})", **where)
            for chunk in r.iter_raw():
                got, n = filled[0], len(chunk)
                if got + n > len(into):
                    raise StreamError(f"{f.where}: the server sent more bytes than the range it confirmed", **where)
                into[got : got + n] = chunk
                filled[0] = got + n
        return "done" if filled[0] == len(into) else "short"


def _session() -> Any:
    """The client's shared session, fetched per request: the client closes and replaces it after a connect
    error, and a closed session refuses every later request."""
    from huggingface_hub.utils import get_session

    return get_session()


def _timeout(connect: float, read: float) -> Any:
    import httpx2

    return httpx2.Timeout(read, connect=connect)
