"""The dev Hub's HTTP side: the routes ``huggingface_hub`` calls, and the handler that answers them.

Routes are matched on the raw path so ``refs%2Fpr%2F1`` stays one segment. Every answer other than success is
a :class:`~hubmerge.devhub.storage.HubHTTPError`, whose code becomes ``X-Error-Code``: the header that picks the
client's exception class, as on the Hub.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import socket
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlencode

from hubmerge.devhub.cards import card_metadata, validate_card
from hubmerge.devhub.faults import Faults, RequestRecord, Throttle
from hubmerge.devhub.storage import (
    DEFAULT_BRANCH,
    FILE_PREFIXES,
    REPO_TYPES,
    URL_PREFIX,
    USER,
    HubHTTPError,
    HubStore,
    bad_request,
    check_path,
    check_ref_name,
    check_repo_id,
    git_blob_sha1,
    lfs_pointer,
    looks_lfs,
    truthy,
)

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
THROTTLED_CHUNK = 1 << 16
# Request bodies are held in memory (a commit carries its files base64-encoded): refuse larger ones with 413.
MAX_BODY_BYTES = 2 << 30  # small writes keep a bandwidth-limited stream smooth
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class HubState(Protocol):
    """What the handler needs of the running server (:class:`hubmerge.devhub.server.HubServer`)."""

    store: HubStore
    faults: Faults
    requests: deque[RequestRecord]
    tokens: set[str] | None
    verbose: bool
    throttle: Throttle | None
    redirect_lfs: bool
    storage_secret: bytes
    storage_ttl: float

    @property
    def url(self) -> str: ...

    @property
    def storage_url(self) -> str: ...


ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/api/whoami-v2", "whoami"),
    ("POST", "/api/repos/create", "create_repo"),
    ("DELETE", "/api/repos/delete", "delete_repo"),
    ("POST", "/api/validate-yaml", "validate_yaml"),
    ("GET", "/api/{t}/{ns}/{name}", "repo_info"),
    ("GET", "/api/{t}/{ns}/{name}/revision/*rev", "repo_info"),
    ("GET", "/api/{t}/{ns}/{name}/refs", "refs"),
    ("GET", "/api/{t}/{ns}/{name}/tree/{rev}/*path", "tree"),
    ("GET", "/api/{t}/{ns}/{name}/commits/*rev", "commits"),
    ("POST", "/api/{t}/{ns}/{name}/paths-info/*rev", "paths_info"),
    ("POST", "/api/{t}/{ns}/{name}/preupload/*rev", "preupload"),
    ("POST", "/api/{t}/{ns}/{name}/commit/*rev", "commit"),
    ("POST", "/api/{t}/{ns}/{name}/branch/*branch", "create_branch"),
    ("DELETE", "/api/{t}/{ns}/{name}/branch/*branch", "delete_branch"),
    ("POST", "/api/{t}/{ns}/{name}/tag/*rev", "create_tag"),
    ("DELETE", "/api/{t}/{ns}/{name}/tag/*tag", "delete_tag"),
    ("PUT", "/api/{t}/{ns}/{name}/settings", "settings"),
    ("POST", "/api/{t}/{ns}/{name}/discussions", "create_discussion"),
    ("GET", "/api/{t}/{ns}/{name}/discussions/{num}", "discussion"),
    ("GET", "/{ft}/{ns}/{name}/resolve/{rev}/*path", "resolve"),
    ("GET", "/{ns}/{name}/resolve/{rev}/*path", "resolve"),
]
# The storage server (the Hub's CDN or Xet bridge) serves LFS blobs by presigned URL, and nothing else.
STORAGE_ROUTES: list[tuple[str, str, str]] = [("GET", "/lfs/{sha}", "storage")]


def match_route(pattern: str, segments: list[str]) -> dict[str, str] | None:
    """Match decoded path segments against a pattern: ``{x}`` one segment, ``*x`` the (possibly empty) rest."""
    params: dict[str, str] = {}
    parts = pattern.strip("/").split("/")
    for i, part in enumerate(parts):
        if part.startswith("*"):
            params[part[1:]] = "/".join(segments[i:])
            return params
        if i >= len(segments):
            return None
        if part.startswith("{"):
            key, value = part[1:-1], segments[i]
            if not value or (key == "t" and value not in REPO_TYPES) or (key == "ft" and value not in FILE_PREFIXES):
                return None
            params[key] = value
        elif part != segments[i]:
            return None
    return params if len(parts) == len(segments) else None


class Handler(BaseHTTPRequestHandler):
    """One HTTP request. Routes are matched on the raw path so ``refs%2Fpr%2F1`` stays one segment."""

    protocol_version = "HTTP/1.1"
    server_version = "hubmerge-hub/0.1"
    timeout = 60
    server: DevHTTPServer

    # -- plumbing
    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: without this, Nagle's algorithm holds a small body until
        # the client's delayed ACK (40 ms on Linux), for every small range read.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conns.add(self.connection)

    def finish(self) -> None:
        self.server.conns.discard(self.connection)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            super().finish()

    def handle(self) -> None:
        # A client that hung up (a stream aborted mid-body) needs no answer.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError, TimeoutError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        (logger.info if self.server.hub.verbose else logger.debug)("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    @property
    def store(self) -> HubStore:
        return self.server.hub.store

    def _read_body(self) -> bytes:
        """The request body, read whole (commits carry files base64-encoded); one over ``MAX_BODY_BYTES`` is 413."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                if len(out) + size > MAX_BODY_BYTES:
                    self._too_large()
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        declared = self.headers.get("Content-Length") or "0"
        if not declared.strip().isdigit():
            self.close_connection = True  # the body's end is unknown: the connection cannot carry another request
            raise bad_request(f"Content-Length {declared!r} is not a byte count.")
        if int(declared) > MAX_BODY_BYTES:
            self._too_large()
        return self.rfile.read(int(declared))

    def _too_large(self) -> None:
        self.close_connection = True  # the body is not read: the connection cannot carry another request
        raise HubHTTPError(
            413, f"Request body too large: this dev Hub accepts at most {MAX_BODY_BYTES} bytes per request."
        )

    def end_headers(self) -> None:
        self.headers_sent = True
        super().end_headers()

    def _dispatch(self, method: str) -> None:
        self.method, self.headers_sent = method, False
        self.server.hub.requests.append(
            RequestRecord(
                method,
                self.path,
                self.headers.get("Range"),
                "Authorization" in self.headers,
                self.server.server_address[1],
            )
        )
        try:
            self.body = self._read_body()  # always drain, so a keep-alive connection stays in step
            raw_path, _, query = self.path.partition("?")
            self.query = parse_qs(query, keep_blank_values=True)
            try:
                segments = [unquote(s, errors="strict") for s in raw_path.split("/")[1:]]
            except UnicodeDecodeError:
                raise bad_request("The request path is not valid UTF-8.") from None
            route_method = "GET" if method == "HEAD" else method
            for m, pattern, name in STORAGE_ROUTES if self.server.role == "storage" else ROUTES:
                if m == route_method and (params := match_route(pattern, segments)) is not None:
                    getattr(self, f"h_{name}")(**params)
                    return
            raise HubHTTPError(404, f"No route for {method} {raw_path}")
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # a bug here must not kill the thread silently nor hang the client
            if not isinstance(err, HubHTTPError):
                logger.exception("hub server error on %s %s", method, self.path)
                err = HubHTTPError(500, f"Internal error: {type(err).__name__}")
            if self.headers_sent:  # too late for a status: cut the body short so the client notices
                self.close_connection = True
            else:
                self._send_error(err)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

    def _send_error(self, err: HubHTTPError) -> None:
        headers = {"X-Error-Message": err.message.splitlines()[0].encode("ascii", "replace").decode(), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message, **err.extra}, err.status, headers)

    def _body_json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError:
            raise bad_request("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise bad_request("The request body must be a JSON object.")
        return data

    def _param(self, key: str, default: str = "") -> str:
        return self.query.get(key, [default])[-1]

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or self.server.hub.url.split('//')[1]}"

    # -- auth and repo lookup
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        allowed = self.server.hub.tokens
        if token and allowed is not None and token not in allowed:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return token or None

    def _need_token(self) -> str:
        token = self._token()
        if token is None:
            raise HubHTTPError(401, "You must be authenticated (send an 'Authorization: Bearer <token>' header).")
        return token

    def _repo(self, t: str, ns: str, name: str, write: bool = False) -> tuple[str, str, dict[str, Any]]:
        """Check the repo exists and this caller may see it; private and missing repos look alike, as on the Hub."""
        repo_id = check_repo_id(ns, name)
        token = self._need_token() if write else self._token()
        if not self.store.exists(t, repo_id):
            raise HubHTTPError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        meta = self.store.meta(t, repo_id)
        if meta.get("private") and token is None:
            raise HubHTTPError(401, "Invalid username or password.", "RepoNotFound")
        return t, repo_id, meta

    def _repo_url(self, t: str, repo_id: str) -> str:
        return f"{self.base_url}/{URL_PREFIX[t]}{repo_id}"

    # -- account and repo administration
    def h_whoami(self) -> None:
        self._need_token()
        role = {"displayName": "local", "role": "write", "createdAt": "2024-01-01T00:00:00.000Z"}
        user = {"type": "user", "id": "0" * 24, "name": USER, "fullname": "Local test user", "orgs": []}
        self._json({**user, "isPro": False, "auth": {"type": "access_token", "accessToken": role}})

    def _repo_from_body(self, data: dict[str, Any]) -> tuple[str, str]:
        t = {"model": "models", "dataset": "datasets", "space": "spaces"}.get(data.get("type") or "model")
        if t is None:
            raise bad_request(f"Unknown repo type {data.get('type')!r}: use model, dataset or space.")
        return t, check_repo_id(str(data.get("organization") or USER), str(data.get("name") or ""))

    def h_create_repo(self) -> None:
        self._need_token()
        data = self._body_json()
        t, repo_id = self._repo_from_body(data)
        private = data.get("visibility") == "private" if "visibility" in data else bool(data.get("private"))
        extra = {"sdk": data["sdk"]} if t == "spaces" and data.get("sdk") else {}
        url = self._repo_url(t, repo_id)
        if not self.store.create_repo(t, repo_id, private, **extra):
            raise HubHTTPError(409, f"You already created this {REPO_TYPES[t]} repo", extra={"url": url})
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def h_delete_repo(self) -> None:
        t, repo_id = self._repo_from_body(self._body_json())
        self._repo(t, *repo_id.split("/"), write=True)
        self.store.delete_repo(t, repo_id)
        self._json({})

    def h_settings(self, t: str, ns: str, name: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        data = self._body_json()
        changes: dict[str, Any] = {}
        if "gated" in data:
            if data["gated"] not in (False, "auto", "manual"):
                raise bad_request('"gated" must be false, "auto" or "manual".')
            changes["gated"] = data["gated"]
        if "private" in data or "visibility" in data:
            changes["private"] = data.get("visibility") == "private" if "visibility" in data else data["private"]
        self.store.set_meta(t, repo_id, **changes)
        self._json({})

    def h_validate_yaml(self) -> None:
        errors, warnings = validate_card(str(self._body_json().get("content", "")))
        if "text/plain" in self.headers.get("Accept", ""):  # ModelCard.validate shows the body as the error
            self._send(400 if errors else 200, "\n".join(errors).encode(), "text/plain; charset=utf-8")
            return
        body = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        self._json(body, 400 if errors else 200)

    # -- reading
    def _entry_json(self, path: str, entry: dict[str, Any]) -> dict[str, Any]:
        size = entry["size"]
        if not looks_lfs(path, size):
            return {"type": "file", "oid": entry["sha1"], "size": size, "path": path}
        pointer = lfs_pointer(entry["sha256"], size)
        lfs = {"oid": entry["sha256"], "size": size, "pointerSize": len(pointer)}
        return {"type": "file", "oid": git_blob_sha1(pointer), "size": size, "path": path, "lfs": lfs}

    @staticmethod
    def _dir_json(path: str, tree: dict[str, Any]) -> dict[str, Any]:
        inside = sorted(f"{p} {e['sha256']}" for p, e in tree.items() if p.startswith(path + "/"))
        return {
            "type": "directory",
            "oid": hashlib.sha1("\n".join(inside).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def _last_commits(self, t: str, repo_id: str, sha: str, paths: list[str]) -> dict[str, dict[str, str]]:
        """Newest commit touching each path (a folder: anything under it), by walking first-parent history."""
        found: dict[str, dict[str, str]] = {}
        history = self.store.history(t, repo_id, sha)
        for i, commit in enumerate(history):
            parent_tree = history[i + 1]["tree"] if i + 1 < len(history) else {}
            changed = {p for p in set(commit["tree"]) | set(parent_tree) if commit["tree"].get(p) != parent_tree.get(p)}
            for path in paths:
                if path not in found and any(c == path or c.startswith(path + "/") for c in changed):
                    found[path] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
            if len(found) == len(paths):
                break
        return found

    def _listing(self, t: str, repo_id: str, sha: str, tree: dict, paths: list[str], expand: bool) -> list[dict]:
        dirs = {"/".join(p.split("/")[:i]) for p in tree for i in range(1, p.count("/") + 1)}
        out = [
            self._entry_json(p, tree[p]) if p in tree else self._dir_json(p, tree)
            for p in paths
            if p in tree or p in dirs
        ]
        if expand and out:
            last = self._last_commits(t, repo_id, sha, [e["path"] for e in out])
            for e in out:
                e["lastCommit"] = last.get(e["path"])
        return out

    def h_repo_info(self, t: str, ns: str, name: str, rev: str = DEFAULT_BRANCH) -> None:
        t, repo_id, meta = self._repo(t, ns, name)
        sha = self.store.resolve(t, repo_id, rev)
        commit = self.store.commit(t, repo_id, sha)
        tree = commit["tree"]
        blobs = truthy(self._param("blobs"))
        siblings = []
        for path in sorted(tree):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = self._entry_json(path, tree[path])
                sib.update(
                    size=entry["size"],
                    blobId=entry["oid"],
                    **({"lfs": {**entry["lfs"], "sha256": entry["lfs"]["oid"]}} if "lfs" in entry else {}),
                )
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{t}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": meta.get("createdAt"),
            "private": bool(meta.get("private")),
            "gated": meta.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in tree.values()),
        }
        if t == "models":
            info["modelId"] = repo_id
        if t == "spaces":
            info["sdk"] = meta.get("sdk")
        card = tree.get("README.md")
        if card and card["size"] < 1 << 20:
            try:
                data = card_metadata(self.store.blob_path(card["sha256"]).read_text(encoding="utf-8"))
            except Exception:  # a card the Hub would refuse is still served, just without cardData
                data = None
            if isinstance(data, dict):
                info["cardData"] = data
                info["tags"] = [x for x in data.get("tags") or [] if isinstance(x, str)]
        self._json(info)

    def h_refs(self, t: str, ns: str, name: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        refs = self.store.refs(t, repo_id)

        def fmt(prefix: str, items: dict[str, str], full_name: bool = False) -> list[dict[str, str]]:
            return [
                {"name": f"{prefix}{n}" if full_name else n, "ref": f"{prefix}{n}", "targetCommit": sha}
                for n, sha in sorted(items.items())
            ]

        out = {
            "branches": fmt("refs/heads/", refs["branches"]),
            "tags": fmt("refs/tags/", refs["tags"]),
            "converts": [],
        }
        if truthy(self._param("include_prs")):
            out["pullRequests"] = fmt("refs/pr/", refs["pulls"], full_name=True)
        self._json(out)

    def h_tree(self, t: str, ns: str, name: str, rev: str, path: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        sha = self.store.resolve(t, repo_id, rev)
        tree = self.store.commit(t, repo_id, sha)["tree"]
        prefix = check_path(path.strip("/")) + "/" if path.strip("/") else ""
        under = [p[len(prefix) :] for p in tree if p.startswith(prefix)]
        if prefix and not under:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        if truthy(self._param("recursive")):
            names = {"/".join(p.split("/")[:i]) for p in under for i in range(1, p.count("/") + 2)}
        else:
            names = {p.split("/")[0] for p in under}
        paths = sorted((prefix + n for n in names), key=lambda p: (p not in tree, p))
        self._json(self._listing(t, repo_id, sha, tree, paths, truthy(self._param("expand"))))

    def h_paths_info(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        sha = self.store.resolve(t, repo_id, rev)
        tree = self.store.commit(t, repo_id, sha)["tree"]
        form = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        paths = [check_path(p.strip("/")) for p in form.get("paths", [])]
        expand = truthy(form.get("expand", ["false"])[-1])
        self._json(self._listing(t, repo_id, sha, tree, list(dict.fromkeys(paths)), expand))

    def h_commits(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        sha = self.store.resolve(t, repo_id, rev)
        out = []
        for c in self.store.history(t, repo_id, sha):
            item = {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"]}
            item["authors"] = [{"user": a, "avatar": None} for a in c["authors"]]
            if "formatted" in self._param("expand[]"):
                item["formatted"] = {"title": c["title"], "message": c["message"]}
            out.append(item)
        self._json(out)

    def h_resolve(self, ns: str, name: str, rev: str, path: str, ft: str = "models") -> None:
        t, repo_id, meta = self._repo(ft, ns, name)
        path = check_path(path)
        if meta.get("gated"):
            token = self._token()
            message = f"Access to {REPO_TYPES[t]} {repo_id} is restricted" + (
                " and you are not in the authorized list." if token else ". You must be authenticated to access it."
            )
            raise HubHTTPError(403 if token else 401, message, "GatedRepo")
        sha = self.store.resolve(t, repo_id, rev)
        entry = self.store.commit(t, repo_id, sha)["tree"].get(path)
        if entry is None:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        lfs = looks_lfs(path, size)
        etag = f'"{entry["sha256"] if lfs else entry["sha1"]}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
        if lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(size)})
            if self.server.hub.redirect_lfs:  # as the Hub does: the bytes come from its storage host
                headers["Location"] = self._presigned(t, repo_id, path, entry["sha256"])
                self._send(302, b"", "text/plain; charset=utf-8", headers)
                return
        self._serve_blob(entry["sha256"], size, headers, (t, repo_id, path))

    def _presigned(self, t: str, repo_id: str, path: str, sha256: str) -> str:
        """A storage URL that needs no token, valid for ``storage_ttl`` seconds, like the Hub's signed CDN URLs."""
        hub = self.server.hub
        query = {"type": t, "repo": repo_id, "expires": str(int(time.time() + hub.storage_ttl)), "path": path}
        signed = {"signature": _signature(hub.storage_secret, sha256, query)}
        # The file name last, as CDN URLs end with it (and request records show it).
        return f"{hub.storage_url}/lfs/{sha256}?{urlencode(signed)}&{urlencode(query)}"

    def h_storage(self, sha: str) -> None:
        hub = self.server.hub
        query = {k: self._param(k) for k in ("type", "repo", "path", "expires")}
        if not hmac.compare_digest(self._param("signature"), _signature(hub.storage_secret, sha, query)):
            raise HubHTTPError(403, "Signature does not match")
        if not query["expires"].isdigit() or int(query["expires"]) < time.time():
            raise HubHTTPError(403, "Request has expired")
        size = self.store.blob_size(sha)
        if size is None:
            raise HubHTTPError(404, "No such blob")
        headers = {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}
        self._serve_blob(sha, size, headers, (query["type"], query["repo"], query["path"]))

    def _serve_blob(self, sha256: str, size: int, headers: dict[str, str], key: tuple[str, str, str]) -> None:
        """A blob's bytes, or the one range asked for (206 + ``Content-Range``), with the injected faults."""
        start, end, status = 0, size - 1, 200
        fault = self.server.hub.faults.range_fault(key)
        if (spec := self.headers.get("Range")) and self.method == "GET" and fault != "ignore":
            m = _RANGE.match(spec.strip())
            if m and m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            elif m and m[2]:
                start = max(size - int(m[2]), 0)
            if not m or start > end or start >= size:
                raise HubHTTPError(416, f"Range not satisfiable: {spec}", headers={"Content-Range": f"bytes */{size}"})
            if fault == "shifted" and end < size - 1:
                start, end = start + 1, end + 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        for k, value in headers.items():
            self.send_header(k, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.method == "GET":
            self._stream(self.store.blob_path(sha256), start, end - start + 1, key, size)

    def _stream(self, blob: Path, start: int, length: int, key: tuple[str, str, str], size: int) -> None:
        """Send ``length`` bytes of ``blob`` from ``start`` by ``sendfile`` (no copy through Python): in paced steps
        under a bandwidth limit, copied around an injected flipped byte, cut short by an injected drop."""
        faults = self.server.hub.faults
        throttle = self.server.hub.throttle
        drop_after = faults.take_drop(key)
        flip = faults.corrupt_offset(key, size)
        end = start + (length if drop_after is None else min(length, drop_after))
        step = CHUNK if throttle is None else THROTTLED_CHUNK
        with blob.open("rb") as f:
            pos = start
            while pos < end:
                n = min(step if throttle is not None or flip is not None else end - pos, end - pos)
                if throttle is not None:
                    throttle.take(n)
                if flip is not None and pos <= flip < pos + n:
                    f.seek(pos)
                    chunk = bytearray(f.read(n))
                    chunk[flip - pos] ^= 0xFF
                    self.wfile.write(chunk)
                    sent = len(chunk)
                else:
                    sent = self.connection.sendfile(f, offset=pos, count=n)
                if sent <= 0:
                    break
                pos += sent
        if pos - start < length:  # injected drop: the client sees a body shorter than Content-Length
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- writing
    def h_preupload(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        files = self._body_json().get("files")
        if not isinstance(files, list):
            raise bad_request('"files" must be a list of {path, sample, size}.')
        tree = self.store.commit(t, repo_id, self.store.resolve(t, repo_id, rev))["tree"]
        out = []
        for f in files:
            path = check_path(str(f.get("path", "")) if isinstance(f, dict) else "")
            oid = tree[path]["sha1"] if path in tree else None
            out.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": out, "commitOid": None})

    def _parse_ndjson(self) -> tuple[dict[str, Any], list[tuple[str, str, dict | None]]]:
        header: dict[str, Any] | None = None
        ops: list[tuple[str, str, dict | None]] = []
        for n, line in enumerate(self.body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
                path = "" if key == "header" else str(value["path"])
            except (ValueError, KeyError, TypeError):
                raise bad_request(f"Line {n} of the commit payload is not a valid operation.") from None
            if key != "header":
                check_path(path.rstrip("/") if key == "deletedFolder" else path)
            if key == "header":
                header = value
            elif key == "file":
                try:
                    data = base64.b64decode(str(value.get("content", "")), validate=True)
                except ValueError:
                    raise bad_request(f"The content of {path} is not valid base64.") from None
                if path == "README.md" and (errors := validate_card(data.decode("utf-8", "replace"))[0]):
                    raise bad_request("Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
                ops.append(("file", path, self.store.put_blob(data)))
            elif key == "lfsFile":
                entry = self.store.existing_blob(str(value.get("oid", "")))
                if entry is None:
                    raise bad_request(
                        f"LFS object {value.get('oid')} for {path} is unknown: this server takes regular uploads."
                    )
                ops.append(("file", path, entry))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path, None))
            else:
                raise bad_request(f"Unknown commit operation {key!r} on line {n}.")
        if not isinstance(header, dict) or not header.get("summary"):
            raise bad_request("The commit payload needs a header line with a non-empty summary.")
        return header, ops

    def h_commit(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        header, ops = self._parse_ndjson()
        create_pr = truthy(self._param("create_pr"))
        title, message, parent = header["summary"], header.get("description", ""), header.get("parentCommit")
        sha, pr = self.store.apply_commit(t, repo_id, rev, ops, title, message, parent, create_pr)
        url = self._repo_url(t, repo_id)
        pr_url = f"{url}/discussions/{pr}" if pr else None
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}", "pullRequestUrl": pr_url})

    def h_create_branch(self, t: str, ns: str, name: str, branch: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        start = self._body_json().get("startingPoint") or DEFAULT_BRANCH
        self.store.create_ref(t, repo_id, "branches", check_ref_name(branch), self.store.resolve(t, repo_id, start))
        self._json({})

    def h_delete_branch(self, t: str, ns: str, name: str, branch: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        if branch == DEFAULT_BRANCH:
            raise bad_request("The default branch cannot be deleted.")
        self.store.delete_ref(t, repo_id, "branches", branch)
        self._json({})

    def h_create_tag(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        tag = check_ref_name(str(self._body_json().get("tag") or ""))
        self.store.create_ref(t, repo_id, "tags", tag, self.store.resolve(t, repo_id, rev))
        self._json({})

    # -- pull requests (the client's pipelined upload opens one, then commits to refs/pr/N)
    def h_create_discussion(self, t: str, ns: str, name: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        data = self._body_json()
        num = self.store.create_discussion(
            t,
            repo_id,
            str(data.get("title") or ""),
            str(data.get("description") or ""),
            bool(data.get("pullRequest")),
        )
        self._json({"num": int(num), "url": f"{self._repo_url(t, repo_id)}/discussions/{num}"})

    def h_discussion(self, t: str, ns: str, name: str, num: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        found = self.store.discussion(t, repo_id, num)
        if found is None:
            raise HubHTTPError(404, f"Discussion {num} not found")
        self._json(
            {
                "num": int(num),
                "title": found["title"],
                "author": {"name": USER},
                "createdAt": found["createdAt"],
                "status": found["status"],
                "repo": {"name": repo_id, "type": t.removesuffix("s")},
                "isPullRequest": found["isPullRequest"],
                "events": [],
                "changes": {"base": f"refs/heads/{DEFAULT_BRANCH}"},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    def h_delete_tag(self, t: str, ns: str, name: str, tag: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        self.store.delete_ref(t, repo_id, "tags", tag)
        self._json({})


def _signature(secret: bytes, sha256: str, query: dict[str, str]) -> str:
    message = "\n".join([sha256, query["type"], query["repo"], query["path"], query["expires"]])
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


class DevHTTPServer(ThreadingHTTPServer):
    """One listening socket of the dev Hub: ``role`` "api" (the Hub's routes) or "storage" (LFS blobs only)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubState, address: tuple[str, int], role: str = "api") -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.hub, self.conns = hub, set[socket.socket]()  # conns: open connections, cut on stop()
        self.role = role
        super().__init__(address, Handler)
