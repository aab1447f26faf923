"""The stability report: every metric of each task along one series of models, and series side by side.

A :class:`StabilityReport` holds one ordered series (raw checkpoints, or the averages or ensembles of their
windows); a :class:`Comparison` lays raw, averaged and ensembled series side by side for tables, CSV, JSON and
plots. The metrics themselves are :mod:`hubmerge.stability.metrics`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hubmerge.errors import StabilityError
from hubmerge.io.files import atomic_write
from hubmerge.stability.metrics import (
    CITATION,
    METRICS,
    WindowStats,
    example_mean_total_variation,
    flip_rate,
    instability_score,
    mean_total_variation,
    score_series,
    window_stats,
)


@dataclass(frozen=True)
class ExampleArrays:
    """Per-example results of one task along the trajectory, each ``[m, n]`` (checkpoints × examples)."""

    correct: np.ndarray | None = None
    pred: np.ndarray | None = None
    gold_prob: np.ndarray | None = None
    present: np.ndarray | None = None

    def n_examples(self) -> int | None:
        arrays = [a for a in (self.correct, self.pred, self.gold_prob) if a is not None]
        shapes = {np.shape(a) for a in arrays}
        if len(shapes) > 1:
            raise StabilityError(f"per-example arrays disagree in shape: {sorted(shapes)}")
        return int(np.shape(arrays[0])[1]) if arrays else None


@dataclass(frozen=True)
class TaskStability:
    """Every metric for one task; ``None`` where the input had no per-example data, NaN where undefined (m = 1).

    ``std`` and ``range`` are the means over windows, ``worst_drop`` the worst over windows, ``mean`` the mean
    score over all points.
    """

    task: str
    metric: str
    n_points: int
    mean: float
    mtv: float
    std: float
    range: float
    worst_drop: float
    worst_drop_from: str | None
    worst_drop_to: str | None
    flip_rate: float | None = None
    gold_prob_mtv: float | None = None
    instability_score: float | None = None
    n_examples: int | None = None
    windows: tuple[WindowStats, ...] = ()


Point = tuple[str, int | float | None, Mapping[str, float]]


@dataclass(frozen=True)
class StabilityReport:
    """The metrics of each task along one ordered series of models (raw checkpoints, averages or ensembles)."""

    labels: tuple[str, ...]
    steps: tuple[float | None, ...]
    scores: dict[str, np.ndarray]
    tasks: dict[str, TaskStability]
    window: int | None = None
    stride: int = 1
    # The per-example arrays the metrics came from, kept for what needs examples later (the sweep's standard errors
    # and bootstrap intervals); not part of the report's tables, CSV or JSON.
    examples: Mapping[str, ExampleArrays] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        points: Sequence[Point],
        examples: Mapping[str, ExampleArrays] | None = None,
        *,
        tasks: Iterable[str] | None = None,
        metrics: Mapping[str, str] | None = None,
        window: int | None = None,
        stride: int = 1,
    ) -> StabilityReport:
        """Metrics per task from ``(label, step, {task: score})`` in training order, and optional per-example arrays.

        ``tasks`` defaults to the first point's tasks; every point must have a score for each. ``metrics`` names
        the score of each task (``acc``) for tables and plots. ``window``/``stride`` set the std/range/worst-drop
        windows (default: the whole series as one window).
        """
        if not points:
            raise StabilityError("no checkpoints; stability needs an ordered sequence of at least one")
        labels = tuple(str(p[0]) for p in points)
        steps = tuple(None if p[1] is None else float(p[1]) for p in points)
        names = list(points[0][2]) if tasks is None else list(tasks)
        examples = dict(examples or {})
        unknown = sorted(set(examples) - set(names))
        if unknown:
            raise StabilityError(f"per-example arrays for {', '.join(unknown)}, which have no task scores")
        scores: dict[str, np.ndarray] = {}
        out: dict[str, TaskStability] = {}
        for task in names:
            column = []
            for label, _, by_task in points:
                if task not in by_task:
                    raise StabilityError(
                        f"checkpoint {label} has no score for task {task!r}; evaluate it there or pass tasks= "
                        "without it"
                    )
                column.append(by_task[task])
            s = score_series(column, f"task {task!r}", labels)
            scores[task] = s
            out[task] = _task_stability(
                task, (metrics or {}).get(task, "score"), s, labels, examples.get(task), window, stride
            )
        return cls(labels, steps, scores, out, window, stride, examples)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per task (no per-window detail): what the CSV holds."""
        return [_row(ts) for ts in self.tasks.values()]

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN as ``None``), including each window's statistics."""
        return _jsonable(
            {
                "citation": CITATION,
                "labels": list(self.labels),
                "steps": list(self.steps),
                "window": self.window,
                "stride": self.stride,
                "scores": {k: v.tolist() for k, v in self.scores.items()},
                "tasks": [{**_row(ts), "windows": [w.__dict__ for w in ts.windows]} for ts in self.tasks.values()],
            }
        )

    def to_csv(self, path: str | Path) -> Path:
        return _write_csv(path, self.rows())

    def to_json(self, path: str | Path) -> Path:
        return _write_json(path, self.to_dict())


def _task_stability(
    task: str,
    metric: str,
    s: np.ndarray,
    labels: Sequence[str],
    ex: ExampleArrays | None,
    window: int | None,
    stride: int,
) -> TaskStability:
    wins = tuple(window_stats(s, window, stride))
    worst = max(wins, key=lambda w: w.worst_drop if not math.isnan(w.worst_drop) else -1.0)
    at = worst.worst_drop_at
    fields: dict[str, Any] = {}
    if ex is not None:
        n = ex.n_examples()
        for name, arr in (("correct", ex.correct), ("pred", ex.pred), ("gold_prob", ex.gold_prob)):
            if arr is not None and np.shape(arr)[0] != s.size:
                raise StabilityError(
                    f"task {task!r}: {name} has {np.shape(arr)[0]} checkpoints but there are {s.size} scores"
                )
        if ex.correct is not None:
            fields["flip_rate"] = flip_rate(ex.correct, ex.present)
        if ex.gold_prob is not None:
            fields["gold_prob_mtv"] = example_mean_total_variation(ex.gold_prob, ex.present)
        if ex.pred is not None:
            fields["instability_score"] = instability_score(ex.pred, ex.present)
        fields["n_examples"] = n
    return TaskStability(
        task=task,
        metric=metric,
        n_points=int(s.size),
        mean=float(s.mean()),
        mtv=mean_total_variation(s),
        std=float(np.mean([w.std for w in wins])),
        range=float(np.mean([w.range for w in wins])),
        worst_drop=worst.worst_drop,
        worst_drop_from=None if at is None else labels[at],
        worst_drop_to=None if at is None else labels[at + 1],
        windows=wins,
        **fields,
    )


def _row(ts: TaskStability) -> dict[str, Any]:
    return {k: v for k, v in ts.__dict__.items() if k != "windows"}


# --- raw vs averaged vs ensembled -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """The same metrics for the raw trajectory and for each window size of averages and ensembles."""

    raw: StabilityReport
    averaged: dict[int, StabilityReport] = field(default_factory=dict)
    ensembled: dict[int, StabilityReport] = field(default_factory=dict)

    def series(self) -> list[tuple[str, int, StabilityReport]]:
        """``(method, window size, report)``, raw first (window size 1), then by window size."""
        out = [("raw", 1, self.raw)]
        out += [("average", w, r) for w, r in sorted(self.averaged.items())]
        out += [("ensemble", w, r) for w, r in sorted(self.ensembled.items())]
        return out

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one row per (task, method, window size)."""
        return [
            {"task": row.pop("task"), "method": method, "window_size": w, **row}
            for method, w, report in self.series()
            for row in report.rows()
        ]

    def wide(self, metric: str = "mtv") -> list[dict[str, Any]]:
        """One row per task, one column per series (``raw``, ``average w=4``, ...): the side-by-side table."""
        if metric not in METRICS:
            raise StabilityError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        out: dict[str, dict[str, Any]] = {}
        for method, w, report in self.series():
            column = "raw" if method == "raw" else f"{method} w={w}"
            for task, ts in report.tasks.items():
                out.setdefault(task, {"task": task})[column] = getattr(ts, metric)
        return list(out.values())

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "citation": CITATION,
                "rows": self.rows(),
                "series": [{"method": m, "window_size": w, **r.to_dict()} for m, w, r in self.series()],
            }
        )

    def to_csv(self, path: str | Path) -> Path:
        return _write_csv(path, self.rows())

    def to_json(self, path: str | Path) -> Path:
        return _write_json(path, self.to_dict())


def compare(
    raw: StabilityReport | Sequence[Point],
    averaged: Mapping[int, StabilityReport | Sequence[Point]] | None = None,
    ensembled: Mapping[int, StabilityReport | Sequence[Point]] | None = None,
) -> Comparison:
    """Lay raw, windowed-average and windowed-ensemble series side by side; point lists are built with defaults."""

    def report(x: StabilityReport | Sequence[Point]) -> StabilityReport:
        return x if isinstance(x, StabilityReport) else StabilityReport.build(x)

    for name, d in (("averaged", averaged), ("ensembled", ensembled)):
        for w in d or {}:
            if int(w) < 1:
                raise StabilityError(f"{name}: window size {w} must be at least 1")
    return Comparison(
        report(raw),
        {int(w): report(r) for w, r in (averaged or {}).items()},
        {int(w): report(r) for w, r in (ensembled or {}).items()},
    )


# --- output -----------------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """NaN/inf to ``None`` (JSON has no NaN), numpy scalars to Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(v) if isinstance(v, float) else v


def _write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    return atomic_write(path, text.getvalue())


def _write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
