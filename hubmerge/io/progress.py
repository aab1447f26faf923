"""What the user sees while work runs: progress bars (bytes, tensors, examples) and one-line notes, on stderr.

A :class:`Display` is made once, at the CLI, and handed down instead of ``quiet``/``console`` pairs: engines
ask it for a bar or print a note, and a quiet display turns both into no-ops. ``QUIET`` is the display of
library calls that did not ask for output.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


_BYTE_COLUMNS = (
    TextColumn("[bold]{task.description}"),
    BarColumn(),
    DownloadColumn(binary_units=False),
    TransferSpeedColumn(),
    TimeRemainingColumn(),
)
_COUNT_COLUMNS = (
    TextColumn("[bold]{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
    TextColumn("{task.fields[status]}"),
)


@dataclass(frozen=True)
class Display:
    """Where progress and notes go (``console``, default stderr), or nowhere (``quiet``)."""

    quiet: bool = False
    console: Console | None = None

    @property
    def out(self) -> Console:
        return self.console or Console(stderr=True)

    def note(self, text: str) -> None:
        """One line for the user (a notice, a summary of what is about to happen); nothing when quiet."""
        if not self.quiet:
            self.out.print(text, highlight=False, soft_wrap=True)

    @contextmanager
    def bytes(self, description: str, total: int) -> Iterator[Reporter]:
        """A bar over bytes, with throughput, for reading, merging and downloading."""
        with self._bar(_BYTE_COLUMNS, description, total) as bar:
            yield bar

    @contextmanager
    def count(self, description: str, total: int | None) -> Iterator[Reporter]:
        """A bar over counted things: tensors, training steps, examples; ``update(status=...)`` adds a note."""
        with self._bar(_COUNT_COLUMNS, description, total, status="") as bar:
            yield bar

    @contextmanager
    def _bar(self, columns: tuple[Any, ...], description: str, total: int | None, **fields: Any) -> Iterator[Reporter]:
        if self.quiet:
            yield Reporter(None, None)
            return
        with Progress(*columns, console=self.out, transient=False) as progress:
            yield Reporter(progress, progress.add_task(description, total=total, **fields))

    def quieter(self, quiet: bool) -> Display:
        """This display, silenced as well when ``quiet``."""
        return Display(True, self.console) if quiet and not self.quiet else self


QUIET = Display(quiet=True)


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
