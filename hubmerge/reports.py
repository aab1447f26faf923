"""Stability reports from the places scores live: lm-evaluation-harness result files and the results store.

The metrics themselves are pure functions in :mod:`hubmerge.stability`; this module gathers the score
series, builds the reports, and writes the table (CSV/JSON) and the plots (PNG/SVG) side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StabilityError

# Chance levels of common tasks, drawn as dotted lines so near-chance wobble is recognisable.
CHANCE = {
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "sciq": 0.25,
    "openbookqa": 0.25,
    "hellaswag": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "boolq": 0.5,
}


@dataclass
class StabilityOutput:
    """What ``hubmerge stability`` computed and where it wrote it."""

    comparison: Any  # stability.Comparison
    source: str
    model: str | None
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _in_range(step: float | None, since: int | None, until: int | None) -> bool:
    if step is None:
        return since is None and until is None
    return (since is None or step >= since) and (until is None or step <= until)


def stability_from_lm_eval(
    where: str | Path | Iterable[str | Path],
    *,
    tasks: Sequence[str] | None = None,
    metric: str | Sequence[str] = ("acc",),
    since: int | None = None,
    until: int | None = None,
    window: int | None = None,
    stride: int = 1,
    out: str | Path | None = None,
    title: str | None = None,
) -> StabilityOutput:
    """Raw-trajectory stability from lm-eval result files (aggregate scores only: no per-example metrics).

    Averaged and ensembled series need per-example scores of merged models and of each checkpoint; those
    come from the results store (``hubmerge eval`` / ``hubmerge sweep``), not from aggregate files.
    """
    from .lm_eval_results import load_results
    from .stability import StabilityReport, compare

    traj = load_results(where, metric, tasks=tasks)
    points = [p for p in traj.points() if _in_range(p[1], since, until)]
    if not points:
        raise StabilityError(f"no result files with steps in [{since}, {until}]; widen --since/--until")
    report = StabilityReport.build(points, metrics=traj.metric, window=window, stride=stride)
    comparison = compare(report)
    steps = [p[1] for p in points]
    source = (
        f"lm-evaluation-harness results, {len(points)} revisions (steps {_fmt_step(steps[0])}-{_fmt_step(steps[-1])})"
    )
    result = StabilityOutput(comparison, source, title or traj.model, skipped=dict(traj.skipped))
    if out is not None:
        result.files = write_outputs(comparison, Path(out), model=result.model, source=source)
    return result


def _fmt_step(step: float | None) -> str:
    if step is None:
        return "?"
    step = int(step)
    return f"{step // 1000}k" if step >= 10000 and step % 1000 == 0 else str(step)


def write_outputs(comparison: Any, out: Path, *, model: str | None, source: str, stem: str = "stability") -> list[Path]:
    """The table as CSV and JSON, the score plot and (with per-example data) the flip-rate plot, PNG and SVG."""
    from .plots import plot_by_window, plot_scores

    out.mkdir(parents=True, exist_ok=True)
    files = [comparison.to_csv(out / f"{stem}.csv"), comparison.to_json(out / f"{stem}.json")]
    tasks = list(comparison.raw.tasks)
    chance = {t: CHANCE[t] for t in tasks if t in CHANCE}
    files += plot_scores(comparison, out / f"{stem}-scores", tasks=tasks, model=model, source=source, chance=chance)
    has_examples = any(ts.flip_rate is not None for ts in comparison.raw.tasks.values())
    if has_examples and (comparison.averaged or comparison.ensembled):
        files += plot_by_window(comparison, out / f"{stem}-flip-rate", tasks=tasks, model=model, source=source)
    return files


def _cell(v: Any, digits: int = 4) -> str:
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


_METRIC_COLUMNS = (
    ("mean", "mean"),
    ("MTV", "mtv"),
    ("flip rate", "flip_rate"),
    ("IS", "instability_score"),
    ("p(gold) MTV", "gold_prob_mtv"),
    ("std", "std"),
    ("range", "range"),
    ("worst drop", "worst_drop"),
)


def _drop_where(ts: Any) -> str:
    return f"{ts.worst_drop_from}→{ts.worst_drop_to}" if ts.worst_drop_from and ts.worst_drop else "-"


def render_comparison(comparison: Any, console: Any, title: str) -> None:
    """Raw only: one row per task. With averages/ensembles: per task, one row per series, side by side.

    Columns with no value anywhere (per-example metrics of aggregate-only input) are left out.
    """
    from rich.table import Table

    rows: list[tuple[str, str, Any]] = [
        (task, "raw" if m == "raw" else f"{m} w={w}", ts)
        for m, w, report in comparison.series()
        for task, ts in report.tasks.items()
    ]
    shown = [(h, a) for h, a in _METRIC_COLUMNS if any(getattr(ts, a) is not None for _, _, ts in rows)]
    shown = [(h, a) for h, a in shown if any(_cell(getattr(ts, a)) != "-" for _, _, ts in rows)]
    raw_only = len(comparison.series()) == 1
    groups = (
        [(title, rows)]
        if raw_only
        else [(f"{title}: {t}", [r for r in rows if r[0] == t]) for t in comparison.raw.tasks]
    )
    for heading, group in groups:
        table = Table(title=heading, title_justify="left")
        table.add_column("task" if raw_only else "series")
        table.add_column("n", justify="right")
        for header, _ in shown:
            table.add_column(header, justify="right")
        table.add_column("worst drop at")
        for task, series, ts in group:
            table.add_row(
                f"{task} ({ts.metric})" if raw_only else series,
                str(ts.n_points),
                *(_cell(getattr(ts, a)) for _, a in shown),
                _drop_where(ts),
            )
        console.print(table)
