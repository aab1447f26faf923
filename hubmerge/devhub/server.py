"""The dev Hub server: a running local Hub on loopback, with repo settings and fault hooks for tests.

``with HubServer(tmp_path) as hub: HfApi(endpoint=hub.url, token="x")`` serves :mod:`.storage` through
:mod:`.routes` in a background thread; ``hubmerge hub serve`` runs it in the foreground (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import deque
from pathlib import Path

from hubmerge.devhub.faults import Faults, RequestRecord
from hubmerge.devhub.routes import DevHTTPServer
from hubmerge.devhub.storage import REPO_TYPES, HubStore


class HubServer:
    """A running local Hub: ``with HubServer(tmp_path) as hub: HfApi(endpoint=hub.url, token="x")``.

    ``tokens``: when given, only these bearer tokens are accepted (others answer 401 "Invalid credentials
    in Authorization header", as the Hub does); by default any token is.
    """

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: set[str] | None = None,
        verbose: bool = False,
    ) -> None:
        self.store = HubStore(Path(root))
        self.host, self.requested_port = host, port
        self.tokens = set(tokens) if tokens is not None else None
        self.verbose = verbose
        self.faults = Faults()
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)  # newest last; see RequestRecord
        self._httpd: DevHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the hub server is not running: call start() first")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> int:
        """Serve in a background thread; return the bound port."""
        if self._httpd is None:
            self._httpd = DevHTTPServer(self, (self.host, self.requested_port))
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
            )
            self._thread.start()
        return self.port

    def stop(self) -> None:
        """Stop accepting, cut open keep-alive connections (so clients cannot talk to a stopped server)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        for conn in list(self._httpd.conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

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

    def clear_faults(self) -> None:
        self.faults.clear()


def serve(root: Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run a hub server in the foreground until Ctrl-C (``hubmerge hub serve``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # no-op if already configured
    server = HubServer(root, host, port, verbose=True)
    server.start()
    print(f"Serving a local Hub from {Path(root).resolve()} at {server.url}", flush=True)
    print(f"Use it with: HF_ENDPOINT={server.url} (or endpoint=...) and any token. Ctrl-C stops.", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
