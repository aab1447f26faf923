"""``hubmerge merge --ray``: one merge's output shards written by Ray tasks, committed by the driver.

The driver plans as a one-machine merge does and opens the output's hidden partial folder. Each output shard
becomes one Ray task, which opens the sources itself (local folders or HF-cache snapshots at paths every worker
sees), runs the same streaming executor restricted to that shard's tensors, and writes the shard into the
partial folder. The arithmetic is elementwise and per tensor, and each tensor belongs to exactly one shard, so a
shard written by a task is bit-identical to the same shard written by :func:`~hubmerge.merging.executor.execute`.

A task writes into its own attempt folder inside the partial folder and renames the finished shard next to it,
so a worker killed mid-task leaves no half-written shard under the shard's name; Ray retries the task once
(``max_retries``). The driver then re-hashes every shard, writes the index, sidecars and ``hubmerge.json`` with
the same :func:`~hubmerge.merging.executor.finish_output` and renames the folder into place; nothing about Ray is
recorded, so the whole output, ``hubmerge.json`` included, equals a one-machine merge's.

Where the workers read: local folders or HF-cache snapshots at paths every worker sees, or, with ``fetch:
stream``, the Hub itself: the streamed plan (remote headers, the byte order, the client's endpoint and token)
travels with the task, and each task range-reads the source files its shard's tensors lie in, front to back,
verifying each file's sha256 as a one-machine stream does (so a file two shards share is read by both tasks).

Where the workers write (``RayOptions.output``): ``auto`` (the default) writes the shard into the driver's partial
folder when the worker sees it, and otherwise returns the shard's bytes to the driver, which writes them there
(one shard in the driver's memory at a time: ``output.max_shard_size`` bounds it); ``shared`` insists on the
shared path (a worker that cannot see it fails with one line); ``driver`` always returns the bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hubmerge.errors import ClusterError, OutputError
from hubmerge.io.checkpoint import SourceRef
from hubmerge.io.cluster import RAY_RETRIES, RayOptions, check_resources, crash_hook, ray_session, results_as_done
from hubmerge.io.env import torch_threads
from hubmerge.io.files import atomic_write, sha256_file
from hubmerge.io.progress import QUIET, Display
from hubmerge.io.writer import WRITER_FILE, OutputDir, remove_dead_partials, safetensors_header
from hubmerge.merging.executor import (
    MergeResult,
    NonFinite,
    check_device,
    finish_output,
    merge_pass,
    nonfinite_lines,
    note_dead_partials,
    write_pass,
)
from hubmerge.merging.plan import MergePlan, ShardPlan

# Inside the partial folder: one folder per task attempt, removed when its shard is in place.
ATTEMPT_PREFIX = ".ray-attempt-"


@dataclass(frozen=True)
class ShardDone:
    """What a task reports of its shard: the file, its sha256 and size, the non-finite counts, the bytes read."""

    file: str
    sha256: str
    size: int
    in_sources: dict[tuple[int, str], int]
    in_outputs: dict[tuple[str, str], int]
    bytes_read: int
    data: bytes | None = None  # the shard itself, from a worker that does not see the partial folder


def shard_size(shard: ShardPlan) -> int:
    """A shard file's size on disk: its header (as the writer makes it) and every tensor's bytes."""
    entries = [(t.name, t.out_dtype, t.shape, t.out_nbytes) for t in shard.tensors]
    return len(safetensors_header(entries, {"format": "pt"})) + shard.nbytes


def shard_sources(plan: MergePlan) -> list[list[SourceRef]]:
    """Each shard's sources, their sha256s cut to the files that hold its tensors: a cached Hub file is hashed
    by the tasks that read it, not by every task. Files that hold no planned tensor go to the first shard's task,
    so every cached file is still verified once, as a one-machine merge verifies it."""
    per_shard = []
    for shard in plan.shards:
        refs = []
        for src, ck in zip(plan.sources, plan.checkpoints, strict=True):
            if not src.sha256:
                refs.append(src)
                continue
            used = {ck.tensors[t.name].file for t in shard.tensors}
            refs.append(replace(src, sha256={f: h for f, h in src.sha256.items() if f in used}))
        per_shard.append(refs)
    for k, src in enumerate(plan.sources):
        if src.sha256:
            covered = {f for refs in per_shard for f in (refs[k].sha256 or {})}
            rest = {f: h for f, h in src.sha256.items() if f not in covered}
            if rest:
                first = per_shard[0][k]
                per_shard[0][k] = replace(first, sha256={**(first.sha256 or {}), **rest})
    return per_shard


def write_shard(
    plan: MergePlan, index: int, sources: Sequence[SourceRef], folder: str, threads: int, output: str = "auto"
) -> ShardDone:
    """A Ray task: write shard ``index`` of ``plan`` and report it: into the driver's partial ``folder`` when this
    worker sees it, else (or with ``output="driver"``) into a folder of its own, returning the bytes.

    The shard is built in this attempt's own folder and renamed next to the others only when complete, so an
    attempt killed half way leaves nothing under the shard's name (its attempt folder is removed by the driver).
    """
    import torch

    partial = Path(folder)
    shard = plan.shards[index]
    visible = (partial / WRITER_FILE).is_file()
    if output == "shared" and not visible:
        raise OutputError(
            f"{partial}: the merge's partial output folder is not visible on this Ray worker (pid {os.getpid()}); "
            "--ray-output shared writes output.path from every worker: put it on a file system they all share, "
            "or use --ray-output auto to send the shards back to the driver",
            path=partial,
        )
    private = output == "driver" or not visible
    base = Path(tempfile.mkdtemp(prefix="hubmerge-shard-")) if private else partial
    names = {t.name for t in shard.tensors}
    stream = replace(plan.stream, order=[t for t in plan.stream.order if t.name in names]) if plan.stream else None
    sub = replace(plan, shards=[shard], sources=list(sources), stream=stream)
    p = replace(merge_pass(sub), chunk_elems=plan.chunk_elems)
    window = p.windows[0]
    attempt = base / f"{ATTEMPT_PREFIX}{shard.file}.{uuid.uuid4().hex[:8]}"
    attempt.mkdir()
    data = None
    try:
        device = check_device(plan.device)
        with torch_threads(threads):
            accs = [torch.empty(plan.chunk_elems, dtype=torch.float32, device=device)]
            with QUIET.bytes("", 0) as bar:
                hashes, checks, bytes_read = write_pass(p, {window.name: attempt}, accs, bar)
        crash_hook(shard.file)
        ((path, digest),) = hashes.items()
        size = path.stat().st_size
        if private:
            data = path.read_bytes()
        else:
            os.replace(path, partial / shard.file)
    finally:
        shutil.rmtree(base if private else attempt, ignore_errors=True)
    return ShardDone(shard.file, digest, size, dict(checks.in_sources), dict(checks.in_outputs), bytes_read, data)


def task_gpus(ray: Any, settings: RayOptions, device: str, memory: int = 0) -> float:
    """The GPUs each task asks for (default: 1 when accumulating on cuda); they, its CPUs and its ``memory`` are
    checked against the cluster's."""
    gpus = settings.gpus_per_task
    if gpus is None:
        gpus = 1 if device.startswith("cuda") else 0
    check_resources(ray, settings.cpus_per_task, gpus, memory)
    return gpus


def execute_on_ray(
    plan: MergePlan,
    settings: RayOptions | None = None,
    *,
    force: bool = False,
    display: Display = QUIET,
    threads: int = 1,
) -> MergeResult:
    """Carry out ``plan`` with one Ray task per output shard; the output appears at ``plan.output`` only when
    every shard came back and verified, bit-identical to :func:`~hubmerge.merging.executor.execute`'s."""
    settings = settings or RayOptions()
    began = time.perf_counter()
    note_dead_partials(remove_dead_partials(plan.output), display)
    out = OutputDir(plan.output, force=force)
    # the device is checked by each task, where the merge runs (the driver may have no GPU)
    with ray_session(settings.address) as ray, out as folder:
        done = run_tasks(ray, plan, settings, folder, display, threads)
        checks = NonFinite(plan.nonfinite, plan.sources)
        for d in done:
            checks.in_sources.update(d.in_sources)
            checks.in_outputs.update(d.in_outputs)
        for leftover in folder.glob(f"{ATTEMPT_PREFIX}*"):  # the attempts of killed workers
            shutil.rmtree(leftover, ignore_errors=True)
        record = checks.record(merge_pass(plan).windows[0])
        files = finish_output(plan, folder, {d.file: d.sha256 for d in done}, record)
        out.commit()
    for line in nonfinite_lines(record):
        display.note(f"warning: {line}")
    return MergeResult(plan.output, files, time.perf_counter() - began, plan.bytes_read, plan.bytes_written)


def run_tasks(
    ray: Any, plan: MergePlan, settings: RayOptions, folder: Path, display: Display, threads: int
) -> list[ShardDone]:
    """Submit one task per shard, wait for all, and check each shard on disk against what its task reported.

    The first task that fails for good cancels the rest (so none writes on into a folder about to be removed)
    and fails the merge: a hubmerge error raised in the task as it is (its exit code and message), anything
    else (a worker that died on every attempt) as one line naming the shard."""
    gpus = task_gpus(ray, settings, plan.device, plan.memory_estimate)
    remote = ray.remote(
        num_cpus=settings.cpus_per_task, num_gpus=gpus, memory=plan.memory_estimate, max_retries=RAY_RETRIES
    )(write_shard)
    plan_ref = ray.put(plan)
    futures = {
        remote.remote(plan_ref, k, sources, str(folder), threads, settings.output): shard
        for k, (shard, sources) in enumerate(zip(plan.shards, shard_sources(plan), strict=True))
    }
    names = {ref: f"shard {shard.file}" for ref, shard in futures.items()}
    done: dict[str, ShardDone] = {}
    with (
        display.count(f"merging on Ray: {len(futures)} shard tasks", len(futures)) as bar,
        contextlib.closing(results_as_done(ray, names, plan.output, "nothing was written")) as results,
    ):
        for ref, result in results:
            shard = futures[ref]
            if result.data is not None:  # from a worker that does not see the partial folder
                take_shard(folder, shard, result)
            check_shard(folder, shard, result)
            done[shard.file] = replace(result, data=None)  # the driver holds one shard's bytes at a time
            bar.advance(1)
    return [done[s.file] for s in plan.shards]


def take_shard(folder: Path, shard: ShardPlan, result: ShardDone) -> None:
    """Write a shard a task sent back as bytes into the partial folder (a full disk is one OutputError)."""
    atomic_write(folder / shard.file, result.data or b"")


def check_shard(folder: Path, shard: ShardPlan, result: ShardDone) -> None:
    """The driver's check of one task's shard: there, the size its header says, the sha256 the task reported."""
    path = folder / shard.file
    expected = shard_size(shard)
    if not path.is_file() or path.stat().st_size != expected or result.size != expected:
        raise ClusterError(
            f"shard {shard.file}: its Ray task reported it done, but {path} is not there with its {expected} bytes; "
            "nothing was written",
            path=path,
        )
    digest = sha256_file(path)
    if digest != result.sha256:
        raise ClusterError(
            f"shard {shard.file}: its sha256 on disk ({digest[:12]}...) is not the one its Ray task reported "
            f"({result.sha256[:12]}...); nothing was written",
            path=path,
        )
