"""``fetch: stream``: merge sources read straight from the Hub by HTTP range requests, never staged on disk.

A streamed merge plans from remote headers only (each safetensors file's 8-byte length and JSON header, two
range reads), then reads every source file front to back, in parallel ranges, as the merge consumes it:

- Every request goes through the ``huggingface_hub`` client's own HTTP session (its proxies and hooks), headers
  (user agent, token) and timeouts (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``), to the resolve URL
  pinned to the revision's commit. The Hub answers an LFS file with a redirect to its storage host; the storage
  URL is resolved once per file and then asked for ranges directly, and the token is sent there only when it
  is the Hub's own origin, the rule the client applies to its downloads.
- One range per request (a multi-range request comes back without ``Content-Range``). A range must come back
  as 206 with exactly the ``Content-Range`` asked for; 200 (a server that ignores ``Range``) or any other range
  is refused with a line that points to ``fetch: cache``. A dropped connection resumes from the last byte
  received, with exponential backoff and a bounded number of tries.
- Every byte of each file, header and padding included, passes through a sha256 that must equal the LFS oid of
  the tree listing. The merge commits its output only after every file verified (see the executor's
  ``SourceReader.finish``); a mismatch names the file and revision, and the partial output is removed.
- Memory is bounded by ``max_in_flight`` bytes of fetched-but-unconsumed parts, whatever the number of sources
  or the model's size. Weights are written nowhere; config and tokenizer files come through the HF cache.

Tensors are consumed in the byte order of the newest source's files (the executor writes the output by
position, so its layout is the cached merge's); every other source must store its tensors in that same order,
as every checkpoint saved by one training run does. A source that does not is refused at plan time.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubmerge.errors import HubError, SourceError, StreamError
from hubmerge.hub.client import HubClient, RevisionFiles
from hubmerge.hub.pull import plan_pull
from hubmerge.hub.ranges import CACHE_HINT, RangeClient, StreamFile
from hubmerge.hub.revisions import Revision
from hubmerge.io.checkpoint import (
    ITEMSIZE,
    Checkpoint,
    SourceRef,
    TensorInfo,
    header_length,
    parse_safetensors_header,
    read_weight_map,
    tensors_from_headers,
)

# Bytes of one range request, and the bound on fetched-but-unconsumed bytes; see the module docstring.
PART_BYTES = 4 * 2**20
MAX_IN_FLIGHT = 24 * 2**20
CONNECTIONS = 4
# The first header read: most safetensors headers fit (huggingface_hub reads 100 kB the same way).
HEADER_PROBE = 100_000
# What opening a trajectory to stream gives: its sources, their checkpoints (from remote headers), the files.
OpenedStream = tuple[list[SourceRef], list[Checkpoint], "StreamSources"]


# -- planning: checkpoints from remote headers


@dataclass
class StreamSources:
    """The remote weight files of a trajectory's sources (by trajectory position), ready to stream."""

    client: RangeClient
    files: dict[int, dict[str, StreamFile]]
    connections: int = CONNECTIONS
    max_in_flight: int = MAX_IN_FLIGHT
    sidecars: dict[int, list[str]] = field(default_factory=dict)  # config, tokenizer, index: what the cache holds

    @property
    def total_bytes(self) -> int:
        return sum(f.size for files in self.files.values() for f in files.values())

    @property
    def file_count(self) -> int:
        return sum(len(files) for files in self.files.values())

    def open_reader(self, checkpoints: Sequence[Checkpoint], jobs: Sequence[tuple[int, TensorInfo, int, int]]) -> Any:
        return StreamReader(self, jobs)

    def snapshot(self, source: int) -> Path:
        """Source ``source``'s snapshot folder in this machine's HF cache, holding its config and tokenizer.

        The driver fetched them when it opened the stream; a Ray worker on another machine (or with another
        ``HF_HOME``) has none, and downloads them here, through the same client, pinned to the same commit."""
        any_file = next(iter(self.files[source].values()))
        folder = snapshot_folder(any_file.repo, any_file.commit)
        for name in self.sidecars.get(source, []):
            if not (folder / name).is_file():
                self.client.client.download(any_file.repo, name, any_file.commit, label=any_file.revision)
        return folder


def read_remote_header(ranges: RangeClient, f: StreamFile) -> bytes:
    """A safetensors file's first ``8 + n`` bytes by one or two range reads (the header's length first)."""
    probe = min(HEADER_PROBE, f.size)
    head = bytearray(probe)
    ranges.read(f, 0, memoryview(head))
    n = header_length(bytes(head[:8]), f.size, f.where)
    if 8 + n > probe:
        rest = bytearray(8 + n - probe)
        ranges.read(f, probe, memoryview(rest))
        head += rest
    return bytes(head[: 8 + n])


def plan_stream(
    repo: str,
    listings: Sequence[RevisionFiles],
    client: HubClient,
    *,
    snapshots: Sequence[Path],
    connections: int = CONNECTIONS,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> OpenedStream:
    """Sources, their checkpoints (tensor tables from remote headers) and the files to stream; no weight read.

    ``snapshots`` are the cache folders the revisions' small files live in (the newest holds config and
    tokenizer, fetched by the caller); a checkpoint's ``path`` is its snapshot.
    """
    ranges = RangeClient(client)
    for rf in listings:
        if rf.weight_format != "safetensors":
            name = rf.weights[0] if rf.weights else rf.index_file
            raise SourceError(
                f"{repo}@{rf.revision}: {name} is a PyTorch .bin checkpoint; fetch: stream reads safetensors "
                f"only; {CACHE_HINT}",
                repo=repo,
                revision=rf.revision,
                path=name,
            )
        missing_sha = [w for w in rf.weights if not rf.files[w].sha256]
        if missing_sha:
            raise SourceError(
                f"{repo}@{rf.revision}: the Hub lists no LFS sha256 for {missing_sha[0]}, so a stream of it could "
                f"not be verified; {CACHE_HINT}",
                repo=repo,
                revision=rf.revision,
                path=missing_sha[0],
            )
    pending = [
        (i, StreamFile(repo, rf.revision, str(rf.commit), w, rf.files[w].size, str(rf.files[w].sha256), b""))
        for i, rf in enumerate(listings)
        for w in rf.weights
    ]
    with ThreadPoolExecutor(max_workers=max(1, connections)) as ex:
        headers = list(ex.map(lambda item: read_remote_header(ranges, item[1]), pending))
    files: dict[int, dict[str, StreamFile]] = {i: {} for i in range(len(listings))}
    for (i, f), raw in zip(pending, headers, strict=True):
        files[i][f.name] = StreamFile(f.repo, f.revision, f.commit, f.name, f.size, f.sha256, raw)
    sources, checkpoints = [], []
    for i, (rf, folder) in enumerate(zip(listings, snapshots, strict=True)):
        parsed = {name: parse_safetensors_header(f.header, f.size, f.where) for name, f in files[i].items()}
        weight_map = read_weight_map(folder / rf.index_file) if rf.index_file else None
        where = f"{repo}@{rf.revision}"
        tensors = tensors_from_headers(where, parsed, weight_map)
        checkpoints.append(Checkpoint(folder, "safetensors", list(rf.weights), tensors))
        sha = {w: str(rf.files[w].sha256) for w in rf.weights}
        sources.append(SourceRef(folder, rf.revision, repo=repo, revision=rf.revision, commit=rf.commit, sha256=sha))
    sidecars = {i: list(rf.sidecars) for i, rf in enumerate(listings)}
    return sources, checkpoints, StreamSources(ranges, files, connections, max_in_flight, sidecars)


def snapshot_folder(repo: str, commit: str) -> Path:
    """Where the HF cache keeps a revision's files (``snapshots/<commit>``), whether or not any is there yet."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / commit


def open_stream(
    repo: str,
    revisions: Sequence[Revision],
    client: HubClient,
    *,
    connections: int = CONNECTIONS,
    max_in_flight: int = MAX_IN_FLIGHT,
    all_sidecars: bool = False,
) -> OpenedStream:
    """List the revisions' files, fetch the newest's config and tokenizer (``all_sidecars``: every revision's)
    into the cache, and read the remote headers. No weight byte is read."""
    plan = plan_pull(repo, revisions, client, workers=connections)
    small = [(rf, name) for rf in (plan.files if all_sidecars else plan.files[-1:]) for name in rf.sidecars]
    with ThreadPoolExecutor(max_workers=max(1, connections)) as ex:
        list(
            ex.map(lambda it: client.download(repo, it[1], it[0].commit or it[0].revision, label=it[0].revision), small)
        )
    folders = [snapshot_folder(repo, rf.commit or rf.revision) for rf in plan.files]
    return plan_stream(
        repo, plan.files, client, snapshots=folders, connections=connections, max_in_flight=max_in_flight
    )


def check_stream_order(order: Sequence[Any], sources: Sequence[SourceRef], checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse a source whose files do not store the tensors in ``order``: it cannot be streamed front to back."""
    for src, ck in zip(sources, checkpoints, strict=True):
        ends: dict[str, tuple[int, str]] = {}
        for t in order:
            info = ck.tensors[t.name]
            end, previous = ends.get(info.file, (0, ""))
            if info.offset < end:
                raise SourceError(
                    f"{src.describe()}: {info.file} stores tensor {t.name!r} before {previous!r}, in another order "
                    f"than the newest revision; a stream reads each file front to back; {CACHE_HINT}",
                    repo=src.repo,
                    revision=src.revision,
                    path=info.file,
                    tensor=t.name,
                )
            ends[info.file] = (info.offset + info.nbytes, t.name)


# -- executing: the reader the executor pulls from


@dataclass
class _Part:
    file: StreamFile
    key: tuple[int, str]  # (source, file name)
    start: int
    length: int
    job: int | None  # the read job whose bytes these are; None: bytes only hashed (padding, tail)


@dataclass
class _FileHash:
    """A file's running sha256: its parts (indexes, in byte order), how many are hashed, who is hashing."""

    file: StreamFile
    sha: Any
    parts: list[int] = field(default_factory=list)
    hashed: int = 0
    busy: bool = False

    @property
    def done(self) -> bool:
        return self.hashed == len(self.parts)


class StreamReader:
    """The executor's reader for streamed sources: parallel range reads ahead of the merge, hashed in order.

    Every source file is cut into parts of at most ``PART_BYTES``, in the order the merge consumes them (padding
    and each file's tail become hash-only parts). ``connections`` threads fetch parts in that order into a fixed
    pool of ``max_in_flight / PART_BYTES`` buffers. The thread that completes a file's next part feeds it (and any
    later parts already there) to the file's sha256, so hashing runs beside the merge, on several files at once;
    :meth:`read_into` only copies a job's parts out. A buffer returns to the pool once its part is both hashed and
    consumed, so memory is the pool whatever the model or the number of sources.
    """

    def __init__(self, sources: StreamSources, jobs: Sequence[tuple[int, TensorInfo, int, int]]) -> None:
        self.sources, self.jobs = sources, list(jobs)
        self.parts, self.job_parts = _cut(sources.files, self.jobs)
        self.hashes: dict[tuple[int, str], _FileHash] = {}
        for i, part in enumerate(self.parts):
            if part.key not in self.hashes:
                self.hashes[part.key] = _FileHash(part.file, hashlib.sha256(part.file.header))
            self.hashes[part.key].parts.append(i)
        for s, info, _, _ in self.jobs:  # a file whose only bytes are its header (empty tensors) has no parts
            key = (s, info.file)
            if key not in self.hashes:
                f = sources.files[s][info.file]
                self.hashes[key] = _FileHash(f, hashlib.sha256(f.header))
        self._next_job = 0
        self._next_fetch = 0
        self._results: dict[int, Any] = {}  # part -> its buffer, or the exception its fetch ended with
        self._hashed: set[int] = set()
        self._consumed = {i for i, part in enumerate(self.parts) if part.job is None}
        self._free: list[bytearray] = []
        self._buffers = 0
        self._pool = max(2, sources.max_in_flight // max(1, PART_BYTES))
        self._error: BaseException | None = None
        self._aborted = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        for key, file_hash in self.hashes.items():
            if not file_hash.parts:
                self._finish_file(key)
        self._workers = [
            threading.Thread(target=self._work, name=f"hubmerge-stream-{i}", daemon=True)
            for i in range(max(1, min(sources.connections, len(self.parts))))
        ]
        for w in self._workers:
            w.start()

    # -- the fetching threads
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._aborted and self._next_fetch < len(self.parts):
                    if self._free or self._buffers < self._pool:
                        break
                    self._cond.wait()
                if self._aborted or self._next_fetch >= len(self.parts):
                    return
                i = self._next_fetch
                self._next_fetch += 1
                if self._free:
                    buf = self._free.pop()
                else:
                    buf = bytearray(PART_BYTES)
                    self._buffers += 1
            part = self.parts[i]
            result: Any = buf
            try:
                self.sources.client.read(part.file, part.start, memoryview(buf)[: part.length], self._stop)
            except BaseException as e:  # handed to the consumer, which raises it
                result = e
            with self._cond:
                self._results[i] = result
                if isinstance(result, BaseException):
                    self._free.append(buf)
                    self._error = self._error or result
                self._cond.notify_all()
            if not isinstance(result, BaseException):
                self._hash_ready(part.key)

    def _hash_ready(self, key: tuple[int, str]) -> None:
        """Feed the file's sha256 every part that is next in byte order and fetched; one thread per file at once."""
        fh = self.hashes[key]
        with self._cond:
            if fh.busy:
                return
            fh.busy = True
        while True:
            with self._cond:
                i = fh.parts[fh.hashed] if not fh.done else None
                if i is None or self._aborted or not isinstance(self._results.get(i), bytearray):
                    fh.busy = False
                    return
                buf = self._results[i]
            fh.sha.update(memoryview(buf)[: self.parts[i].length])
            with self._cond:
                fh.hashed += 1
                self._hashed.add(i)
                self._recycle(i)
                if fh.done:
                    self._finish_file(key)
                self._cond.notify_all()

    def _finish_file(self, key: tuple[int, str]) -> None:
        fh = self.hashes[key]
        digest = fh.sha.hexdigest()
        f = fh.file
        if digest != f.sha256 and self._error is None:
            self._error = HubError(
                f"{f.where} does not match the sha256 the Hub lists for it ({digest[:12]}... streamed, "
                f"{f.sha256[:12]}... listed): the server or a proxy served corrupted data; nothing was written "
                "(run again, or use `fetch: cache`, which downloads it again)",
                repo=f.repo,
                revision=f.revision,
                path=f.name,
            )

    def _recycle(self, i: int) -> None:
        """Return part ``i``'s buffer to the pool once it is hashed and consumed (the lock is held)."""
        if i in self._hashed and i in self._consumed:
            buf = self._results.pop(i, None)
            if isinstance(buf, bytearray):
                self._free.append(buf)

    # -- the executor's side
    def read_into(self, source: int, info: TensorInfo, start: int, count: int, out: Any) -> None:
        j = self._next_job
        expected = self.jobs[j] if j < len(self.jobs) else None
        if expected is None or (expected[0], expected[1].name, expected[2], expected[3]) != (
            source,
            info.name,
            start,
            count,
        ):
            raise RuntimeError(f"stream read out of plan order: job {j} is {expected}, asked {info.name}@{start}")
        self._next_job += 1
        import torch

        first, last = self.job_parts[j]
        job_start = info.offset + start * ITEMSIZE[info.dtype]
        for i in range(first, last + 1):
            part = self.parts[i]
            with self._cond:
                while not isinstance(self._results.get(i), bytearray):
                    self._raise_if_failed()
                    self._cond.wait(timeout=1.0)
                buf = self._results[i]
            at = part.start - job_start
            # torch's copy runs without the GIL, so the fetching threads keep reading meanwhile
            out[at : at + part.length].copy_(torch.frombuffer(buf, dtype=torch.uint8, count=part.length))
            with self._cond:
                self._consumed.add(i)
                self._recycle(i)
                self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise StreamError("streaming was aborted")

    def finish(self) -> None:
        """Wait until every file is read and hashed (padding and tails too); raise if one did not verify."""
        with self._cond:
            while not all(fh.done for fh in self.hashes.values()):
                self._raise_if_failed()
                self._cond.wait(timeout=1.0)
            if self._error is not None:
                raise self._error

    def abort(self) -> None:
        self._stop.set()
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def close(self) -> None:
        self.abort()


def _cut(
    files: dict[int, dict[str, StreamFile]], jobs: Sequence[tuple[int, TensorInfo, int, int]]
) -> tuple[list[_Part], list[tuple[int, int]]]:
    """The parts to fetch, in consumption order, and each job's (first, last) part index."""
    last_job: dict[tuple[int, str], int] = {}
    for j, (s, info, _, _) in enumerate(jobs):
        last_job[(s, info.file)] = j
    cursor: dict[tuple[int, str], int] = {}
    parts: list[_Part] = []
    job_parts = []

    def emit(key: tuple[int, str], f: StreamFile, a: int, b: int, job: int | None) -> None:
        while a < b:
            n = min(PART_BYTES, b - a)
            parts.append(_Part(f, key, a, n, job))
            a += n

    for j, (s, info, start, count) in enumerate(jobs):
        key = (s, info.file)
        f = files[s][info.file]
        pos = cursor.get(key, len(f.header))
        a = info.offset + start * ITEMSIZE[info.dtype]
        b = a + count * ITEMSIZE[info.dtype]
        if a < pos:
            raise RuntimeError(f"{f.where}: job {j} reads before byte {pos}; the order check should have refused it")
        emit(key, f, pos, a, None)
        first = len(parts)
        emit(key, f, a, b, j)
        job_parts.append((first, len(parts) - 1) if len(parts) > first else (first, first - 1))
        cursor[key] = b
        if last_job[key] == j:
            emit(key, f, b, f.size, None)  # the tail: hashed too
            cursor[key] = f.size
    return parts, job_parts
