"""How unstable downstream scores are along a pretraining trajectory: pure numpy, no model, no I/O but the report.

The metrics follow Nishida, Isonuma & Oda, *Instability in Downstream Task Performance During LLM
Pretraining* (Findings of EMNLP 2025, arXiv:2510.04848). For checkpoints θ_1..θ_m in training order (or the
averaged / ensembled models built from windows of them, in the same order):

- task-level mean total variation of a task score s:
  ``MTV = 1/(m-1) · Σ_{t=1}^{m-1} |s(θ_{t+1}) - s(θ_t)|``;
- example-level MTV of a per-example value v_i (correctness 0/1, or the gold choice's probability):
  ``MTV_ex = 1/(m-1) · Σ_t mean_i |v_i(θ_{t+1}) - v_i(θ_t)|``. On 0/1 correctness this is the *flip rate*:
  the share of examples whose correctness changes from one checkpoint to the next, averaged over the m-1 steps;
- instability score, reference-free (gold labels are not used):
  ``IS = 1/(m-1) · Σ_t (1 - sim(pred(θ_t), pred(θ_{t+1})))`` with sim = exact match of the predicted choice,
  i.e. the share of examples whose answer changes. It also counts a switch between two wrong answers, which
  the flip rate does not;
- within each window of w consecutive points (windows start at 0, s, 2s, ... and end inside the series; a tail
  shorter than w is not a window of its own): the mean score, the population standard deviation
  ``sqrt(1/w · Σ (s_t - mean)^2)`` (the spread of the w scores observed, not an estimate of a wider
  population, so ddof = 0), the range ``max - min``, and the worst drop ``max(0, max_t (s_t - s_{t+1}))``,
  the largest fall from one point to the next (0 when the score never falls; ties go to the earliest).

Edge cases, decided once for every function here:

- m = 1: nothing moved, so MTV, IS, flip rate, standard deviation, range and worst drop are undefined and
  returned as NaN (never 0, so that a single point cannot look "perfectly stable"); the report writes them as
  an empty CSV cell and JSON ``null``. m = 0 raises.
- NaN or infinite scores are refused with :class:`~hubmerge.errors.StabilityError` naming the checkpoint: a NaN
  is a failed evaluation, and silently skipping it would shorten the trajectory without telling anyone.
- Missing examples are marked explicitly with a ``present[m, n]`` mask (:func:`align_examples` builds it from
  per-checkpoint dicts keyed by example id). Each consecutive pair (t, t+1) is averaged over the examples
  present at both t and t+1 (pairwise, not the intersection over all checkpoints, which would drop an example
  from every step because one checkpoint lacks it). A pair with no example in common is refused.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StabilityError

CITATION = (
    "Nishida, Isonuma & Oda (2025), Instability in Downstream Task Performance During LLM Pretraining, "
    "Findings of EMNLP 2025, arXiv:2510.04848"
)
METRICS = ("mean", "mtv", "std", "range", "worst_drop", "flip_rate", "gold_prob_mtv", "instability_score")


# --- validation -------------------------------------------------------------------------------------------------


def _where(labels: Sequence[str] | None, t: int) -> str:
    return f"checkpoint {t} ({labels[t]})" if labels is not None and t < len(labels) else f"checkpoint {t}"


def _array(values: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise StabilityError(f"{what}: not a rectangular array of numbers ({e})") from e


def _series(
    scores: Sequence[float] | np.ndarray, what: str = "scores", labels: Sequence[str] | None = None
) -> np.ndarray:
    """A 1-d float64 array of finite scores; NaN and inf refused with the checkpoint named."""
    arr = _array(scores, what)
    if arr.ndim != 1:
        raise StabilityError(f"{what}: expected one score per checkpoint (1-d), got shape {arr.shape}")
    if arr.size == 0:
        raise StabilityError(f"{what}: no checkpoints; stability needs an ordered sequence of at least one score")
    bad = ~np.isfinite(arr)
    if bad.any():
        t = int(np.argmax(bad))
        raise StabilityError(
            f"{what}: score {arr[t]} at {_where(labels, t)} is not a number; a NaN is a failed evaluation: "
            "re-evaluate that checkpoint or leave it out of the trajectory"
        )
    return arr


def _per_example(
    values: Sequence[Sequence[float]] | np.ndarray, present: np.ndarray | None, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """``values[m, n]`` and the ``present[m, n]`` mask; a NaN where an example is present is refused."""
    arr = _array(values, what)
    if arr.ndim != 2:
        raise StabilityError(f"{what}: expected a 2-d array [checkpoints, examples], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise StabilityError(f"{what}: no checkpoints or no examples (shape {arr.shape})")
    mask = np.ones(arr.shape, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if mask.shape != arr.shape:
        raise StabilityError(f"{what}: present mask has shape {mask.shape} but values have shape {arr.shape}")
    bad = mask & ~np.isfinite(arr)
    if bad.any():
        t, i = (int(x) for x in np.argwhere(bad)[0])
        raise StabilityError(
            f"{what}: value {arr[t, i]} at checkpoint {t}, example {i} is not a number; mark examples that a "
            "checkpoint lacks with the present mask (align_examples builds it) instead of NaN"
        )
    return arr, mask


def _pairwise_mean(changed: np.ndarray, mask: np.ndarray, what: str) -> float:
    """1/(m-1) Σ_t mean over examples present at t and t+1 of ``changed[t]`` (``changed`` is [m-1, n])."""
    m = mask.shape[0]
    if m == 1:
        return math.nan
    both = mask[:-1] & mask[1:]
    terms = []
    for t in range(m - 1):
        if not both[t].any():
            raise StabilityError(
                f"{what}: checkpoints {t} and {t + 1} have no example in common, so nothing can be compared; "
                "check that both were evaluated on the same task data"
            )
        terms.append(changed[t][both[t]].mean())
    return float(np.mean(terms))


# --- metrics ----------------------------------------------------------------------------------------------------


def mean_total_variation(scores: Sequence[float] | np.ndarray, labels: Sequence[str] | None = None) -> float:
    """Task-level MTV = 1/(m-1) Σ_t |s(θ_{t+1}) - s(θ_t)|; NaN for a single checkpoint."""
    s = _series(scores, labels=labels)
    return float(np.mean(np.abs(np.diff(s)))) if s.size > 1 else math.nan


def example_mean_total_variation(
    values: Sequence[Sequence[float]] | np.ndarray, present: np.ndarray | None = None
) -> float:
    """Example-level MTV of ``values[m, n]`` (checkpoints × examples), pairwise over present examples."""
    arr, mask = _per_example(values, present, "example values")
    with np.errstate(invalid="ignore"):
        changed = np.abs(np.diff(arr, axis=0))
    return _pairwise_mean(changed, mask, "example values")


def flip_rate(correct: Sequence[Sequence[float]] | np.ndarray, present: np.ndarray | None = None) -> float:
    """Share of examples whose correctness flips between consecutive checkpoints: example-level MTV on 0/1."""
    arr, mask = _per_example(correct, present, "correctness")
    if not np.isin(arr[mask], (0.0, 1.0)).all():
        raise StabilityError("correctness: expected 0 or 1 per example; pass gold-choice probabilities separately")
    return example_mean_total_variation(arr, mask)


def instability_score(pred: Sequence[Sequence[int]] | np.ndarray, present: np.ndarray | None = None) -> float:
    """IS = 1/(m-1) Σ_t (1 - exact-match(pred_t, pred_{t+1})): share of examples whose predicted choice changes."""
    arr, mask = _per_example(pred, present, "predictions")
    if (arr[mask] != np.round(arr[mask])).any() or (arr[mask] < 0).any():
        raise StabilityError("predictions: expected the predicted choice's index (an integer >= 0) per example")
    return _pairwise_mean(arr[1:] != arr[:-1], mask, "predictions")


def gold_probability(ll: np.ndarray, gold: Sequence[int] | np.ndarray) -> np.ndarray:
    """p(gold) under the softmax over each example's choices of their log-likelihoods (NaN pads absent choices).

    Equal log-likelihoods share the probability equally, so ties need no rule here.
    """
    from .ensemble import softmax_choices  # the same softmax the probability ensemble uses

    p = softmax_choices(ll)
    gold = np.asarray(gold, dtype=np.int64)
    if gold.shape != (p.shape[0],):
        raise StabilityError(f"gold: expected one index per example ({p.shape[0]}), got shape {gold.shape}")
    rows = np.arange(len(gold))
    if (gold < 0).any() or (gold >= p.shape[1]).any() or np.isnan(np.asarray(ll, dtype=np.float64)[rows, gold]).any():
        raise StabilityError("gold: an index points outside its example's choices")
    return p[rows, gold]


def align_examples(
    per_checkpoint: Sequence[Mapping[Hashable, float]],
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """``(ids, values[m, n], present[m, n])`` from one ``{example_id: value}`` dict per checkpoint.

    Ids are the union over checkpoints, in first-seen order; an id a checkpoint lacks is marked absent.
    """
    ids: dict[Hashable, int] = {}
    for d in per_checkpoint:
        for k in d:
            ids.setdefault(k, len(ids))
    values = np.zeros((len(per_checkpoint), len(ids)), dtype=np.float64)
    present = np.zeros(values.shape, dtype=bool)
    for t, d in enumerate(per_checkpoint):
        for k, v in d.items():
            values[t, ids[k]] = v
            present[t, ids[k]] = True
    return list(ids), values, present


def from_example_rows(rows: Sequence[Sequence[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """``(values[m, n], present[m, n])`` from one row per example holding its value at each checkpoint.

    This is the orientation ``evaluate`` modules receive (a row per example); ``None`` marks a checkpoint that
    lacks the example.
    """
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise StabilityError(f"every example needs one value per checkpoint; rows have lengths {sorted(lengths)}")
    if not rows or not lengths or 0 in lengths:
        raise StabilityError("no examples or no checkpoints")
    present = np.array([[v is not None for v in r] for r in rows], dtype=bool).T
    values = np.array([[0.0 if v is None else v for v in r] for r in rows], dtype=np.float64).T
    return values, present


@dataclass(frozen=True)
class WindowStats:
    """Score statistics of points ``start .. stop-1``; ``worst_drop_at`` is t of the worst fall t → t+1."""

    start: int
    stop: int
    mean: float
    std: float
    range: float
    worst_drop: float
    worst_drop_at: int | None


def worst_drop(scores: Sequence[float] | np.ndarray) -> tuple[float, int | None]:
    """``(max(0, max_t s_t - s_{t+1}), t)``; ``(0.0, None)`` if the score never falls, NaN for one point."""
    s = _series(scores)
    if s.size == 1:
        return math.nan, None
    falls = s[:-1] - s[1:]
    t = int(np.argmax(falls))  # first maximum: ties go to the earliest fall
    return (float(falls[t]), t) if falls[t] > 0 else (0.0, None)


def window_stats(scores: Sequence[float] | np.ndarray, window: int | None = None, stride: int = 1) -> list[WindowStats]:
    """Mean, population std, range and worst drop in each window of ``window`` points, starts 0, s, 2s, ...

    ``window=None`` (or one longer than the series) is the whole series as a single window.
    """
    s = _series(scores)
    m = s.size
    w = m if window is None else int(window)
    if w < 2 and m > 1 or stride < 1:
        raise StabilityError(
            f"window {window}, stride {stride}: a window needs at least 2 points (one point has no spread) "
            "and the stride at least 1"
        )
    w = min(w, m)
    out = []
    for start in range(0, m - w + 1, stride):
        x = s[start : start + w]
        drop, at = worst_drop(x)
        spread = w > 1
        out.append(
            WindowStats(
                start=start,
                stop=start + w,
                mean=float(x.mean()),
                std=float(x.std()) if spread else math.nan,
                range=float(x.max() - x.min()) if spread else math.nan,
                worst_drop=drop,
                worst_drop_at=None if at is None else start + at,
            )
        )
    return out


# --- the report -------------------------------------------------------------------------------------------------


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
            s = _series(column, f"task {task!r}", labels)
            scores[task] = s
            out[task] = _task_stability(
                task, (metrics or {}).get(task, "score"), s, labels, examples.get(task), window, stride
            )
        return cls(labels, steps, scores, out, window, stride)

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
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    return path


def _write_json(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
