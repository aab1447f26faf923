"""Repositories on disk for the dev Hub: content-addressed blobs, commits with parents, refs, discussions.

Storage under ``root`` survives restarts: content-addressed blobs (``blobs/ab/<sha256>``), and per repo a
settings file (``repo.json``: ``private``, ``gated``), refs (``refs.json``), discussions, and one JSON document
per commit (``commits/<sha>.json``, holding the parents and the full file table). Every write goes to a
temporary file and is renamed into place under a lock, so a reader never sees half a file. Also the rules for
names (repo ids, paths, refs) and what the real Hub would store in LFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

USER = "hubmerge-user"
DEFAULT_BRANCH = "main"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"models": "", "datasets": "datasets/", "spaces": "spaces/"}
FILE_PREFIXES = ("datasets", "spaces")  # /{prefix}/{repo}/resolve/...; models have no prefix
LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HEX = re.compile(r"^[0-9a-f]{7,40}$")
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


def bad_request(message: str) -> HubHTTPError:
    return HubHTTPError(400, message)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def check_path(path: str) -> str:
    """Reject paths that could escape a repo or mean different things to different tools."""
    if not path or len(path) > 1024 or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise bad_request(f"Invalid path {path!r}: use a non-empty relative path with '/' separators.")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise bad_request(f"Invalid path {path!r}: backslashes and control characters are not allowed.")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise bad_request(f"Invalid path {path!r}: empty, '.' and '..' segments are not allowed.")
    return path


def check_repo_id(namespace: str, name: str) -> str:
    for part in (namespace, name):
        if not _NAME.match(part) or ".." in part or "--" in part:
            raise bad_request(
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
        raise bad_request(f"Invalid reference name {name!r}.")
    return name


def looks_lfs(path: str, size: int) -> bool:
    """Would the real Hub store this file in LFS? Weights always, anything else from 10 MiB."""
    return size >= LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


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

    def write_json(self, path: Path, obj: Any) -> None:
        self._write(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    @staticmethod
    def read_json(path: Path) -> Any:
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

    def blob_size(self, sha256: str) -> int | None:
        """A stored blob's size, or None when there is none (a stat, never a read)."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        try:
            return self.blob_path(sha256).stat().st_size
        except OSError:
            return None

    def existing_blob(self, sha256: str) -> dict[str, Any] | None:
        path = self.blob_path(sha256) if re.fullmatch(r"[0-9a-f]{64}", sha256) else None
        return self.put_blob(path.read_bytes()) if path is not None and path.exists() else None

    # -- repos
    def exists(self, t: str, repo_id: str) -> bool:
        return (self.repo_dir(t, repo_id) / "repo.json").exists()

    def meta(self, t: str, repo_id: str) -> dict[str, Any]:
        return self.read_json(self.repo_dir(t, repo_id) / "repo.json")

    def set_meta(self, t: str, repo_id: str, **changes: Any) -> None:
        with self.lock:
            meta = self.meta(t, repo_id)
            meta.update(changes)
            self.write_json(self.repo_dir(t, repo_id) / "repo.json", meta)

    def create_repo(self, t: str, repo_id: str, private: bool, **extra: Any) -> bool:
        with self.lock:
            if self.exists(t, repo_id):
                return False
            tree = {".gitattributes": self.put_blob(_GITATTRIBUTES.encode())}
            sha = self._new_commit(t, repo_id, [], tree, "initial commit", "", author="system")
            self.write_json(self.repo_dir(t, repo_id) / "refs.json", {"branches": {DEFAULT_BRANCH: sha}})
            meta = {"private": private, "gated": False, "createdAt": now(), **extra}
            self.write_json(self.repo_dir(t, repo_id) / "repo.json", meta)  # written last: marks it complete
            return True

    def delete_repo(self, t: str, repo_id: str) -> None:
        with self.lock:
            src = self.repo_dir(t, repo_id)
            trash = self.root / "repos" / f".deleted-{uuid.uuid4().hex}"
            os.replace(src, trash)  # atomic for readers; blobs stay shared
            shutil.rmtree(trash, ignore_errors=True)

    # -- refs and commits
    def refs(self, t: str, repo_id: str) -> dict[str, dict[str, str]]:
        refs = self.read_json(self.repo_dir(t, repo_id) / "refs.json")
        return {"branches": refs.get("branches", {}), "tags": refs.get("tags", {}), "pulls": refs.get("pulls", {})}

    def set_ref(self, t: str, repo_id: str, kind: str, name: str, sha: str | None) -> None:
        refs = self.refs(t, repo_id)
        if sha is None:
            refs[kind].pop(name, None)
        else:
            refs[kind][name] = sha
        self.write_json(self.repo_dir(t, repo_id) / "refs.json", refs)

    def commit(self, t: str, repo_id: str, sha: str) -> dict[str, Any]:
        return self.read_json(self.repo_dir(t, repo_id) / "commits" / f"{sha}.json")

    def writable_ref(self, t: str, repo_id: str, rev: str) -> tuple[str, str]:
        """Map a revision a commit may target to ``(kind, name)``: a branch or an open pull request."""
        refs = self.refs(t, repo_id)
        name = rev.removeprefix("refs/heads/")
        if name in refs["branches"]:
            return "branches", name
        if (m := re.fullmatch(r"refs/pr/(\d+)", rev)) and m[1] in refs["pulls"]:
            return "pulls", m[1]
        self.resolve(t, repo_id, rev)  # an unknown revision answers RevisionNotFound
        raise bad_request(f"Invalid rev id: {rev!r} is not a branch; commits can only target a branch or refs/pr/N.")

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
        body = {"parents": parents, "tree": tree, "title": title, "message": message, "date": now()}
        body["authors"] = [author]
        sha = hashlib.sha1(json.dumps({**body, "nonce": uuid.uuid4().hex}, sort_keys=True).encode()).hexdigest()
        self.write_json(self.repo_dir(t, repo_id) / "commits" / f"{sha}.json", {"id": sha, **body})
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
                        raise bad_request(f"Cannot add {path!r}: it conflicts with an existing file or folder.")
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
            self.set_ref(t, repo_id, kind, ref, sha)
            return sha, ref if create_pr else None

    def create_ref(self, t: str, repo_id: str, kind: str, name: str, sha: str) -> None:
        with self.lock:
            if name in self.refs(t, repo_id)[kind]:
                raise HubHTTPError(409, f"Reference already exists: {name}")
            self.set_ref(t, repo_id, kind, name, sha)

    def delete_ref(self, t: str, repo_id: str, kind: str, name: str) -> None:
        with self.lock:
            if name not in self.refs(t, repo_id)[kind]:
                raise HubHTTPError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            self.set_ref(t, repo_id, kind, name, None)

    # -- discussions and pull requests (the client's pipelined upload opens one, then commits to refs/pr/N)
    def create_discussion(self, t: str, repo_id: str, title: str, description: str, is_pr: bool) -> str:
        """Open a discussion (a pull request from ``main`` when ``is_pr``); return its number."""
        path = self.repo_dir(t, repo_id) / "discussions.json"
        with self.lock:
            discussions = self.read_json(path) if path.exists() else {}
            pulls = self.refs(t, repo_id)["pulls"]
            num = str(max((int(n) for n in [*discussions, *pulls]), default=0) + 1)
            discussions[num] = {
                "title": title,
                "description": description,
                "isPullRequest": is_pr,
                "createdAt": now(),
                "status": "open",
            }
            if is_pr:
                self.set_ref(t, repo_id, "pulls", num, self.resolve(t, repo_id, DEFAULT_BRANCH))
            self.write_json(path, discussions)
        return num

    def discussion(self, t: str, repo_id: str, num: str) -> dict[str, Any] | None:
        path = self.repo_dir(t, repo_id) / "discussions.json"
        return (self.read_json(path) if path.exists() else {}).get(num)
