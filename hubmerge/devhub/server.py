"""The dev Hub server: a running local Hub on loopback, with repo settings and fault hooks for tests.

``with HubServer(tmp_path) as hub: HfApi(endpoint=hub.url, token="x")`` serves :mod:`.storage` through
:mod:`.routes` in a background thread; ``hubmerge hub serve`` runs it in the foreground (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
from collections import deque
from pathlib import Path

from hubmerge.devhub.faults import Faults, RequestRecord, Throttle
from hubmerge.devhub.routes import DevHTTPServer
from hubmerge.devhub.storage import REPO_TYPES, HubStore


class HubServer:
    """A running local Hub: ``with HubServer(tmp_path) as hub: HfApi(endpoint=hub.url, token="x")``.

    ``tokens``: when given, only these bearer tokens are accepted (others answer 401 "Invalid credentials
    in Authorization header", as the Hub does); by default any token is.

    As on the Hub, a resolve request for an LFS file answers 302 to a presigned URL on a separate storage host
    (here a second port of the same server, so a different origin: clients drop the token on the way), which
    serves the bytes with ``Range`` support. ``redirect_lfs=False`` serves them from the resolve URL itself.
    ``max_bandwidth`` (bytes per second, all connections of both ports together) paces every body sent.
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: set[str] | None = None,
        verbose: bool = False,
        max_bandwidth: float | None = None,
        redirect_lfs: bool = True,
        storage_ttl: float = 3600.0,
    ) -> None:
        self.store = HubStore(Path(root))
        self.host, self.requested_port = host, port
        self.tokens = set(tokens) if tokens is not None else None
        self.verbose = verbose
        self.faults = Faults()
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)  # newest last; see RequestRecord
        self.throttle = Throttle(max_bandwidth) if max_bandwidth else None
        self.redirect_lfs = redirect_lfs
        self.storage_secret = secrets.token_bytes(32)  # presigned storage URLs die with the server
        self.storage_ttl = storage_ttl
        self._httpd: DevHTTPServer | None = None
        self._storage: DevHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the hub server is not running: call start() first")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return self._url(self.port)

    @property
    def storage_url(self) -> str:
        """Where LFS resolves redirect to: the storage host (another port, so another origin)."""
        if self._storage is None:
            raise RuntimeError("the hub server is not running: call start() first")
        return self._url(self._storage.server_address[1])

    def _url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def start(self) -> int:
        """Serve the Hub and its storage host in background threads; return the Hub's bound port."""
        if self._httpd is None:
            self._httpd = DevHTTPServer(self, (self.host, self.requested_port))
            self._storage = DevHTTPServer(self, (self.host, 0), role="storage")
            for name, httpd in (("hub-server", self._httpd), ("hub-storage", self._storage)):
                thread = threading.Thread(
                    target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return self.port

    def stop(self) -> None:
        """Stop accepting, cut open keep-alive connections (so clients cannot talk to a stopped server)."""
        if self._httpd is None:
            return
        for httpd in (self._httpd, self._storage):
            if httpd is None:
                continue
            httpd.shutdown()
            for conn in list(httpd.conns):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._httpd = self._storage = None
        self._threads = []

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- repo settings (the client's update_repo_settings() does the same over HTTP)
    def _dir(self, repo_id: str, repo_type: str) -> tuple[str, str]:
        t = f"{repo_type}s"
        if t not in REPO_TYPES or not self.store.exists(t, repo_id):
            raise KeyError(f"no {repo_type} repo {repo_id!r} under {self.store.root}")
        return t, repo_id

    def set_gated(self, repo_id: str, gated: bool | str = True, repo_type: str = "model") -> None:
        """Gate a repo: every file download then answers 401/403 with ``X-Error-Code: GatedRepo``."""
        value = "manual" if gated is True else gated
        if value not in (False, "auto", "manual"):
            raise ValueError("gated must be True, False, 'auto' or 'manual'")
        self.store.set_meta(*self._dir(repo_id, repo_type), gated=value)

    def set_private(self, repo_id: str, private: bool = True, repo_type: str = "model") -> None:
        self.store.set_meta(*self._dir(repo_id, repo_type), private=private)

    # -- test hooks: faults, kept in memory and apart from normal serving
    def inject_drop(self, repo_id: str, path: str, after_bytes: int, times: int = 1, repo_type: str = "model") -> None:
        """The next ``times`` GETs of ``path`` send full headers, ``after_bytes`` of body, then hang up."""
        self.faults.add_drop((*self._dir(repo_id, repo_type), path), after_bytes, times)

    def inject_corrupt(self, repo_id: str, path: str, offset: int | None = None, repo_type: str = "model") -> None:
        """Serve ``path`` with one byte flipped (default: the middle one) while advertising the true sha256/etag."""
        self.faults.add_corrupt((*self._dir(repo_id, repo_type), path), offset)

    def inject_range_fault(self, repo_id: str, path: str, kind: str = "ignore", repo_type: str = "model") -> None:
        """Serve ``path`` getting ``Range`` wrong until cleared: ``ignore`` answers 200 with the whole file,
        ``shifted`` answers 206 for the range one byte later (a wrong ``Content-Range``)."""
        self.faults.add_range_fault((*self._dir(repo_id, repo_type), path), kind)

    def clear_faults(self) -> None:
        self.faults.clear()


def serve(
    root: Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    max_bandwidth: float | None = None,
    verbose: bool = True,
    tokens: set[str] | None = None,
) -> None:
    """Run a hub server in the foreground until Ctrl-C (``hubmerge hub serve``); ``tokens``: the only ones accepted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # no-op if already configured
    server = HubServer(root, host, port, verbose=verbose, max_bandwidth=max_bandwidth, tokens=tokens)
    server.start()
    limit = f", at most {max_bandwidth / 1e6:g} MB/s" if max_bandwidth else ""
    where = f"{server.url} (LFS storage at {server.storage_url}{limit})"
    print(f"Serving a local Hub from {Path(root).resolve()} at {where}", flush=True)
    which = f"one of the {len(tokens)} token(s) given" if tokens else "any token"
    print(f"Use it with: HF_ENDPOINT={server.url} (or endpoint=...) and {which}. Ctrl-C stops.", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
