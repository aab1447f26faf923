"""A local Hugging Face Hub look-alike, for tests and the offline demo.

``huggingface_hub`` talks to any endpoint that answers like the Hub, so pointing ``HfApi(endpoint=...)``,
``hf_hub_download(endpoint=...)`` or ``HF_ENDPOINT`` at this server exercises the real client code paths
(typed errors, resumable downloads, caching, commits, pull requests) without the internet.

This is a development/demo server, not a Hub:

* it binds to 127.0.0.1 by default and has no real authentication: any ``Authorization: Bearer`` token
  is accepted (unless ``tokens=`` restricts them), and a token is required only for writes, private repos
  and ``whoami``. Gated repos refuse every file download (there is no access list);
* it has no git, LFS or Xet protocol: ``preupload`` answers ``uploadMode: "regular"`` so the client sends
  file bytes base64-encoded inside the NDJSON commit. Weight files and files of 10 MiB or more are
  *reported* like LFS files (``lfs.oid`` = sha256, ``ETag``/``X-Linked-Etag`` = sha256), as the Hub does;
* repo ids must have a namespace (``user/name``), as every repo on today's Hub does.

Storage under ``root`` survives restarts: content-addressed blobs (``blobs/ab/<sha256>``), and per repo a
settings file (``repo.json``: ``private``, ``gated``), refs (``refs.json``) and one JSON document per commit
(``commits/<sha>.json``, holding the parents and the full file table). Every write goes to a temporary
file and is renamed into place under a lock, so a reader never sees half a file.

Fault injection for tests (:meth:`HubServer.inject_drop`, :meth:`HubServer.inject_corrupt`) lives in
:class:`_Faults`, in memory only, apart from the normal serving path.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import uuid
from collections import deque
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

logger = logging.getLogger(__name__)

USER = "hubmerge-user"
DEFAULT_BRANCH = "main"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}
FILE_PREFIXES = ("datasets", "spaces")  # /{prefix}/{repo}/resolve/...; models have no prefix
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
CHUNK = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HEX = re.compile(r"^[0-9a-f]{7,40}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)


class HubHTTPError(Exception):
    """An answer other than success; ``code`` becomes ``X-Error-Code``, which picks the client's exception."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def _bad(message: str) -> HubHTTPError:
    return HubHTTPError(400, message)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def check_path(path: str) -> str:
    """Reject paths that could escape a repo or mean different things to different tools."""
    if not path or len(path) > 1024 or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise _bad(f"Invalid path {path!r}: use a non-empty relative path with '/' separators.")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise _bad(f"Invalid path {path!r}: backslashes and control characters are not allowed.")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise _bad(f"Invalid path {path!r}: empty, '.' and '..' segments are not allowed.")
    return path


def check_repo_id(namespace: str, name: str) -> str:
    for part in (namespace, name):
        if not _NAME.match(part) or ".." in part or "--" in part:
            raise _bad(
                f"Invalid repo id {namespace + '/' + name!r}: use letters, digits, '-', '_' and '.', "
                "without '--' or '..', at most 96 characters per part."
            )
    return f"{namespace}/{name}"


def check_ref_name(name: str) -> str:
    if (
        not name
        or len(name) > 256
        or name.startswith(("/", "-", "refs/"))
        or name.endswith(("/", ".lock"))
        or _HEX.match(name)
        or any(bad in name for bad in ("..", "//", "@{", "\\", " ", "~", "^", ":", "?", "*", "["))
        or any(ord(c) < 32 for c in name)
    ):
        raise _bad(f"Invalid reference name {name!r}.")
    return name


def looks_lfs(path: str, size: int) -> bool:
    """Would the real Hub store this file in LFS? Weights always, anything else from 10 MiB."""
    return size >= LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --------------------------------------------------------------------------------------------- storage


class HubStore:
    """Repositories on disk. Writers hold one lock; readers rely on atomic renames and immutable commits."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- files
    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _write_json(self, path: Path, obj: Any) -> None:
        self._write(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    @staticmethod
    def _read_json(path: Path) -> Any:
        return json.loads(path.read_bytes())

    def repo_dir(self, t: str, repo_id: str) -> Path:
        return self.root / "repos" / t / repo_id

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def put_blob(self, data: bytes) -> dict[str, Any]:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            self._write(path, data)
        return {"sha256": sha256, "size": len(data), "sha1": git_blob_sha1(data)}

    def existing_blob(self, sha256: str) -> dict[str, Any] | None:
        path = self.blob_path(sha256) if re.fullmatch(r"[0-9a-f]{64}", sha256) else None
        return self.put_blob(path.read_bytes()) if path is not None and path.exists() else None

    # -- repos
    def exists(self, t: str, repo_id: str) -> bool:
        return (self.repo_dir(t, repo_id) / "repo.json").exists()

    def meta(self, t: str, repo_id: str) -> dict[str, Any]:
        return self._read_json(self.repo_dir(t, repo_id) / "repo.json")

    def set_meta(self, t: str, repo_id: str, **changes: Any) -> None:
        with self.lock:
            meta = self.meta(t, repo_id)
            meta.update(changes)
            self._write_json(self.repo_dir(t, repo_id) / "repo.json", meta)

    def create_repo(self, t: str, repo_id: str, private: bool, **extra: Any) -> bool:
        with self.lock:
            if self.exists(t, repo_id):
                return False
            tree = {".gitattributes": self.put_blob(_GITATTRIBUTES.encode())}
            sha = self._new_commit(t, repo_id, [], tree, "initial commit", "", author="system")
            self._write_json(self.repo_dir(t, repo_id) / "refs.json", {"branches": {DEFAULT_BRANCH: sha}})
            meta = {"private": private, "gated": False, "createdAt": _now(), **extra}
            self._write_json(self.repo_dir(t, repo_id) / "repo.json", meta)  # written last: marks it complete
            return True

    def delete_repo(self, t: str, repo_id: str) -> None:
        with self.lock:
            src = self.repo_dir(t, repo_id)
            trash = self.root / "repos" / f".deleted-{uuid.uuid4().hex}"
            os.replace(src, trash)  # atomic for readers; blobs stay shared
            shutil.rmtree(trash, ignore_errors=True)

    # -- refs and commits
    def refs(self, t: str, repo_id: str) -> dict[str, dict[str, str]]:
        refs = self._read_json(self.repo_dir(t, repo_id) / "refs.json")
        return {"branches": refs.get("branches", {}), "tags": refs.get("tags", {}), "pulls": refs.get("pulls", {})}

    def _set_ref(self, t: str, repo_id: str, kind: str, name: str, sha: str | None) -> None:
        refs = self.refs(t, repo_id)
        if sha is None:
            refs[kind].pop(name, None)
        else:
            refs[kind][name] = sha
        self._write_json(self.repo_dir(t, repo_id) / "refs.json", refs)

    def commit(self, t: str, repo_id: str, sha: str) -> dict[str, Any]:
        return self._read_json(self.repo_dir(t, repo_id) / "commits" / f"{sha}.json")

    def writable_ref(self, t: str, repo_id: str, rev: str) -> tuple[str, str]:
        """Map a revision a commit may target to ``(kind, name)``: a branch or an open pull request."""
        refs = self.refs(t, repo_id)
        name = rev.removeprefix("refs/heads/")
        if name in refs["branches"]:
            return "branches", name
        if (m := re.fullmatch(r"refs/pr/(\d+)", rev)) and m[1] in refs["pulls"]:
            return "pulls", m[1]
        self.resolve(t, repo_id, rev)  # an unknown revision answers RevisionNotFound
        raise _bad(f"Invalid rev id: {rev!r} is not a branch; commits can only target a branch or refs/pr/N.")

    def resolve(self, t: str, repo_id: str, rev: str) -> str:
        """A branch, tag, ``refs/heads|tags|pr/...`` name, full commit sha or unique prefix (7+) to a commit sha."""
        refs = self.refs(t, repo_id)
        for kind, name in [
            ("branches", rev.removeprefix("refs/heads/")),
            ("tags", rev.removeprefix("refs/tags/")),
            ("pulls", rev.removeprefix("refs/pr/")),
        ]:
            if name in refs[kind] and (name != rev or kind != "pulls"):
                return refs[kind][name]
        if _HEX.match(rev):
            hits = [p.stem for p in (self.repo_dir(t, repo_id) / "commits").glob(f"{rev}*.json")]
            if len(hits) == 1:
                return hits[0]
        raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(
        self, t: str, repo_id: str, parents: list[str], tree: dict, title: str, message: str, author: str = USER
    ) -> str:
        body = {"parents": parents, "tree": tree, "title": title, "message": message, "date": _now()}
        body["authors"] = [author]
        sha = hashlib.sha1(json.dumps({**body, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()).hexdigest()
        self._write_json(self.repo_dir(t, repo_id) / "commits" / f"{sha}.json", {"id": sha, **body})
        return sha

    def history(self, t: str, repo_id: str, sha: str) -> list[dict[str, Any]]:
        """First-parent history, newest first (this store never makes merge commits)."""
        out = []
        while True:
            commit = self.commit(t, repo_id, sha)
            out.append(commit)
            if not commit["parents"]:
                return out
            sha = commit["parents"][0]

    def apply_commit(
        self,
        t: str,
        repo_id: str,
        rev: str,
        ops: list[tuple[str, str, dict | None]],
        title: str,
        message: str,
        parent_commit: str | None,
        create_pr: bool,
    ) -> tuple[str, str | None]:
        """Apply ``(kind, path, entry)`` operations on top of ``rev``; return ``(commit sha, pr number)``."""
        with self.lock:
            kind, ref = self.writable_ref(t, repo_id, rev)
            head = self.refs(t, repo_id)[kind][ref]
            if parent_commit and create_pr:
                head = self.resolve(t, repo_id, parent_commit)
            elif parent_commit and not head.startswith(parent_commit.lower()):
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(self.commit(t, repo_id, head)["tree"])
            for op, path, entry in ops:
                if op == "file":
                    if any(p.startswith(path + "/") for p in tree) or any(
                        "/".join(path.split("/")[:i]) in tree for i in range(1, path.count("/") + 1)
                    ):
                        raise _bad(f"Cannot add {path!r}: it conflicts with an existing file or folder.")
                    tree[path] = entry
                elif op == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    gone = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
                    if not gone:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del tree[p]
            sha = self._new_commit(t, repo_id, [head], tree, title, message)
            if create_pr:
                pulls = self.refs(t, repo_id)["pulls"]
                kind, ref = "pulls", str(max((int(n) for n in pulls), default=0) + 1)
            self._set_ref(t, repo_id, kind, ref, sha)
            return sha, ref if create_pr else None

    def create_ref(self, t: str, repo_id: str, kind: str, name: str, sha: str) -> None:
        with self.lock:
            if name in self.refs(t, repo_id)[kind]:
                raise HubHTTPError(409, f"Reference already exists: {name}")
            self._set_ref(t, repo_id, kind, name, sha)

    def delete_ref(self, t: str, repo_id: str, kind: str, name: str) -> None:
        with self.lock:
            if name not in self.refs(t, repo_id)[kind]:
                raise HubHTTPError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self._set_ref(t, repo_id, kind, name, None)


# ------------------------------------------------------------------------------- card metadata checks

_STR, _STRS, _STR_OR_STRS = "a string", "a list of strings", "a string or a list of strings"
_CARD_KEYS = {
    "license": _STR,
    "license_name": _STR,
    "license_link": _STR,
    "library_name": _STR,
    "pipeline_tag": _STR,
    "thumbnail": _STR,
    "pretty_name": _STR,
    "base_model_relation": _STR,
    "new_version": _STR,
    "tags": _STRS,
    "task_categories": _STRS,
    "size_categories": _STRS,
    "datasets": _STR_OR_STRS,
    "metrics": _STR_OR_STRS,
    "language": _STR_OR_STRS,
    "base_model": _STR_OR_STRS,
}


def _is_type(value: Any, expected: str) -> bool:
    strs = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return {_STR: isinstance(value, str), _STRS: strs, _STR_OR_STRS: isinstance(value, str) or strs}[expected]


def _model_index_errors(index: Any) -> list[str]:
    """The shape the Hub's model-index parser needs: name, results[].task.type, dataset.{type,name}, metrics[]."""
    if not isinstance(index, list) or not all(isinstance(entry, dict) for entry in index):
        return ['"model-index" must be a list of mappings with "name" and "results"']
    errors: list[str] = []
    kinds = {str: "a string", list: "a list", dict: "a mapping"}

    def need(obj: dict | None, key: str, where: str, kind: type = str) -> Any:
        """The value if it has the right type; otherwise record an error and return None."""
        if obj is None:
            return None
        if isinstance(value := obj.get(key), kind):
            return value
        errors.append(f'"{where}.{key}" must be {kinds[kind]}')
        return None

    def mappings(items: list | None, where: str) -> list[tuple[str, dict]]:
        out = [(f"{where}[{i}]", item) for i, item in enumerate(items or [])]
        errors.extend(f'"{w}" must be a mapping' for w, item in out if not isinstance(item, dict))
        return [(w, item) for w, item in out if isinstance(item, dict)]

    for i, entry in enumerate(index):
        where = f"model-index[{i}]"
        need(entry, "name", where)
        for rw, result in mappings(need(entry, "results", where, list), f"{where}.results"):
            need(need(result, "task", rw, dict), "type", f"{rw}.task")
            dataset = need(result, "dataset", rw, dict)
            need(dataset, "type", f"{rw}.dataset")
            need(dataset, "name", f"{rw}.dataset")
            for mw, metric in mappings(need(result, "metrics", rw, list), f"{rw}.metrics"):
                need(metric, "type", mw)
                if "value" not in metric:
                    errors.append(f'"{mw}.value" is required')
    return errors


def card_metadata(content: str) -> Any:
    """The YAML front matter of a repo card (None when absent); raises ``yaml.YAMLError`` when malformed."""
    import yaml

    match = _YAML_BLOCK.match(content)
    return yaml.safe_load(match.group(2)) if match else None


def validate_card(content: str) -> tuple[list[str], list[str]]:
    """Check a README's YAML metadata the way the Hub does for the keys hubmerge writes: ``(errors, warnings)``."""
    import yaml

    try:
        data = card_metadata(content)
    except yaml.YAMLError as err:
        return [f"Invalid YAML in the card metadata: {str(err).splitlines()[0]}"], []
    if data is None or data == {}:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["The card metadata must be a YAML mapping (key: value pairs)"], []
    errors = [
        f'"{key}" must be {expected}'
        for key, expected in _CARD_KEYS.items()
        if key in data and not _is_type(data[key], expected)
    ]
    if "model-index" in data:
        errors += _model_index_errors(data["model-index"])
    return errors, []


# ---------------------------------------------------------------------------------------- test hooks


class RequestRecord(NamedTuple):
    """One request as the server saw it, so tests can assert on traffic (cache hits, resumed ranges)."""

    method: str
    path: str  # raw, still percent-encoded, with the query string
    range: str | None


class _Faults:
    """In-memory fault injection, keyed by ``(type, repo_id, path)``; never persisted, never on by default."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.drops: dict[tuple[str, str, str], list[int]] = {}
        self.corrupt: dict[tuple[str, str, str], int | None] = {}

    def add_drop(self, key: tuple[str, str, str], after_bytes: int, times: int) -> None:
        if after_bytes < 0 or times < 1:
            raise ValueError("after_bytes must be >= 0 and times >= 1")
        with self.lock:
            self.drops[key] = [after_bytes, times]

    def add_corrupt(self, key: tuple[str, str, str], offset: int | None) -> None:
        with self.lock:
            self.corrupt[key] = offset

    def clear(self) -> None:
        with self.lock:
            self.drops.clear()
            self.corrupt.clear()

    def take_drop(self, key: tuple[str, str, str]) -> int | None:
        with self.lock:
            if key not in self.drops:
                return None
            after, times = self.drops[key]
            if times <= 1:
                del self.drops[key]
            else:
                self.drops[key][1] -= 1
            return after

    def corrupt_offset(self, key: tuple[str, str, str], size: int) -> int | None:
        with self.lock:
            if key not in self.corrupt or size == 0:
                return None
            offset = self.corrupt[key]
            return min(size // 2 if offset is None else offset, size - 1)


# ------------------------------------------------------------------------------------------ routing

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


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request. Routes are matched on the raw path so ``refs%2Fpr%2F1`` stays one segment."""

    protocol_version = "HTTP/1.1"
    server_version = "hubmerge-hub/0.1"
    timeout = 60
    server: _HTTPServer

    # -- plumbing
    def setup(self) -> None:
        super().setup()
        self.server.conns.add(self.connection)

    def finish(self) -> None:
        self.server.conns.discard(self.connection)
        super().finish()

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
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                out += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def end_headers(self) -> None:
        self.headers_sent = True
        super().end_headers()

    def _dispatch(self, method: str) -> None:
        self.method, self.headers_sent = method, False
        self.server.hub.requests.append(RequestRecord(method, self.path, self.headers.get("Range")))
        try:
            self.body = self._read_body()  # always drain, so a keep-alive connection stays in step
            raw_path, _, query = self.path.partition("?")
            self.query = parse_qs(query, keep_blank_values=True)
            try:
                segments = [unquote(s, errors="strict") for s in raw_path.split("/")[1:]]
            except UnicodeDecodeError:
                raise _bad("The request path is not valid UTF-8.") from None
            route_method = "GET" if method == "HEAD" else method
            for m, pattern, name in ROUTES:
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
            raise _bad("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise _bad("The request body must be a JSON object.")
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
            raise _bad(f"Unknown repo type {data.get('type')!r}: use model, dataset or space.")
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
                raise _bad('"gated" must be false, "auto" or "manual".')
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
        blobs = _truthy(self._param("blobs"))
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
        if _truthy(self._param("include_prs")):
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
        if _truthy(self._param("recursive")):
            names = {"/".join(p.split("/")[:i]) for p in under for i in range(1, p.count("/") + 2)}
        else:
            names = {p.split("/")[0] for p in under}
        paths = sorted((prefix + n for n in names), key=lambda p: (p not in tree, p))
        self._json(self._listing(t, repo_id, sha, tree, paths, _truthy(self._param("expand"))))

    def h_paths_info(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        sha = self.store.resolve(t, repo_id, rev)
        tree = self.store.commit(t, repo_id, sha)["tree"]
        form = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        paths = [check_path(p.strip("/")) for p in form.get("paths", [])]
        expand = _truthy(form.get("expand", ["false"])[-1])
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
        start, end, status = 0, size - 1, 200
        if (spec := self.headers.get("Range")) and self.method == "GET":
            m = _RANGE.match(spec.strip())
            if m and m[1]:
                start, end = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
            elif m and m[2]:
                start = max(size - int(m[2]), 0)
            if not m or start > end or start >= size:
                raise HubHTTPError(416, f"Range not satisfiable: {spec}", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.method == "GET":
            self._stream(self.store.blob_path(entry["sha256"]), start, end - start + 1, (t, repo_id, path), size)

    def _stream(self, blob: Path, start: int, length: int, key: tuple[str, str, str], size: int) -> None:
        faults = self.server.hub.faults
        drop_after = faults.take_drop(key)
        flip = faults.corrupt_offset(key, size)
        sent = 0
        with blob.open("rb") as f:
            f.seek(start)
            while sent < length:
                n = min(CHUNK, length - sent)
                if drop_after is not None:
                    n = min(n, drop_after - sent)
                    if n <= 0:
                        break
                chunk = bytearray(f.read(n))
                if flip is not None and start + sent <= flip < start + sent + len(chunk):
                    chunk[flip - start - sent] ^= 0xFF
                self.wfile.write(chunk)
                sent += len(chunk)
        if sent < length:  # injected drop: the client sees a body shorter than Content-Length
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- writing
    def h_preupload(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        files = self._body_json().get("files")
        if not isinstance(files, list):
            raise _bad('"files" must be a list of {path, sample, size}.')
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
                raise _bad(f"Line {n} of the commit payload is not a valid operation.") from None
            if key != "header":
                check_path(path.rstrip("/") if key == "deletedFolder" else path)
            if key == "header":
                header = value
            elif key == "file":
                try:
                    data = base64.b64decode(str(value.get("content", "")), validate=True)
                except ValueError:
                    raise _bad(f"The content of {path} is not valid base64.") from None
                if path == "README.md" and (errors := validate_card(data.decode("utf-8", "replace"))[0]):
                    raise _bad("Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
                ops.append(("file", path, self.store.put_blob(data)))
            elif key == "lfsFile":
                entry = self.store.existing_blob(str(value.get("oid", "")))
                if entry is None:
                    raise _bad(
                        f"LFS object {value.get('oid')} for {path} is unknown: this server takes regular uploads."
                    )
                ops.append(("file", path, entry))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, path, None))
            else:
                raise _bad(f"Unknown commit operation {key!r} on line {n}.")
        if not isinstance(header, dict) or not header.get("summary"):
            raise _bad("The commit payload needs a header line with a non-empty summary.")
        return header, ops

    def h_commit(self, t: str, ns: str, name: str, rev: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name, write=True)
        header, ops = self._parse_ndjson()
        create_pr = _truthy(self._param("create_pr"))
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
            raise _bad("The default branch cannot be deleted.")
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
        path = self.store.repo_dir(t, repo_id) / "discussions.json"
        with self.store.lock:
            discussions = self.store._read_json(path) if path.exists() else {}
            pulls = self.store.refs(t, repo_id)["pulls"]
            num = str(max((int(n) for n in [*discussions, *pulls]), default=0) + 1)
            is_pr = bool(data.get("pullRequest"))
            discussions[num] = {
                "title": str(data.get("title") or ""),
                "description": str(data.get("description") or ""),
                "isPullRequest": is_pr,
                "createdAt": _now(),
                "status": "open",
            }
            if is_pr:
                self.store._set_ref(t, repo_id, "pulls", num, self.store.resolve(t, repo_id, DEFAULT_BRANCH))
            self.store._write_json(path, discussions)
        self._json({"num": int(num), "url": f"{self._repo_url(t, repo_id)}/discussions/{num}"})

    def h_discussion(self, t: str, ns: str, name: str, num: str) -> None:
        t, repo_id, _ = self._repo(t, ns, name)
        path = self.store.repo_dir(t, repo_id) / "discussions.json"
        found = (self.store._read_json(path) if path.exists() else {}).get(num)
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


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: HubServer, address: tuple[str, int]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.hub, self.conns = hub, set[socket.socket]()  # conns: open connections, cut on stop()
        super().__init__(address, _Handler)


# ---------------------------------------------------------------------------------------- the server


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
        self.faults = _Faults()
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)  # newest last; see RequestRecord
        self._httpd: _HTTPServer | None = None
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
            self._httpd = _HTTPServer(self, (self.host, self.requested_port))
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
