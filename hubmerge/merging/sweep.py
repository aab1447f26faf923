"""Window averages along a trajectory that share their reads: the plans of ``hubmerge sweep``, and their passes.

This module decides the windows, their plans and the passes; the streaming itself is
:func:`hubmerge.merging.executor.run_pass`, the same code a single merge runs. Averaging every window of sizes W
(stride s) along T checkpoints with independent merges reads ``sum over w of (T - w + 1) * w`` checkpoints (154
for T = 16, W = {2, 4, 8}). Here one pass reads each source once for all windows together: tensor by tensor, chunk
by chunk, sources oldest first. Each window open at source t (its first member <= t <= its last) holds a float32
accumulator for the current chunk; x_t is added to every open window with its weight there, and when a window's
last member has been added its chunk is cast and appended to that window's shard. Memory is the chunk size times
the number of windows open at once (``sum over w of ceil(w / s)``), neither the model size nor T.

Each window accumulates on its own, in source order, with the same float32 operations as
``hubmerge merge`` (``acc = w0 * x0``, then ``acc += wi * xi``): no running sums are subtracted, so long
sweeps do not drift, and every window's shards are bit-identical to a ``hubmerge merge`` of the same
sources, weights and dtype. Chunk and block sizes do not change the result (the arithmetic is
elementwise); they only change how much of it stays in cache.

Outputs: ``ROOT/w{size}-{first label}-{last label}/``, a complete model folder exactly as
``hubmerge merge`` writes it (shards, index, config and tokenizer of the window's newest source,
``hubmerge.json`` with the window's sources, weights, file hashes and a recipe that reproduces it with
``hubmerge merge``). Each is built in a hidden folder and renamed into place, so an interrupted sweep
leaves only finished windows.

Disk: every window of a pass is written during the whole pass (the last tensor finishes them all), so
a pass holds as many partial outputs as it has windows. ``max_windows_on_disk = K`` splits the
windows, ordered by their last source, into passes of at most K; with ``keep=False`` each window is
handed to ``on_window`` (for example to be evaluated) and then deleted, so at most K outputs exist at
once. The trade-off: one pass reads each source once; K smaller than the number of windows costs one
pass per batch, each reading only the sources its windows span (neighbouring batches share up to
``max(W) - 1`` sources, which are read again).

Resuming: a window whose folder holds a ``hubmerge.json`` for the same sources, weights and dtype,
with every listed file present and matching its hash, is not recomputed; nor is a window that was
handed over and deleted (``keep=False`` leaves ``ROOT/NAME.deleted.json``, its provenance, behind).
A rerun reads only the sources its unfinished windows need.

On Ray (``run_sweep(..., ray=RayOptions(...), score=...)``, ``hubmerge sweep --ray``): each pass is one Ray task
that reads its sources (paths every worker sees, or the Hub), builds its windows, runs ``score`` on each and,
without ``keep``, deletes it, returning hashes, scores and provenance; the driver hands them over as here, so what
``on_window`` sees, and the tombstones left, are the same as on one machine. See :func:`ray_passes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hubmerge.errors import OutputError, RecipeError, SourceError
from hubmerge.io.checkpoint import ITEMSIZE, Checkpoint, SourceRef, open_checkpoint
from hubmerge.io.cluster import RAY_RETRIES, RayOptions, crash_hook, import_ray, results_as_done
from hubmerge.io.env import torch_threads
from hubmerge.io.files import atomic_write, check_free_space, free_space, sha256_file
from hubmerge.io.progress import QUIET, Display
from hubmerge.io.provenance import PROVENANCE_FILE, try_read_provenance
from hubmerge.io.writer import remove_dead_partials
from hubmerge.merging.distributed import task_gpus
from hubmerge.merging.executor import (
    Pass,
    Window,
    WindowFiles,
    hashed_order,
    needed_sources,
    nonfinite_lines,
    note_dead_partials,
    run_pass,
)
from hubmerge.merging.methods import METHOD_NAMES
from hubmerge.merging.plan import (
    PROCESS_BASELINE_BYTES,
    READ_BUFFERS,
    WRITE_BUFFERS,
    MergePlan,
    StreamPlan,
    TensorPlan,
    build_plan,
    check_compatible,
)
from hubmerge.merging.recipe import RecipeDocument

# Elements per chunk and per conversion block. Small on purpose: with chunks of 256Ki elements the
# float32 accumulators of the 14 windows open at once for W = {2, 4, 8} take 14 MiB and stay in a 32 MiB
# L3 cache, and each source chunk, converted to float32 once (1 MiB), stays in L2 while it is added to
# every open window. Measured on a 2-core EPYC: about 5 s of arithmetic for all 154 window-adds of a
# 177M-parameter T = 16 sweep, against 7.5 s with 1Mi-element chunks and 9.4 s with a merge's 4Mi.
SWEEP_CHUNK_ELEMS = 256 * 1024
SWEEP_BLOCK_ELEMS = 256 * 1024
DELETED_SUFFIX = ".deleted.json"


def window_positions(count: int, sizes: Iterable[int], stride: int = 1) -> list[tuple[int, int]]:
    """``(start, size)`` of every window: starts 0, s, 2s, ... while ``start + size <= count``.

    Size 1 is the raw checkpoint, which needs no merge, so it is left out.
    """
    return [(start, w) for w in sorted(set(sizes)) if w > 1 for start in range(0, count - w + 1, stride)]


def max_open_windows(windows: Iterable[Window]) -> int:
    """The most windows that contain one source: how many chunk accumulators a pass holds at once."""
    windows = list(windows)
    if not windows:
        return 0
    lo, hi = min(w.start for w in windows), max(w.end for w in windows)
    return max(sum(w.contains(t) for w in windows) for t in range(lo, hi + 1))


@dataclass
class SweepPlan:
    """Every window of a sweep, which of them are still to do, and how they are split into passes."""

    name: str
    sources: list[SourceRef]
    checkpoints: list[Checkpoint]
    windows: list[Window]  # by size, then position
    plans: dict[str, MergePlan]  # window name -> the plan a ``hubmerge merge`` of it would follow
    status: dict[str, str]  # window name -> "todo" | "done" (on disk) | "deleted" (handed over, then removed)
    batches: list[list[Window]]  # the passes, each a list of "todo" windows, ordered by last source
    root: Path
    stride: int
    method: str
    dtype: str | None
    chunk_elems: int
    block_elems: int
    max_windows_on_disk: int | None
    force: bool = False
    stream: StreamPlan | None = None  # fetch: stream: the sources' byte order and the reader of the Hub
    disk_free: int | None = None  # bytes free where the windows go, as plan_sweep saw it

    @property
    def fetch(self) -> str:
        return "stream" if self.stream is not None else "cache"

    @property
    def todo(self) -> list[Window]:
        return [w for b in self.batches for w in b]

    @property
    def tensors(self) -> list[TensorPlan]:
        return next(iter(self.plans.values())).tensors

    def source_bytes(self, t: int) -> int:
        """Bytes of source ``t`` that a pass reads (every output tensor, once)."""
        ck = self.checkpoints[t]
        return sum(ck.tensors[p.name].nbytes for p in self.tensors)

    @property
    def bytes_read(self) -> int:
        """What this run reads: each pass reads each source its windows span, once."""
        return sum(self.source_bytes(t) for b in self.batches for t in needed_sources(b))

    @property
    def bytes_read_independent(self) -> int:
        """What independent ``hubmerge merge`` runs of the same windows would read."""
        return sum(self.plans[w.name].bytes_read for w in self.todo)

    @property
    def bytes_written(self) -> int:
        return sum(self.plans[w.name].bytes_written for w in self.todo)

    def window_disk_bytes(self, window: Window) -> int:
        """About what one finished window folder takes: its shards plus the copied config and tokenizer files."""
        plan = self.plans[window.name]
        newest = plan.checkpoints[-1].path
        return plan.bytes_written + sum((newest / f).stat().st_size for f in plan.sidecar_files)

    def new_disk_bytes(self, keep: bool) -> int:
        """Peak disk this run adds: the windows still to compute when kept, else its largest pass."""
        if keep:
            return sum(self.window_disk_bytes(w) for w in self.todo)
        return max((sum(self.window_disk_bytes(w) for w in b) for b in self.batches), default=0)

    def disk_bytes(self, keep: bool) -> int:
        """Peak disk use of this run's outputs: every window when kept, else the largest pass."""
        sizes = {w.name: self.window_disk_bytes(w) for w in self.windows}
        if keep:
            return sum(sizes[w.name] for w in self.windows if self.status[w.name] != "deleted")
        return max((sum(sizes[w.name] for w in b) for b in self.batches), default=0)

    @property
    def max_open(self) -> int:
        return max((max_open_windows(b) for b in self.batches), default=0)

    @property
    def in_itemsize(self) -> int:
        return max(ITEMSIZE[t.dtype] for ck in self.checkpoints for t in ck.tensors.values())

    @property
    def out_itemsize(self) -> int:
        return max(ITEMSIZE[t.out_dtype] for p in self.plans.values() for t in p.tensors)

    @property
    def buffer_bytes(self) -> int:
        """Peak bytes of sweep buffers: chunk x (open windows' float32 accumulators + read and write pools)."""
        opened = self.max_open
        per_elem = READ_BUFFERS * self.in_itemsize + 4 * opened + (WRITE_BUFFERS + opened) * self.out_itemsize
        return self.chunk_elems * per_elem + 4 * min(self.chunk_elems, self.block_elems)

    @property
    def memory_estimate(self) -> int:
        return PROCESS_BASELINE_BYTES + self.buffer_bytes + (self.stream.in_flight_bytes if self.stream else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sources": [{**s.to_dict(), "label": s.label} for s in self.sources],
            "root": str(self.root),
            "stride": self.stride,
            "method": self.method,
            "dtype": self.dtype,
            "windows": [
                {
                    "name": w.name,
                    "size": w.size,
                    "start": w.start,
                    "end": w.end,
                    "weights": list(w.weights),
                    "status": self.status[w.name],
                    "output": str(self.plans[w.name].output),
                }
                for w in self.windows
            ],
            "passes": [[w.name for w in b] for b in self.batches],
            "bytes_read": self.bytes_read,
            "bytes_read_independent": self.bytes_read_independent,
            "bytes_written": self.bytes_written,
            "max_open_windows": self.max_open,
            "chunk_elems": self.chunk_elems,
            "memory_estimate_bytes": self.memory_estimate,
            "max_windows_on_disk": self.max_windows_on_disk,
            "disk_bytes_keep": self.disk_bytes(True),
            "disk_bytes_delete": self.disk_bytes(False),
            "fetch": self.fetch,
            **({"stream": self.stream.to_dict()} if self.stream else {}),
        }


@dataclass
class WindowOutput:
    """A finished window: where it is (or was, once deleted), its plan and its files' hashes."""

    window: Window
    path: Path
    plan: MergePlan
    files: dict[str, str]
    computed: bool  # False when an earlier run had already finished it
    scores: Any = None  # on Ray: what the pass's task computed of it (see ``ray_passes``'s ``score``)
    provenance: str | None = None  # on Ray: the hubmerge.json of a window its task deleted (``path`` is gone)


@dataclass
class SweepResult:
    outputs: list[WindowOutput] = field(default_factory=list)  # finished or computed, in hand-over order
    skipped: list[str] = field(default_factory=list)  # handed over and deleted by an earlier run
    bytes_read: int = 0  # counted by the reader, not planned
    bytes_written: int = 0
    passes: int = 0
    seconds: float = 0.0


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _source_key(d: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(d.get(k) for k in ("path", "repo", "revision", "commit"))


def _same_window(prov: Any, plan: MergePlan) -> bool:
    """Whether a ``hubmerge.json`` describes this window: same sources, weights, method and dtype."""
    try:
        return (
            [_source_key(s) for s in prov["sources"]] == [_source_key(s.to_dict()) for s in plan.sources]
            and prov["weights"] == plan.weights
            and prov["method"] == plan.method
            and prov["dtype"] == plan.out_dtype
        )
    except (KeyError, TypeError):
        return False


def incomplete_reason(folder: Path, plan: MergePlan, verify: bool = True) -> str | None:
    """Why ``folder`` is not this window's finished output, or None when it is (``verify``: check hashes)."""
    prov = try_read_provenance(folder)
    if prov is None:
        return f"no readable {PROVENANCE_FILE}"
    if not _same_window(prov, plan):
        return f"its {PROVENANCE_FILE} names other sources, weights, method or dtype"
    files = prov.get("files")
    if not isinstance(files, dict):
        return f"its {PROVENANCE_FILE} lists no files"
    present = {p.name for p in folder.iterdir()} - {PROVENANCE_FILE}
    if present != set(files):
        return f"its files differ from those {PROVENANCE_FILE} lists ({', '.join(sorted(present ^ set(files)))})"
    if verify:
        for name, digest in sorted(files.items()):
            if sha256_file(folder / name) != digest:
                return f"{name} does not match the sha256 in {PROVENANCE_FILE}"
    return None


def _window_status(plan: MergePlan, force: bool, verify: bool) -> str:
    folder = plan.output
    if force:
        return "todo"
    if folder.exists():
        why = incomplete_reason(folder, plan, verify) if folder.is_dir() else "it is not a folder"
        if why is None:
            return "done"
        raise OutputError(
            f"{folder} exists but is not a finished output of this sweep window: {why}; "
            "remove it, or pass force to recompute every window",
            path=folder,
        )
    tomb = folder.with_name(folder.name + DELETED_SUFFIX)
    try:
        if _same_window(json.loads(tomb.read_text()), plan):
            return "deleted"
    except (OSError, ValueError):
        pass
    return "todo"


def _batches(todo: list[Window], limit: int | None) -> list[list[Window]]:
    """Windows ordered by last source, cut into passes of at most ``limit`` (the windows ending together)."""
    order = sorted(todo, key=lambda w: (w.end, w.start))
    if not order:
        return []
    k = limit or len(order)
    return [order[i : i + k] for i in range(0, len(order), k)]


def _as_source(s: SourceRef | str | Path) -> SourceRef:
    return s if isinstance(s, SourceRef) else SourceRef.local(s)


def plan_sweep(
    sources: Sequence[SourceRef | str | Path],
    sizes: Iterable[int],
    root: str | Path,
    *,
    stride: int = 1,
    method: str = "uniform",
    decay: float | None = None,
    weights: Mapping[int, Sequence[float]] | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    max_windows_on_disk: int | None = None,
    name: str = "sweep",
    force: bool = False,
    verify: bool = True,
    extra_provenance: Mapping[str, Any] | None = None,
    chunk_elems: int = SWEEP_CHUNK_ELEMS,
    block_elems: int = SWEEP_BLOCK_ELEMS,
    checkpoints: Sequence[Checkpoint] | None = None,
    stream: Callable[[list[TensorPlan]], StreamPlan] | None = None,
    copies: Iterable[int] = (),
    nonfinite: str = "refuse",
    keep: bool = False,
) -> SweepPlan:
    """Plan every window of a sweep over ``sources`` (oldest first); reads headers and finished outputs only.

    ``sizes``: window sizes (1 is skipped: the raw checkpoint). ``method``: ``uniform``, ``ema`` (with
    ``decay``) or ``weighted`` (``weights[size]``: one share per position in a window of that size),
    applied within each window as ``hubmerge merge`` would. ``dtype``: ``float16``, ``bfloat16``,
    ``float32`` or None (as the sources). ``force``: recompute windows that are already finished.
    ``verify``: hash the files of finished windows before trusting them.

    A streamed sweep (``fetch: stream``) passes the ``checkpoints`` read from remote headers, and ``stream``, which
    makes the pass's :class:`StreamPlan` from the plan's tensors. ``copies``: sources to write as exact size-1
    copies (``w1-LABEL``, weight 1, their own dtype) in the same pass, so that raw checkpoints that were never
    downloaded can be scored; they are always deleted once handed over.

    A sweep whose peak disk need (with ``keep``, every window still to compute; else its largest pass, the windows
    on disk at once) exceeds the free space where ``output`` goes is refused here (exit 4), before any tensor is read.
    """
    refs = [_as_source(s) for s in sources]
    if len(refs) < 2:
        raise RecipeError(f"a sweep needs at least 2 checkpoints, got {len(refs)}")
    sizes = sorted(set(sizes))
    copies = sorted(set(copies))
    if (not sizes and not copies) or any(not isinstance(w, int) or w < 1 for w in sizes):
        raise RecipeError(f"sweep sizes {sizes}: give window sizes as positive integers, e.g. 2,4,8")
    if sizes and sizes[-1] > len(refs):
        raise RecipeError(f"window size {sizes[-1]} is larger than the trajectory ({len(refs)} checkpoints)")
    if stride < 1:
        raise RecipeError(f"sweep stride {stride}: must be at least 1")
    if max_windows_on_disk is not None and max_windows_on_disk < 1:
        raise RecipeError(f"max_windows_on_disk {max_windows_on_disk}: must be at least 1")
    if method not in METHOD_NAMES:
        raise RecipeError(f"sweep method {method!r}: use {', '.join(METHOD_NAMES)}", field="method")
    if method == "ema" and (decay is None or not 0.0 < decay < 1.0):
        raise RecipeError(f"method 'ema' needs a decay strictly between 0 and 1 (got {decay})")
    if method == "weighted":
        missing = [w for w in sizes if w > 1 and (weights is None or len(weights.get(w, ())) != w)]
        if missing:
            raise RecipeError(f"method 'weighted' needs weights[{missing[0]}]: one share per window position")
    if chunk_elems < 1 or block_elems < 1:
        raise RecipeError("chunk_elems and block_elems must be positive")
    root = Path(root).expanduser().resolve()
    for i, s in enumerate(refs):
        if root == s.path or s.path in root.parents:
            raise RecipeError(f"sweep output root {root} is inside source {i} ({s.path}); write it somewhere else")

    checkpoints = list(checkpoints) if checkpoints is not None else [open_checkpoint(s.path) for s in refs]
    check_compatible(refs, checkpoints)  # the whole trajectory, so a mismatch is named once
    labels = [_label(s.label) for s in refs]
    windows: list[Window] = []
    plans: dict[str, MergePlan] = {}
    positions = [(t, 1) for t in copies] + window_positions(len(refs), sizes, stride)
    for start, size in positions:
        copy = size == 1
        wname = f"w1-{labels[start]}" if copy else f"w{size}-{labels[start]}-{labels[start + size - 1]}"
        if wname in plans:
            raise RecipeError(
                f"two windows would both be written to {root / wname}: source labels must be distinct "
                f"({labels[start]!r} repeats)"
            )
        plan = _window_plan(
            refs[start : start + size],
            checkpoints[start : start + size],
            root / wname,
            f"{name}-{wname}",
            "uniform" if copy else method,
            decay,
            list(weights[size]) if method == "weighted" and weights and not copy else None,
            None if copy else dtype,
            max_shard_size,
        )
        plan.extra_provenance.update(
            {
                **(extra_provenance or {}),
                "sweep": {
                    "name": name,
                    "window": {"size": size, "start": start, "end": start + size - 1, "stride": stride},
                    "trajectory": [s.label for s in refs],
                },
            }
        )
        plan.nonfinite = nonfinite
        plans[wname] = plan
        windows.append(Window(start, size, wname, tuple(plan.weights)))
    if not windows:
        raise RecipeError(f"sweep sizes {sizes}: no window larger than 1 fits; nothing to merge")
    layout = [(t.name, t.shape, t.floating) for t in plans[windows[0].name].tensors]
    for w in windows[1:]:
        if [(t.name, t.shape, t.floating) for t in plans[w.name].tensors] != layout:
            raise SourceError(
                f"window {w.name} would hold other tensors than {windows[0].name} (a tied output head in some "
                "checkpoints only?); sweep a trajectory whose checkpoints share one layout",
                path=root / w.name,
            )
    # A copy is asked for only while its checkpoint lacks scores: always computed, whatever an earlier run left.
    status = {w.name: "todo" if w.size == 1 else _window_status(plans[w.name], force, verify) for w in windows}
    todo = [w for w in windows if status[w.name] == "todo"]
    tensors = plans[windows[0].name].tensors
    splan = SweepPlan(
        name=name,
        sources=refs,
        checkpoints=checkpoints,
        windows=windows,
        plans=plans,
        status=status,
        batches=_batches(todo, max_windows_on_disk),
        root=root,
        stride=stride,
        method=method,
        dtype=dtype,
        chunk_elems=max(1, min(chunk_elems, max(t.numel for t in tensors))),
        block_elems=block_elems,
        max_windows_on_disk=max_windows_on_disk,
        force=force,
        stream=stream(tensors) if stream is not None else None,
    )
    folder, splan.disk_free = free_space(root)
    check_free_space(folder, splan.new_disk_bytes(keep), splan.disk_free)
    return splan


def _window_plan(
    refs: list[SourceRef],
    checkpoints: list[Checkpoint],
    output: Path,
    name: str,
    method: str,
    decay: float | None,
    weights: list[float] | None,
    dtype: str | None,
    max_shard_size: int | str,
) -> MergePlan:
    """The plan of a ``hubmerge merge`` of one window; its recipe, kept in ``hubmerge.json``, reproduces it."""
    data: dict[str, Any] = {
        "name": name,
        "sources": [{"path": str(s.path)} for s in refs],
        "method": method,
        "output": {"path": str(output), "max_shard_size": max_shard_size},
    }
    if weights is not None:
        data["weights"] = weights
    if method == "ema":
        data["ema"] = {"decay": decay}
    if dtype is not None:
        data["dtype"] = dtype
    doc = RecipeDocument.from_data(data, f"sweep window {output.name}")
    return build_plan(doc, refs, force=True, checkpoints=checkpoints)


def _pass(plan: SweepPlan, batch: list[Window]) -> Pass:
    """The executor's view of one pass: every window of ``batch`` from one read of the sources they span."""
    return Pass(
        plan.checkpoints,
        plan.sources,
        batch,
        {w.name: plan.plans[w.name] for w in batch},
        plan.tensors,
        plan.chunk_elems,
        plan.block_elems,
        # One more per open window: the windows that end at the same source all hand a chunk to the writer.
        write_buffers=WRITE_BUFFERS + plan.max_open,
        write_behind=True,
        # a copy (w1-*) can be left committed by a run killed before handing it over; it is always rebuilt
        force=plan.force or any(w.size == 1 for w in batch),
        order=plan.stream.order if plan.stream else hashed_order(plan.tensors, plan.sources, plan.checkpoints),
        open_reader=plan.stream.open_reader if plan.stream else None,
        nonfinite=plan.plans[batch[0].name].nonfinite,
    )


def _hand_over(
    out: WindowOutput, on_window: Callable[[WindowOutput], Any] | None, keep: bool, threads: int | None = None
) -> None:
    """Give a finished window to the caller; without ``keep``, then delete it, leaving its provenance beside.

    ``threads``: the caller's torch thread count, restored for ``on_window`` (which typically scores the
    window) while the merge itself runs on one thread.
    """
    if on_window is not None:
        with torch_threads(threads) if threads is not None else nullcontext():
            on_window(out)
    if out.window.size == 1:  # a raw checkpoint's copy: scored, then gone (the store keeps its scores)
        shutil.rmtree(out.path, ignore_errors=out.provenance is not None)
    elif not keep:
        prov = out.provenance if out.provenance is not None else (out.path / PROVENANCE_FILE).read_text()
        atomic_write(out.path.with_name(out.path.name + DELETED_SUFFIX), prov)
        shutil.rmtree(out.path, ignore_errors=out.provenance is not None)


def _remove_stale_partials(plan: SweepPlan, display: Display) -> None:
    """Hidden temporary folders of this sweep's windows left by a killed run (not merely interrupted)."""
    for w in plan.todo:
        note_dead_partials(remove_dead_partials(plan.plans[w.name].output), display)


def run_sweep(
    plan: SweepPlan,
    *,
    on_window: Callable[[WindowOutput], Any] | None = None,
    keep: bool = True,
    display: Display = QUIET,
    threads: int = 1,
    ray: RayOptions | None = None,
    score: Callable[[Path], Any] | None = None,
    score_memory: int = 0,
) -> SweepResult:
    """Compute the plan's unfinished windows, pass by pass, handing each finished window to ``on_window``.

    ``ray``: each pass is one Ray task (see :func:`ray_passes`), which also runs ``score`` on each window it
    built (the result is the window's ``scores``); the driver still hands the windows over, one by one, as their
    passes come back, so ``on_window`` and the tombstones of deleted windows are written here as on one machine.

    Windows an earlier run finished (and left on disk) are handed over first, without recomputing them.
    ``keep=False`` deletes each window after ``on_window`` returns (leaving ``NAME.deleted.json``, so a
    rerun skips it); with ``plan.max_windows_on_disk = K`` at most K outputs then exist at once. An
    exception from ``on_window`` stops the sweep; the windows already committed stay, and a rerun
    computes only the others.
    """
    import torch

    began = time.perf_counter()
    result = SweepResult()
    _remove_stale_partials(plan, display)
    for w in plan.windows:
        if plan.status[w.name] == "deleted":
            result.skipped.append(w.name)
        elif plan.status[w.name] == "done":
            wplan = plan.plans[w.name]
            files = json.loads((wplan.output / PROVENANCE_FILE).read_text())["files"]
            out = WindowOutput(w, wplan.output, wplan, files, computed=False)
            result.outputs.append(out)
            _hand_over(out, on_window, keep)
    if not plan.batches:
        result.seconds = time.perf_counter() - began
        return result

    caller_threads = torch.get_num_threads()
    with torch_threads(threads):
        description = f"sweep: {len(plan.todo)} windows from {len(needed_sources(plan.todo))} checkpoints"
        with display.bytes(description, plan.bytes_read) as bar, contextlib.ExitStack() as stack:
            passes = (
                stack.enter_context(
                    contextlib.closing(
                        ray_passes(plan, ray, threads, bar, score=score, keep=keep, score_memory=score_memory)
                    )
                )
                if ray is not None
                else local_passes(plan, bar, description)
            )
            for committed, nread in passes:
                result.passes += 1
                result.bytes_read += nread
                for done in committed:
                    for line in nonfinite_lines(done.nonfinite):
                        display.note(f"warning: {done.window.name}: {line}")
                    done.path.with_name(done.path.name + DELETED_SUFFIX).unlink(missing_ok=True)
                    out = WindowOutput(
                        done.window,
                        done.path,
                        plan.plans[done.window.name],
                        done.files,
                        computed=True,
                        scores=done.scores,
                        provenance=done.provenance,
                    )
                    result.bytes_written += out.plan.bytes_written
                    result.outputs.append(out)
                    _hand_over(out, on_window, keep, threads=caller_threads)
    result.seconds = time.perf_counter() - began
    return result


def local_passes(plan: SweepPlan, bar: Any, description: str) -> Iterator[tuple[list[WindowFiles], int]]:
    """The passes on this machine, one after the other, sharing one set of chunk accumulators: each pass's
    committed windows and the bytes it read. (On Ray each task allocates its own; the driver none.)"""
    import torch

    accs = [torch.empty(plan.chunk_elems, dtype=torch.float32) for _ in range(plan.max_open)]
    for i, batch in enumerate(plan.batches):
        if len(plan.batches) > 1:
            bar.update(description=f"{description}, pass {i + 1}/{len(plan.batches)}")
        yield run_pass(_pass(plan, batch), accs, bar)


def ray_passes(
    plan: SweepPlan,
    settings: RayOptions,
    threads: int,
    bar: Any,
    *,
    score: Callable[[Path], Any] | None = None,
    keep: bool = True,
    score_memory: int = 0,
) -> Iterator[tuple[list[WindowFiles], int]]:
    """Each pass as one Ray task (:func:`ray_pass`), yielded as it comes back: the shared read stays per pass,
    so each source byte is read once per pass, as on one machine, and the passes run side by side.

    The task reads the sources itself: at paths every worker sees, or from the Hub (``fetch: stream``). It runs
    ``score`` on every window it built (on its own GPU where it asked for one), so only scores come back. Without
    ``keep`` it deletes each window once scored, and a worker that cannot see ``plan.root`` builds its windows in
    a folder of its own; with ``keep`` the windows are the output, and ``plan.root`` must be shared. A task whose
    worker dies is retried once; one that fails twice fails the sweep with one line naming its pass and windows;
    the windows of passes already back stay committed (complete, and skipped by a rerun), those of the failed
    pass were never committed. Each task asks for the pass's memory bound plus ``score_memory`` (a model loaded
    to score it, as the caller estimates it)."""
    ray = import_ray()
    memory = plan.memory_estimate + (score_memory if score is not None else 0)
    gpus = task_gpus(ray, settings, "cpu", memory)
    remote = ray.remote(num_cpus=settings.cpus_per_task, num_gpus=gpus, memory=memory, max_retries=RAY_RETRIES)(
        ray_pass
    )
    plan.root.mkdir(parents=True, exist_ok=True)  # made here, so that a worker that cannot see it can say so
    plan_ref = ray.put(plan)
    score_ref = ray.put(score)
    total = len(plan.batches)
    names = {
        remote.remote(plan_ref, i, threads, score_ref, keep, settings.output): (
            f"sweep pass {i + 1}/{total} ({', '.join(w.name for w in batch)})"
        )
        for i, batch in enumerate(plan.batches)
    }
    try:
        with contextlib.closing(
            results_as_done(ray, names, plan.root, "its windows were not committed; a rerun computes only them")
        ) as results:
            for _, (committed, nread) in results:
                bar.advance(nread)
                yield committed, nread
    finally:  # the partial folders of killed attempts (on this host; a retry removes those on its own)
        _remove_stale_partials(plan, QUIET)


def ray_pass(
    plan: SweepPlan,
    index: int,
    threads: int,
    score: Callable[[Path], Any] | None = None,
    keep: bool = True,
    output: str = "auto",
) -> tuple[list[WindowFiles], int]:
    """A Ray task: run pass ``index`` of ``plan`` on this worker, then ``score`` each of its windows.

    The windows are committed under ``plan.root`` when this worker sees it, else (without ``keep``) under a
    folder of its own, removed at the end. Without ``keep`` each window is deleted once scored and its
    ``hubmerge.json`` comes back instead, for the driver's tombstone. A retry after a killed attempt first removes
    that attempt's partial folders, and does not rebuild a window the killed attempt had already committed (its
    folder matches its ``hubmerge.json``): it is scored as it is."""
    import torch

    batch = plan.batches[index]
    visible = plan.root.is_dir()
    if output == "shared" and not visible:
        raise OutputError(
            f"{plan.root}: the sweep's output folder is not visible on this Ray worker (pid {os.getpid()}); "
            "--ray-output shared needs output.path on a file system every worker shares",
            path=plan.root,
        )
    private = output == "driver" or not visible
    if private and (keep or score is None):
        where = "is not visible on this Ray worker" if not visible else "is left to the driver (--ray-output driver)"
        why = "the sweep keeps its windows" if keep else "nothing scores the windows on the worker"
        raise OutputError(
            f"{plan.root}: {why}, and its output folder {where} (pid {os.getpid()}); put output.path on a file "
            "system every worker shares, or sweep with --no-keep, so that each worker scores its windows and only "
            "their scores come back",
            path=plan.root,
        )
    own = Path(tempfile.mkdtemp(prefix="hubmerge-sweep-")) if private else None
    try:
        local = with_local_sidecars(rebased(plan, own) if own is not None else plan, batch)
        finished: list[WindowFiles] = []
        rest = []
        for w in batch:
            out = local.plans[w.name].output
            remove_dead_partials(out)
            if w.size > 1 and not plan.force and out.is_dir() and incomplete_reason(out, local.plans[w.name]) is None:
                files = json.loads((out / PROVENANCE_FILE).read_text())["files"]
                finished.append(WindowFiles(w, out, files))
            else:
                rest.append(w)
        nread = 0
        if rest:
            name = f"pass-{index + 1}"

            def describe(_: Any) -> str:  # called per tensor: where the test-only fault hook can kill the worker
                crash_hook(name)
                return ""

            with torch_threads(threads):
                accs = [torch.empty(plan.chunk_elems, dtype=torch.float32) for _ in range(max_open_windows(rest))]
                with QUIET.bytes("", 0) as bar:
                    committed, nread = run_pass(_pass(local, rest), accs, bar, describe=describe)
            finished += committed
        for done in finished:
            if score is None:
                continue
            done.scores = score(done.path)
            if not keep or done.window.size == 1:  # scored: only its provenance goes back, for the tombstone
                done.provenance = (done.path / PROVENANCE_FILE).read_text()
                shutil.rmtree(done.path)
            done.path = plan.plans[done.window.name].output  # the driver's name for it
        return finished, nread
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)


def rebased(plan: SweepPlan, root: Path) -> SweepPlan:
    """The plan with every window's output under ``root``: a worker's own folder, when it cannot see the
    driver's. Only where the windows are built changes; their files, hashes and ``hubmerge.json`` do not."""
    plans = {name: replace(p, output=root / p.output.name) for name, p in plan.plans.items()}
    return replace(plan, root=root, plans=plans)


def with_local_sidecars(plan: SweepPlan, batch: Sequence[Window]) -> SweepPlan:
    """A streamed plan whose windows copy config and tokenizer from this worker's own HF cache: the driver's
    snapshot folders are not there on another machine, so the stream fetches them (see ``StreamPlan.snapshot``).
    Sources at paths every worker sees are left as they are."""
    if plan.stream is None or plan.stream.snapshot is None:
        return plan
    plans = dict(plan.plans)
    for w in batch:
        p = plans[w.name]
        folder = plan.stream.snapshot(w.end)
        if folder != p.checkpoints[-1].path:
            plans[w.name] = replace(p, checkpoints=[*p.checkpoints[:-1], replace(p.checkpoints[-1], path=folder)])
    return replace(plan, plans=plans)


def sweep(
    sources: Sequence[SourceRef | str | Path],
    sizes: Iterable[int],
    root: str | Path,
    *,
    on_window: Callable[[WindowOutput], Any] | None = None,
    keep: bool = True,
    display: Display = QUIET,
    threads: int = 1,
    **plan_options: Any,
) -> SweepResult:
    """Plan and run a sweep in one call; ``plan_options`` are :func:`plan_sweep`'s keyword arguments."""
    plan = plan_sweep(sources, sizes, root, **plan_options)
    return run_sweep(plan, on_window=on_window, keep=keep, display=display, threads=threads)
