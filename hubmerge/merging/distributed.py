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

Limits: the output path must be on a file system every worker shares (a worker that cannot see the partial
folder fails with one line), and ``fetch: stream`` sources are not distributed (use the HF cache).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hubmerge.errors import (
    HubmergeError,
    InvalidValueError,
    MissingExtraError,
    OutputError,
    RayMergeError,
    RecipeError,
)
from hubmerge.io.checkpoint import SourceRef
from hubmerge.io.env import kept_signal_handlers, torch_threads
from hubmerge.io.files import sha256_file
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

# Attempts of one shard's task: the first and one retry (a task that fails twice fails the run).
RAY_RETRIES = 1
# Inside the partial folder: one folder per task attempt, removed when its shard is in place.
ATTEMPT_PREFIX = ".ray-attempt-"
# Test-only fault hook: a folder; a task whose shard has a file ``crash-once-SHARD`` there renames it away and
# kills its worker (``os._exit``), ``crash-always-SHARD`` kills every attempt. Unset (always, outside tests): no-op.
CRASH_HOOK_ENV = "HUBMERGE_TEST_RAY_CRASH_DIR"


@dataclass(frozen=True)
class RayMerge:
    """Where and how a merge runs on Ray: the cluster (None: ``RAY_ADDRESS`` or a new local instance) and what each
    shard's task asks the scheduler for (memory: the plan's own bound, ``MergePlan.memory_estimate``)."""

    address: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: 1 when the merge accumulates on cuda, else 0

    def __post_init__(self) -> None:
        if self.cpus_per_task <= 0:
            raise InvalidValueError(f"--ray-cpus-per-task {self.cpus_per_task:g}: give a number above 0")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise InvalidValueError(f"--ray-gpus-per-task {self.gpus_per_task:g}: give 0 or more")


@dataclass(frozen=True)
class ShardDone:
    """What a task reports of its shard: the file, its sha256 and size, the non-finite counts, the bytes read."""

    file: str
    sha256: str
    size: int
    in_sources: dict[tuple[int, str], int]
    in_outputs: dict[tuple[str, str], int]
    bytes_read: int


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


def crash_hook(shard: str) -> None:
    """The test-only fault hook (see ``CRASH_HOOK_ENV``): kill this worker the way a lost node would."""
    folder = os.environ.get(CRASH_HOOK_ENV)
    if not folder:
        return
    once = Path(folder) / f"crash-once-{shard}"
    try:
        once.rename(once.with_name(once.name + ".done"))  # atomic: exactly one attempt takes it
    except OSError:
        pass
    else:
        os._exit(1)
    if (Path(folder) / f"crash-always-{shard}").exists():
        os._exit(1)


def write_shard(plan: MergePlan, index: int, sources: Sequence[SourceRef], folder: str, threads: int) -> ShardDone:
    """A Ray task: write shard ``index`` of ``plan`` into the driver's partial ``folder`` and report it.

    The shard is built in this attempt's own folder and renamed next to the others only when complete, so an
    attempt killed half way leaves nothing under the shard's name (its attempt folder is removed by the driver).
    """
    import torch

    partial = Path(folder)
    shard = plan.shards[index]
    if not (partial / WRITER_FILE).is_file():
        raise OutputError(
            f"{partial}: the merge's partial output folder is not visible on this Ray worker (pid {os.getpid()}); "
            "--ray writes output.path from every worker: put it on a file system they all share",
            path=partial,
        )
    sub = replace(plan, shards=[shard], sources=list(sources), stream=None)
    p = replace(merge_pass(sub), chunk_elems=plan.chunk_elems)
    window = p.windows[0]
    attempt = partial / f"{ATTEMPT_PREFIX}{shard.file}.{uuid.uuid4().hex[:8]}"
    attempt.mkdir()
    try:
        device = check_device(plan.device)
        with torch_threads(threads):
            accs = [torch.empty(plan.chunk_elems, dtype=torch.float32, device=device)]
            with QUIET.bytes("", 0) as bar:
                hashes, checks, bytes_read = write_pass(p, {window.name: attempt}, accs, bar)
        crash_hook(shard.file)
        ((path, digest),) = hashes.items()
        size = path.stat().st_size
        os.replace(path, partial / shard.file)
    finally:
        shutil.rmtree(attempt, ignore_errors=True)
    return ShardDone(shard.file, digest, size, dict(checks.in_sources), dict(checks.in_outputs), bytes_read)


def import_ray() -> Any:
    """Ray, or one line saying it is an optional extra."""
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError("--ray needs Ray, an optional extra: pip install 'hubmerge[ray]'") from e
    return ray


def refuse_stream(stream: object) -> None:
    """``--ray`` reads sources from disk on every worker: a streamed plan (its reader holds the driver's Hub
    session) is refused in one line rather than shipped to workers that could not use it."""
    if stream is not None:
        raise RecipeError(
            "--ray merges sources every worker reads from disk; fetch: stream is not distributed: use --cache "
            "(the HF cache) or local folders",
            field="sources.fetch",
        )


def task_gpus(ray: Any, settings: RayMerge, device: str) -> float:
    """The GPUs each task asks for (default: 1 when accumulating on cuda); asking for more CPUs or GPUs per task
    than the whole cluster has is one line, since Ray would wait for them for ever."""
    gpus = settings.gpus_per_task
    if gpus is None:
        gpus = 1 if device.startswith("cuda") else 0
    cluster = ray.cluster_resources()
    for flag, asked, kind in (
        ("--ray-cpus-per-task", settings.cpus_per_task, "CPU"),
        ("--ray-gpus-per-task", gpus, "GPU"),
    ):
        if asked > cluster.get(kind, 0):
            raise InvalidValueError(
                f"{flag} {asked:g}: the Ray cluster has {cluster.get(kind, 0):g} {kind}s in all, so no task could start"
            )
    return gpus


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, started for this command unless the caller already did (then it is the caller's to shut down); the
    process's own Ctrl-C and SIGTERM handlers are kept, so an interruption still cleans up partial folders."""
    ray = import_ray()
    started = not ray.is_initialized()
    with kept_signal_handlers():
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()


def execute_on_ray(
    plan: MergePlan,
    settings: RayMerge | None = None,
    *,
    force: bool = False,
    display: Display = QUIET,
    threads: int = 1,
) -> MergeResult:
    """Carry out ``plan`` with one Ray task per output shard; the output appears at ``plan.output`` only when
    every shard came back and verified, bit-identical to :func:`~hubmerge.merging.executor.execute`'s."""
    settings = settings or RayMerge()
    refuse_stream(plan.stream)
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
    ray: Any, plan: MergePlan, settings: RayMerge, folder: Path, display: Display, threads: int
) -> list[ShardDone]:
    """Submit one task per shard, wait for all, and check each shard on disk against what its task reported.

    The first task that fails for good cancels the rest (so none writes on into a folder about to be removed)
    and fails the merge: a hubmerge error raised in the task as it is (its exit code and message), anything
    else (a worker that died on every attempt) as one line naming the shard."""
    gpus = task_gpus(ray, settings, plan.device)
    remote = ray.remote(
        num_cpus=settings.cpus_per_task, num_gpus=gpus, memory=plan.memory_estimate, max_retries=RAY_RETRIES
    )(write_shard)
    plan_ref = ray.put(plan)
    futures = {
        remote.remote(plan_ref, k, sources, str(folder), threads): shard
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
            check_shard(folder, shard, result)
            done[shard.file] = result
            bar.advance(1)
    return [done[s.file] for s in plan.shards]


def results_as_done(ray: Any, names: dict[Any, str], path: Path, written: str) -> Iterator[tuple[Any, Any]]:
    """``(ref, result)`` of each task as it finishes. The first task that fails for good stops the rest (so none
    writes on into a folder about to be removed) and fails the run: a hubmerge error raised in the task as it is
    (its exit code and message), anything else (a worker that died on every attempt) as one line naming the task
    (``names[ref]``) and ending with ``written``, what was left. Closing the generator early (the caller's own
    check failed) stops the tasks still running too."""
    pending = list(names)
    try:
        while pending:
            try:
                ready, pending = ray.wait(pending, num_returns=1)
            except BaseException:  # Ctrl-C, SIGTERM: the partial folders go; no task may write on into them
                for ref in pending:
                    ray.cancel(ref, force=True)
                pending = []
                raise
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                stop_tasks(ray, pending)
                pending = []
                cause = getattr(e, "cause", None)
                if isinstance(cause, HubmergeError):
                    raise cause from None
                what = str(cause or e).strip().splitlines()
                how = (
                    "raised"  # an error of the task's own: not retried, it would raise again
                    if isinstance(e, ray.exceptions.RayTaskError)
                    else f"failed on all {RAY_RETRIES + 1} attempts"
                )
                raise RayMergeError(
                    f"{names[ready[0]]}: its Ray task {how} ({type(cause or e).__name__}: "
                    f"{what[-1] if what else 'no message'}); {written}",
                    path=path,
                ) from None
            yield ready[0], result
    finally:
        if pending:
            stop_tasks(ray, pending)


def stop_tasks(ray: Any, pending: list[Any]) -> None:
    """Cancel the tasks still running and wait for them to end, so that none writes into the partial folder
    after the driver removes it (and Ray has no unread failure to print when their references go)."""
    for ref in pending:
        ray.cancel(ref, force=True)
    for ref in pending:
        with contextlib.suppress(Exception):  # cancelled, or it finished first: either way it is done
            ray.get(ref, timeout=60)


def check_shard(folder: Path, shard: ShardPlan, result: ShardDone) -> None:
    """The driver's check of one task's shard: there, the size its header says, the sha256 the task reported."""
    path = folder / shard.file
    expected = shard_size(shard)
    if not path.is_file() or path.stat().st_size != expected or result.size != expected:
        raise RayMergeError(
            f"shard {shard.file}: its Ray task reported it done, but {path} is not there with its {expected} bytes; "
            "is output.path on a file system the workers share? nothing was written",
            path=path,
        )
    digest = sha256_file(path)
    if digest != result.sha256:
        raise RayMergeError(
            f"shard {shard.file}: its sha256 on disk ({digest[:12]}...) is not the one its Ray task reported "
            f"({result.sha256[:12]}...); nothing was written",
            path=path,
        )
