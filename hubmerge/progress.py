"""Progress bars for long work (bytes, tensors, examples), silenced by ``--quiet``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class Reporter:
    """A thin handle on one rich progress task; every method is a no-op when quiet."""

    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **kwargs)


@contextmanager
def byte_progress(description: str, total: int, *, quiet: bool = False, console: Console | None = None):
    """A bar over bytes, with throughput, for reading, merging and downloading."""
    if quiet:
        yield Reporter(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        yield Reporter(progress, progress.add_task(description, total=total))


@contextmanager
def count_progress(description: str, total: int | None, *, quiet: bool = False, console: Console | None = None):
    """A bar over counted things: tensors, training steps, examples."""
    if quiet:
        yield Reporter(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        yield Reporter(progress, progress.add_task(description, total=total, status=""))


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers draws its own "Loading weights" / "Writing model shards" bars; ours are the bars."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
