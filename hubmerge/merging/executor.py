"""The one streaming executor: every output tensor from all sources, accumulated in float32, written as it goes.

A merge is a sweep of one window. :func:`run_pass` reads each needed source once, tensor by tensor and chunk by
chunk, and adds each chunk to the float32 accumulator of every window that contains that source; when a window's
newest source has been added, its chunk is cast and appended to that window's shard. ``hubmerge merge`` runs it
with one window over all sources (:func:`execute`), ``hubmerge sweep`` with every window of a pass
(:mod:`hubmerge.merging.sweep`), so the two are bit-identical by construction.

Three threads share the work so that reading overlaps arithmetic and writing:

- a reader fills a small pool of byte buffers, one (tensor chunk, source) at a time, in plan order;
- the calling thread converts each buffer to float32 in cache-sized blocks and accumulates it with the
  source's weight in each open window (``acc = w0 * x0``, then ``acc += wi * xi``), then casts finished chunks
  to the output dtype;
- a writer appends finished chunks to their shards and hashes them.

Large tensors are processed in chunks, so peak memory is a constant set of buffers: it grows neither with the
number of sources nor with the model's size. The arithmetic is elementwise in a fixed order (source 0, 1, ...),
so the result is bit-identical whatever the thread count, chunk or block size. One torch thread is the default:
the loop is memory-bound and on small machines a second compute thread only competes with the reader.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hubmerge.errors import HubmergeError, SourceError
from hubmerge.io.checkpoint import (
    ITEMSIZE,
    Checkpoint,
    CheckpointReader,
    SourceRef,
    TensorInfo,
    byte_order,
    torch_dtype,
)
from hubmerge.io.env import torch_threads
from hubmerge.io.files import sha256_file
from hubmerge.io.progress import QUIET, Display, Reporter
from hubmerge.io.provenance import write_provenance
from hubmerge.io.writer import (
    WRITER_FILE,
    OutputDir,
    PositionalShard,
    ShardWriter,
    WriteBehindShard,
    remove_dead_partials,
)
from hubmerge.merging.plan import BLOCK_ELEMS, READ_BUFFERS, WRITE_BUFFERS, MergePlan, TensorPlan, provenance

if TYPE_CHECKING:
    import torch

_STOP = object()
# What the reader reads: (source index, tensor, first element, element count).
Job = tuple[int, TensorInfo, int, int]
# A window's accumulator, the weight of the source being added, and whether it is the window's first source.
Target = tuple["torch.Tensor", float, bool]


@dataclass(frozen=True)
class Window:
    """Sources ``start .. start + size - 1`` of a trajectory, with their weights (oldest first)."""

    start: int
    size: int
    name: str
    weights: tuple[float, ...]

    @property
    def end(self) -> int:
        return self.start + self.size - 1

    def contains(self, t: int) -> bool:
        return self.start <= t <= self.end

    def weight_of(self, t: int) -> float:
        return self.weights[t - self.start]


def hashed_order(
    tensors: Sequence[TensorPlan], sources: Sequence[SourceRef], checkpoints: Sequence[Checkpoint]
) -> list[TensorPlan] | None:
    """For sources read from the HF cache (their sha256s known): the newest source's byte order, so that every
    file is read front to back and hashed in that same read; None (the output's layout order) otherwise."""
    if not any(s.sha256 for s in sources):
        return None
    return byte_order(tensors, checkpoints[-1])


def needed_sources(windows: Iterable[Window]) -> list[int]:
    """The sources a pass over ``windows`` reads, in order: the union of their spans."""
    return sorted({t for w in windows for t in range(w.start, w.end + 1)})


@dataclass(frozen=True)
class Pass:
    """One read of the sources that finishes a batch of windows, each into its own output folder.

    ``checkpoints``/``sources`` are the whole trajectory (window positions index them); ``plans`` give each
    window's output (folder, shards, dtype), all with the same tensors in the same order (``tensors``).
    ``write_buffers`` bounds the finished chunks queued for the writer; ``write_behind`` hands shards to the
    disk as they grow (a sweep writes many outputs at once).
    """

    checkpoints: Sequence[Checkpoint]
    sources: Sequence[SourceRef]
    windows: Sequence[Window]
    plans: dict[str, MergePlan]
    tensors: Sequence[TensorPlan]
    chunk_elems: int
    block_elems: int
    write_buffers: int = WRITE_BUFFERS
    write_behind: bool = False
    force: bool = False
    # The order tensors are read and computed in, when it is not ``tensors`` (the output's layout): a streamed
    # pass follows the sources' byte order, and its shards are then written by position.
    order: Sequence[TensorPlan] | None = None
    open_reader: ReaderFactory | None = None  # None: the sources are local folders
    nonfinite: str = "refuse"  # NaN/Inf in a source, or a float16 cast that overflows: refuse | warn

    @property
    def processing_order(self) -> Sequence[TensorPlan]:
        return self.order if self.order is not None else self.tensors

    @property
    def positional(self) -> bool:
        return self.order is not None and [t.name for t in self.order] != [t.name for t in self.tensors]

    @property
    def in_itemsize(self) -> int:
        return max(ITEMSIZE[t.dtype] for t in self.tensors_of_sources())

    def tensors_of_sources(self) -> Iterator[TensorInfo]:
        for t in needed_sources(self.windows):
            yield from self.checkpoints[t].tensors.values()

    @property
    def out_itemsize(self) -> int:
        return max(ITEMSIZE[t.out_dtype] for p in self.plans.values() for t in p.tensors)


@dataclass
class WindowFiles:
    """A window the pass committed: its folder and every file's sha256."""

    window: Window
    path: Path
    files: dict[str, str]
    nonfinite: dict[str, Any] = field(default_factory=dict)  # policy, and what was found (hubmerge.json's record)
    scores: Any = None  # on Ray: what the pass's task computed of the window (its scores), for the driver
    provenance: str | None = None  # on Ray: the hubmerge.json of a window its task already deleted


@dataclass
class MergeResult:
    """A finished merge: where it is, every file's sha256, how long it took, what it read and wrote."""

    output: Path
    files: dict[str, str]  # file name -> sha256
    seconds: float
    bytes_read: int
    bytes_written: int


class SourceReader(Protocol):
    """Serves a pass's read jobs, in the order given when it was opened, into caller buffers."""

    def read_into(self, source: int, info: TensorInfo, start: int, count: int, out: Any) -> None: ...

    def finish(self) -> None:
        """After the last job: check everything read (a streamed source's sha256); raise if it does not hold."""

    def abort(self) -> None:
        """Stop any wait in :meth:`read_into` (called from another thread when the pass fails)."""

    def close(self) -> None: ...


# Opens the reader of a pass: (the trajectory's checkpoints, every read job in order) -> reader.
ReaderFactory = Callable[[Sequence[Checkpoint], Sequence[Job]], SourceReader]


class LocalReaders:
    """The reader of local folders: one :class:`CheckpointReader` per source, reading in any order.

    A source with known sha256s (a Hub revision in the HF cache) is hashed as it is read, and :meth:`finish`
    refuses the pass if a file is not the one the Hub lists: nothing in the cache is trusted by size or mtime.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], sources: Sequence[SourceRef] | None = None) -> None:
        hashes = [s.sha256 for s in sources] if sources is not None else [None] * len(checkpoints)
        self.readers = [CheckpointReader(ck, h) for ck, h in zip(checkpoints, hashes, strict=True)]
        self.reread: list[str] = []  # files hashed in a second read (read out of byte order)

    def read_into(self, source: int, info: TensorInfo, start: int, count: int, out: Any) -> None:
        self.readers[source].read_into(info, start, count, out)

    def finish(self) -> None:
        for r in self.readers:
            self.reread += [f"{r.checkpoint.path.name}/{f}" for f in r.verify()]

    def abort(self) -> None:
        return None

    def close(self) -> None:
        for r in self.readers:
            r.close()


class _Reader(threading.Thread):
    """Reads ``(source index, tensor, first element, count)`` jobs into pooled buffers, in the order they are used.

    ``bytes_read`` counts what was actually read, so callers (and tests) can check that the work shared by
    a sweep really reads each source once. After the last job the source reader's ``finish`` runs (a streamed
    pass verifies every file's sha256 there); its failure is raised by :meth:`check`.
    """

    def __init__(self, source: SourceReader, jobs: Iterable[Job], buffers: list[Any]) -> None:
        super().__init__(name="hubmerge-reader", daemon=True)
        self.jobs = jobs
        self.free: queue.Queue[Any] = queue.Queue()
        for b in buffers:
            self.free.put(b)
        self.filled: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.source = source
        self.bytes_read = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for s, info, start, count in self.jobs:
                buf = self._get_free()
                if buf is None:
                    return
                self.source.read_into(s, info, start, count, buf)
                self.bytes_read += count * ITEMSIZE[info.dtype]
                self.filled.put(buf)
            self.source.finish()
        except BaseException as e:  # handed to the main thread, which raises it
            self.error = e
            self.filled.put(e)
        finally:
            self.source.close()

    def check(self) -> None:
        """Wait for the reader to end; raise what it failed with (a source that did not verify)."""
        self.join()
        if self.error is not None:
            raise self.error

    def _get_free(self) -> Any:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def next(self) -> Any:
        item = self.filled.get()
        if isinstance(item, BaseException):
            raise item
        return item


class _Writer(threading.Thread):
    """Writes finished chunks to shard files in order and returns buffers to the compute thread.

    Messages name their shard by path, so several shards (one per sweep window) can be open at once.
    """

    def __init__(
        self, buffers: list[Any], shard_writer: type[ShardWriter] | type[PositionalShard] = ShardWriter
    ) -> None:
        super().__init__(name="hubmerge-writer", daemon=True)
        self.free: queue.Queue[Any] = queue.Queue()
        for b in buffers:
            self.free.put(b)
        self.todo: queue.Queue[Any] = queue.Queue()
        self.shard_writer = shard_writer
        self.hashes: dict[Path, str] = {}
        self.error: BaseException | None = None
        self._shards: dict[Path, Any] = {}

    def run(self) -> None:
        while (msg := self.todo.get()) is not _STOP:
            if self.error is not None:
                if msg[0] in ("data", "data_at"):
                    self.free.put(msg[2])
                continue
            try:
                if msg[0] == "open":
                    self._shards[msg[1]] = self.shard_writer(*msg[1:])
                elif msg[0] == "data":
                    self._shards[msg[1]].write(msg[2][: msg[3]].numpy())
                    self.free.put(msg[2])
                elif msg[0] == "data_at":
                    self._shards[msg[1]].write_at(msg[4], msg[5], msg[2][: msg[3]].numpy())
                    self.free.put(msg[2])
                else:
                    self.hashes[msg[1]] = self._shards.pop(msg[1]).close()
            except BaseException as e:
                self.error = e
                if msg[0] in ("data", "data_at"):
                    self.free.put(msg[2])
                self._abort()
        self._abort()

    def _abort(self) -> None:
        for shard in self._shards.values():
            shard.abort()
        self._shards.clear()

    def take(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.free.get()


def accumulate_blocks(src: torch.Tensor, targets: list[Target], tmp: torch.Tensor, block: int) -> float:
    """For each ``(acc, weight, first)``: ``acc = w * src`` or ``acc += w * src``, in float32, block by block.

    The source is converted to float32 once per cache-sized block (into ``tmp``) and added to every
    target while the block is in cache: a merge has one target, a sweep one per open window. The
    operations, and so the rounding, are the same whatever the number of targets.

    Returns the chunk's sum, taken from the same cache-resident blocks (about a tenth of the loop's time, where
    ``isfinite`` would cost several times it): NaN or infinite exactly when the chunk holds a NaN or an Inf,
    or (never for real weights) when finite values sum past float32's range; the caller then counts.
    """
    import torch

    count = src.numel()
    is_f32 = src.dtype == torch.float32
    total = 0.0
    for b0 in range(0, count, block):
        b1 = min(count, b0 + block)
        # fp16/bf16 -> fp32 conversion runs vectorised into a cache-resident block
        x = src[b0:b1] if is_f32 else tmp[: b1 - b0].copy_(src[b0:b1])
        total += float(x.sum())
        for acc, weight, first in targets:
            a = acc[b0:b1]
            if first:
                a.copy_(x)
                a.mul_(weight)
            else:
                a.add_(x, alpha=weight)
    return total


def accumulate_on_device(src: torch.Tensor, targets: list[Target]) -> float:
    """The accelerator's form of :func:`accumulate_blocks`: the chunk is moved and converted once, then added to
    each target where it lives (``acc = w * x`` or ``acc += w * x``, the same float32 operations)."""
    import torch

    x = src.to(targets[0][0].device, non_blocking=False).to(torch.float32)
    for acc, weight, first in targets:
        if first:
            torch.mul(x, weight, out=acc)
        else:
            acc.add_(x, alpha=weight)
    return float(x.sum())


def accumulate(src: torch.Tensor, targets: list[Target], tmp: torch.Tensor, block: int) -> float:
    """Add one source chunk to every target: cache-blocked on the CPU, whole-chunk on an accelerator; the
    chunk's float32 sum (see :func:`accumulate_blocks`)."""
    if targets and targets[0][0].device.type != "cpu":
        return accumulate_on_device(src, targets)
    return accumulate_blocks(src, targets, tmp, block)


def count_nonfinite(x: torch.Tensor) -> int:
    """NaN and infinite values in ``x`` (the slow, exact count, run only when a cheap check flagged a chunk)."""
    import torch

    return int(x.numel() - torch.isfinite(x).sum())


# The largest finite float16 (an output dtype narrower than its sources'); values past it are cast to inf.
F16_MAX = 65504.0


class NonFinite:
    """Non-finite values a pass met, counted per (source, tensor) as sources are read, and per (window, tensor)
    where a cast to a narrower output dtype overflowed. ``refuse`` raises when a tensor is done; ``warn`` lets
    the pass finish and the counts go to each output's ``hubmerge.json`` and to the console."""

    def __init__(self, policy: str, sources: Sequence[SourceRef]) -> None:
        self.policy, self.sources = policy, sources
        self.in_sources: dict[tuple[int, str], int] = {}
        self.in_outputs: dict[tuple[str, str], int] = {}

    def source(self, t: int, tensor: str, n: int) -> None:
        self.in_sources[t, tensor] = self.in_sources.get((t, tensor), 0) + n

    def output(self, window: str, tensor: str, n: int) -> None:
        self.in_outputs[window, tensor] = self.in_outputs.get((window, tensor), 0) + n

    def tensor_done(self, tensor: str) -> None:
        if self.policy != "refuse":
            return
        for (t, name), n in self.in_sources.items():
            if name == tensor:
                raise SourceError(
                    f"{self.sources[t].describe()}: tensor {name!r} holds {n} non-finite value{'s' * (n != 1)} "
                    "(NaN or Inf), which averaging would spread into the output; drop this checkpoint, or set "
                    "`nonfinite: warn` in the recipe to write the merge anyway (nothing was written)",
                    path=self.sources[t].path,
                    tensor=name,
                )
        for (window, name), n in self.in_outputs.items():
            if name == tensor:
                raise SourceError(
                    f"{window}: tensor {name!r} has {n} averaged value{'s' * (n != 1)} past float16's range "
                    f"(|x| > {F16_MAX:g}), which the cast would write as inf; use `dtype: bfloat16` or "
                    "`dtype: float32` (or `nonfinite: warn`); nothing was written",
                    tensor=name,
                )

    def record(self, window: Window) -> dict[str, Any]:
        """What ``hubmerge.json`` says of one output: the policy and what was found in its sources and itself."""
        return {
            "policy": self.policy,
            "sources": [
                {"source": self.sources[t].label, "tensor": name, "count": n}
                for (t, name), n in sorted(self.in_sources.items())
                if window.contains(t)
            ],
            "output": [
                {"tensor": name, "count": n} for (w, name), n in sorted(self.in_outputs.items()) if w == window.name
            ],
        }


def nonfinite_lines(record: dict[str, Any]) -> list[str]:
    """The console's account of what ``nonfinite: warn`` let through into one output."""
    lines = [
        f"source {f['source']}: tensor {f['tensor']!r} holds {f['count']} non-finite values, averaged in anyway "
        "(nonfinite: warn)"
        for f in record.get("sources", [])
    ]
    lines += [
        f"tensor {f['tensor']!r}: {f['count']} values past float16's range were written as inf (nonfinite: warn)"
        for f in record.get("output", [])
    ]
    return lines


def read_jobs(
    tensors: Sequence[TensorPlan], checkpoints: Sequence[Checkpoint], sources: Iterable[int], chunk: int
) -> Iterator[tuple[int, TensorInfo, int, int]]:
    """What the reader reads, in the order the compute loop consumes it: tensor, chunk, then source."""
    sources = list(sources)
    for t in tensors:
        for start in range(0, max(t.numel, 1), chunk):
            count = min(chunk, t.numel - start)
            for s in sources:
                yield s, checkpoints[s].tensors[t.name], start, count


class _Shards:
    """Opens and closes each window's shards as the pass walks the tensors, and routes finished chunks to them.

    In layout order a shard is open while its tensors are computed and chunks are appended; out of layout order
    (a streamed pass) every shard is open for the whole pass and each chunk is written at its position.
    """

    def __init__(self, p: Pass, folders: dict[str, Path], writer: _Writer) -> None:
        self.writer = writer
        self.positional = p.positional
        self.current: dict[str, Path] = {}  # window -> its open shard (layout order)
        self.all_open: list[Path] = []  # every shard of the pass (out of layout order)
        self.starts: dict[str, dict[str, tuple[Path, list[Any]]]] = {}
        self.home: dict[str, dict[str, Path]] = {}  # window -> tensor -> its shard (out of layout order)
        for w in p.windows:
            self.starts[w.name] = {
                shard.tensors[0].name: (
                    folders[w.name] / shard.file,
                    [(t.name, t.out_dtype, t.shape, t.out_nbytes) for t in shard.tensors],
                )
                for shard in p.plans[w.name].shards
            }
            if self.positional:
                self.home[w.name] = {
                    t.name: folders[w.name] / shard.file for shard in p.plans[w.name].shards for t in shard.tensors
                }
        if self.positional:
            for starts in self.starts.values():
                for path, entries in starts.values():
                    self.writer.todo.put(("open", path, entries, {"format": "pt"}))
                    self.all_open.append(path)

    def begin_tensor(self, name: str) -> None:
        if self.positional:
            return
        for wname, starts in self.starts.items():
            if name in starts:
                if wname in self.current:
                    self.writer.todo.put(("close", self.current[wname]))
                path, entries = starts[name]
                self.writer.todo.put(("open", path, entries, {"format": "pt"}))
                self.current[wname] = path

    def put(self, window: str, tensor: str, offset: int, buf: Any, nbytes: int) -> None:
        """Hand ``nbytes`` of ``buf``, the bytes of ``tensor`` from byte ``offset`` on, to the window's shard."""
        if self.positional:
            self.writer.todo.put(("data_at", self.home[window][tensor], buf, nbytes, tensor, offset))
        else:
            self.writer.todo.put(("data", self.current[window], buf, nbytes))

    def close_all(self) -> None:
        for path in [*self.current.values(), *self.all_open]:
            self.writer.todo.put(("close", path))
        self.current.clear()
        self.all_open.clear()


def _stream(
    p: Pass,
    folders: dict[str, Path],
    reader: _Reader,
    writer: _Writer,
    accs: list[torch.Tensor],
    tmp: torch.Tensor,
    bar: Reporter,
    describe: Callable[[int], str] | None,
    checks: NonFinite,
) -> None:
    """The compute loop: tensors in order, chunks in order, each needed source once per chunk."""
    import torch

    def narrows(w: Window, name: str, out_dtype: str) -> bool:
        """A float16 output from a wider source dtype: the one cast that can overflow (an average of values
        within a dtype's range stays within it)."""
        span = range(w.start, w.end + 1)
        return out_dtype == "F16" and any(p.checkpoints[t].tensors[name].dtype != "F16" for t in span)

    sources = needed_sources(p.windows)
    members = {t: [w for w in p.windows if w.contains(t)] for t in sources}
    out_plans = {w.name: {t.name: t for t in p.plans[w.name].tensors} for w in p.windows}
    shards = _Shards(p, folders, writer)
    chunk = p.chunk_elems
    for done, tensor in enumerate(p.processing_order, 1):
        shards.begin_tensor(tensor.name)
        for start in range(0, max(tensor.numel, 1), chunk):
            count = min(chunk, tensor.numel - start)
            free, held = list(accs), {}
            prev: tuple[int, Any] | None = None
            bad: set[int] = set()  # sources with non-finite values in this chunk
            for t in sources:
                buf = reader.next()
                info = p.checkpoints[t].tensors[tensor.name]
                nbytes = count * ITEMSIZE[info.dtype]
                if tensor.floating:
                    for w in members[t]:
                        if w.start == t:
                            held[w.name] = free.pop()
                    targets = [(held[w.name][:count], w.weight_of(t), w.start == t) for w in members[t]]
                    src = buf[:nbytes].view(torch_dtype(info.dtype))
                    total = accumulate(src, targets, tmp, p.block_elems)
                    if not math.isfinite(total) and (n := count_nonfinite(src)):
                        checks.source(t, tensor.name, n)
                        bad.add(t)
                    reader.free.put(buf)
                    for w in members[t]:
                        if w.end == t:
                            acc = held.pop(w.name)
                            out_dtype = out_plans[w.name][tensor.name].out_dtype
                            out = writer.take()
                            out_nbytes = count * ITEMSIZE[out_dtype]
                            result = out[:out_nbytes].view(torch_dtype(out_dtype))
                            overflow = narrows(w, tensor.name, out_dtype) and not bad.intersection(
                                range(w.start, w.end + 1)
                            )
                            if overflow:
                                lo, hi = torch.aminmax(acc[:count])
                                overflow = not (float(lo) >= -F16_MAX and float(hi) <= F16_MAX)  # NaN: True
                            result.copy_(acc[:count])
                            if overflow and (n := count_nonfinite(result)):
                                checks.output(w.name, tensor.name, n)
                            shards.put(w.name, tensor.name, start * ITEMSIZE[out_dtype], out, out_nbytes)
                            free.append(acc)
                else:
                    if prev is not None:
                        prev_t, prev_buf = prev
                        if any(w.contains(prev_t) for w in members[t]) and not torch.equal(
                            prev_buf[:nbytes], buf[:nbytes]
                        ):
                            raise SourceError(
                                f"non-floating tensor {tensor.name!r} differs between "
                                f"{p.sources[prev_t].describe()} and {p.sources[t].describe()}; integer and "
                                "boolean buffers must be identical in every source of a merge",
                                path=p.sources[t].path,
                                tensor=tensor.name,
                            )
                        reader.free.put(prev_buf)
                    for w in members[t]:
                        if w.end == t:
                            out = writer.take()
                            out[:nbytes].copy_(buf[:nbytes])
                            shards.put(w.name, tensor.name, start * ITEMSIZE[info.dtype], out, nbytes)
                    prev = (t, buf)
                bar.advance(nbytes)
            if prev is not None:
                reader.free.put(prev[1])
        checks.tensor_done(tensor.name)
        if describe is not None:
            bar.update(description=describe(done))
    shards.close_all()


def _write_index(plan: MergePlan, folder: Path) -> None:
    if len(plan.shards) == 1:
        return
    index = {
        "metadata": {"total_size": plan.bytes_written},
        "weight_map": {t.name: s.file for s in plan.shards for t in s.tensors},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _finish_sidecars(plan: MergePlan, folder: Path) -> None:
    newest = plan.checkpoints[-1].path
    for name in plan.sidecar_files:
        shutil.copyfile(newest / name, folder / name)
    config = folder / "config.json"
    if plan.out_dtype and config.is_file():
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in data:
                data[key] = plan.out_dtype
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def finish_output(
    plan: MergePlan, folder: Path, shard_hashes: dict[str, str], nonfinite: dict[str, Any] | None = None
) -> dict[str, str]:
    """Write the index, sidecar files and ``hubmerge.json`` next to finished shards; return every file's hash."""
    files = dict(shard_hashes)
    _write_index(plan, folder)
    _finish_sidecars(plan, folder)
    for p in sorted(folder.iterdir()):
        if p.name not in files and p.name != WRITER_FILE:  # the writer record goes before the commit
            files[p.name] = sha256_file(p)
    write_provenance(folder, provenance(plan, files, nonfinite))
    return files


def write_pass(
    p: Pass,
    folders: dict[str, Path],
    accs: list[torch.Tensor],
    bar: Reporter,
    describe: Callable[[int], str] | None = None,
) -> tuple[dict[Path, str], NonFinite, int]:
    """Read the sources ``p`` needs once and write every window's shards into ``folders`` (already made); the
    shards' sha256s by path, what the non-finite checks found, and the bytes read.

    Nothing is committed here: :func:`run_pass` finishes and renames each folder, and a Ray merge's driver does
    the same once every task's shards are in (:mod:`hubmerge.merging.distributed`), so both write the same bytes.
    """
    import torch

    chunk = p.chunk_elems
    read_buffers = [torch.empty(chunk * p.in_itemsize, dtype=torch.uint8) for _ in range(READ_BUFFERS)]
    write_buffers = [torch.empty(chunk * p.out_itemsize, dtype=torch.uint8) for _ in range(p.write_buffers)]
    tmp = torch.empty(min(chunk, p.block_elems), dtype=torch.float32)
    checks = NonFinite(p.nonfinite, p.sources)
    jobs: Iterable[Job] = read_jobs(p.processing_order, p.checkpoints, needed_sources(p.windows), chunk)
    if p.open_reader is None:
        source: SourceReader = LocalReaders(p.checkpoints, p.sources)  # any order: the jobs stay a generator
    else:
        jobs = list(jobs)  # a stream schedules its range reads from the whole list
        source = p.open_reader(p.checkpoints, jobs)
    shard_writer = PositionalShard if p.positional else WriteBehindShard if p.write_behind else ShardWriter
    reader = _Reader(source, jobs, read_buffers)
    writer = _Writer(write_buffers, shard_writer)
    reader.start()
    writer.start()
    try:
        _stream(p, folders, reader, writer, accs, tmp, bar, describe, checks)
        reader.check()  # every source verified before anything is committed
    finally:
        reader.stop.set()
        source.abort()
        writer.todo.put(_STOP)
        writer.join()
    if writer.error is not None:
        raise writer.error
    return writer.hashes, checks, reader.bytes_read


def run_pass(
    p: Pass, accs: list[torch.Tensor], bar: Reporter, describe: Callable[[int], str] | None = None
) -> tuple[list[WindowFiles], int]:
    """Read the sources ``p`` needs once and commit every window of it; return them and the bytes read.

    ``accs`` are float32 chunk accumulators, at least as many as windows open at once, on the device the
    arithmetic runs on. Each window is built in a hidden folder and renamed into place only when every one of
    the pass's windows is complete; an error or interruption leaves none of them.
    """
    with ExitStack() as stack:
        dirs = {w.name: OutputDir(p.plans[w.name].output, force=p.force) for w in p.windows}
        folders = {name: stack.enter_context(d) for name, d in dirs.items()}
        shard_hashes, checks, bytes_read = write_pass(p, folders, accs, bar, describe)
        outputs = []
        for w in p.windows:
            plan, folder = p.plans[w.name], folders[w.name]
            hashes = {path.name: h for path, h in shard_hashes.items() if path.parent == folder}
            record = checks.record(w)
            files = finish_output(plan, folder, hashes, record)
            dirs[w.name].commit()
            outputs.append(WindowFiles(w, plan.output, files, record))
        return outputs, bytes_read


def check_device(device: str) -> Any:
    """The torch device to accumulate on; one that torch cannot use is a one-line error, not a traceback."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HubmergeError(f"--device {device}: not a device torch knows; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HubmergeError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise HubmergeError(f"--device {device}: hubmerge accumulates on cpu or cuda")
    return dev


def note_dead_partials(removed: Iterable[tuple[Path, int]], display: Display) -> None:
    """One line per partial output of a killed run that :func:`remove_dead_partials` removed."""
    for path, pid in removed:
        display.note(f"removed a partial output left by a killed run (pid {pid}): {path}")


def merge_pass(plan: MergePlan, *, force: bool = False) -> Pass:
    """A merge as a pass of one window over all its sources, named after the output folder."""
    window = Window(0, len(plan.sources), plan.output.name, tuple(plan.weights))
    return Pass(
        plan.checkpoints,
        plan.sources,
        [window],
        {window.name: plan},
        plan.tensors,
        plan.chunk_elems,
        BLOCK_ELEMS,
        force=force,
        order=plan.stream.order if plan.stream else hashed_order(plan.tensors, plan.sources, plan.checkpoints),
        open_reader=plan.stream.open_reader if plan.stream else None,
        nonfinite=plan.nonfinite,
    )


def execute(plan: MergePlan, *, force: bool = False, display: Display = QUIET, threads: int = 1) -> MergeResult:
    """Carry out a plan as a pass of one window; the output appears at ``plan.output`` only if every step succeeded."""
    import torch

    began = time.perf_counter()
    device = check_device(plan.device)
    n = len(plan.sources)
    p = merge_pass(plan, force=force)
    note_dead_partials(remove_dead_partials(plan.output), display)
    with torch_threads(threads):
        accs = [torch.empty(plan.chunk_elems, dtype=torch.float32, device=device)]
        description = f"merging {n} checkpoints"
        total = len(plan.tensors)
        with display.bytes(description, plan.bytes_read) as bar:
            (done,), _ = run_pass(p, accs, bar, describe=lambda k: f"{description}: {k}/{total} tensors")
    for line in nonfinite_lines(done.nonfinite):
        display.note(f"warning: {line}")
    return MergeResult(plan.output, done.files, time.perf_counter() - began, plan.bytes_read, plan.bytes_written)
