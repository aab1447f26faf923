"""Ray, for every command that runs on a cluster: the session, the resources a task asks for, and its results.

Merges (one task per output shard), sweeps (one task per pass, which builds and scores its windows) and
evaluations (one task per model and task) all submit their tasks and read them back through
:func:`results_as_done`, so a task that fails for good fails the command the same way: a hubmerge error raised
in the task as it is (its message and exit code), anything else (a worker that died on every attempt, an error
of Ray's or of a library) as one :class:`~hubmerge.errors.ClusterError` line naming the task, with the tasks still
running cancelled so none writes on into an output about to be removed.

Ray stays the optional extra ``hubmerge[ray]``: this module imports it only when a command asks for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubmerge.errors import ClusterError, HubmergeError, InvalidValueError, MissingExtraError
from hubmerge.io.env import kept_signal_handlers
from hubmerge.io.sizes import format_size

# Attempts of one task after the first: a task that fails twice fails the run.
RAY_RETRIES = 1
# Test-only fault hook: a folder; a task named NAME finding a file ``crash-once-NAME`` there renames it away and
# kills its worker (``os._exit``), ``crash-always-NAME`` kills every attempt. Unset (always, outside tests): no-op.
CRASH_HOOK_ENV = "HUBMERGE_TEST_RAY_CRASH_DIR"
OUTPUT_MODES = ("auto", "shared", "driver")


@dataclass(frozen=True)
class RayOptions:
    """Where and how a command runs on Ray: the cluster (None: ``RAY_ADDRESS`` or a new local instance) and what
    each task asks the scheduler for. ``output``: where the workers put what they write: ``auto``, the output path
    where a worker sees it and back to the driver where it does not; ``shared``, the output path (a worker that
    cannot see it fails); ``driver``, always back to the driver."""

    address: str | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None  # None: the command's default (1 on a GPU cluster for the GPU work)
    output: str = "auto"

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_MODES:
            raise InvalidValueError(f"--ray-output {self.output}: give one of {', '.join(OUTPUT_MODES)}")
        if self.cpus_per_task <= 0:
            raise InvalidValueError(f"--ray-cpus-per-task {self.cpus_per_task:g}: give a number above 0")
        if self.gpus_per_task is not None and self.gpus_per_task < 0:
            raise InvalidValueError(f"--ray-gpus-per-task {self.gpus_per_task:g}: give 0 or more")


def import_ray() -> Any:
    """Ray, or one line saying it is an optional extra."""
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError("--ray needs Ray, an optional extra: pip install 'hubmerge[ray]'") from e
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, started for this command unless the caller already did (then it is the caller's to shut down); the
    process's own Ctrl-C and SIGTERM handlers are kept, so an interruption still cleans up partial folders."""
    ray = import_ray()
    started = not ray.is_initialized()
    with kept_signal_handlers():
        if started:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            except Exception as e:  # noqa: BLE001 - Ray's own errors (no cluster there, refused auth) are not typed
                where = f"the Ray cluster at {address}" if address else "a Ray cluster (RAY_ADDRESS, or a local one)"
                what = str(e).strip().splitlines()
                raise ClusterError(
                    f"could not start or join {where} ({type(e).__name__}: {what[0] if what else 'no message'}); "
                    "check the address, and that this machine may join it (Ray's token authentication: "
                    "RAY_AUTH_TOKEN or RAY_AUTH_MODE)"
                ) from None
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()


def check_resources(ray: Any, cpus: float, gpus: float, memory: int = 0) -> None:
    """Asking for more CPUs, GPUs or memory per task than the whole cluster has is one line, since Ray would wait
    for them for ever. (Memory is Ray's logical resource, what each node offers tasks; a task's is its bound.)"""
    cluster = ray.cluster_resources()
    for flag, asked, kind in (("--ray-cpus-per-task", cpus, "CPU"), ("--ray-gpus-per-task", gpus, "GPU")):
        if asked > cluster.get(kind, 0):
            raise InvalidValueError(
                f"{flag} {asked:g}: the Ray cluster has {cluster.get(kind, 0):g} {kind}s in all, so no task could start"
            )
    offered = cluster.get("memory", 0)
    if memory > offered:
        raise InvalidValueError(
            f"each task needs about {format_size(memory)} of memory, and the Ray cluster offers "
            f"{format_size(offered)} in all, so no task could start; use machines with more memory or lower the "
            "bound (output.max_shard_size for a merge, sweep.max_windows_on_disk for a sweep)"
        )


def cluster_gpus(ray: Any) -> float:
    """The GPUs the whole cluster has (0 on a CPU-only one)."""
    return float(ray.cluster_resources().get("GPU", 0))


def crash_hook(name: str) -> None:
    """The test-only fault hook (see ``CRASH_HOOK_ENV``): kill this worker the way a lost node would."""
    folder = os.environ.get(CRASH_HOOK_ENV)
    if not folder:
        return
    once = Path(folder) / f"crash-once-{name}"
    try:
        once.rename(once.with_name(once.name + ".done"))  # atomic: exactly one attempt takes it
    except OSError:
        pass
    else:
        os._exit(1)
    if (Path(folder) / f"crash-always-{name}").exists():
        os._exit(1)


def results_as_done(
    ray: Any, names: dict[Any, str], path: Path | None, written: str, retries: int = RAY_RETRIES
) -> Iterator[tuple[Any, Any]]:
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
                    else f"failed on all {retries + 1} attempts"
                )
                raise ClusterError(
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
