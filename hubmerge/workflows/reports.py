"""Stability reports from the places scores live: lm-evaluation-harness result files and the results store.

The metrics themselves are pure functions in :mod:`hubmerge.stability.metrics`; this module gathers the score
series, builds the reports, and writes the table (CSV/JSON) and the plots (PNG/SVG) side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hubmerge.errors import StabilityError
from hubmerge.results.lm_eval import load_results
from hubmerge.results.store import ResultsStore
from hubmerge.stability.plots import plot_by_window, plot_scores
from hubmerge.stability.report import Comparison, StabilityReport, compare
from hubmerge.stability.series import PER_EXAMPLE_KINDS, Member, SeriesTask, ensemble_report, series_report

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
    "wsc": 0.5,
    "logiqa": 0.25,
    "mmlu": 0.25,
    "blimp": 0.5,
}


@dataclass
class StabilityOutput:
    """What ``hubmerge stability`` computed and where it wrote it."""

    comparison: Comparison
    source: str
    model: str | None
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    headline: list[str] | None = None  # the tasks tables and plots show (groups pooled); None: every task
    group_notes: dict[str, str] = field(default_factory=dict)  # how each group's row was made


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
    subtasks: bool = False,
) -> StabilityOutput:
    """Raw-trajectory stability from lm-eval result files (aggregate scores only: no per-example metrics).

    A group lm-eval defines (``group_subtasks``; ``hendrycksTest-*`` and ``blimp_*`` in 0.3 files) is shown as
    one row and one panel, its subtasks only with ``subtasks``; the CSV and JSON keep every task. Averaged and
    ensembled series need per-example scores; those come from the results store, not from aggregate files.
    """
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
    if traj.groups and not subtasks:
        result.headline = traj.headline
    result.group_notes = dict(traj.group_notes)
    if out is not None:
        result.files = write_outputs(
            comparison, Path(out), model=result.model, source=source, plot_tasks=result.headline
        )
    return result


def stability_from_store(
    results: str | Path | None,
    *,
    repo: str | None = None,
    tasks: Sequence[str] | None = None,
    ensembles: Sequence[int] = (),
    since: int | None = None,
    until: int | None = None,
    out: str | Path | None = None,
    title: str | None = None,
    subtasks: bool = False,
) -> StabilityOutput:
    """Per-example stability of the revisions in the results store (ordered by step), and of ensembles of
    their windows computed from stored scores. Averaged windows come from ``hubmerge sweep``.

    A group the store knows (lm-eval's, recorded by ``hubmerge results import``) gets a row pooling its tasks'
    examples, which tables and plots show instead of the tasks (``subtasks`` shows them too). A task name stored
    under two data hashes is read from the one with more examples.
    """
    store = ResultsStore(results, read_only=True)
    models = [m for m in store.models() if m.get("step") is not None and (repo is None or m.get("repo") == repo)]
    models = sorted((m for m in models if _in_range(m["step"], since, until)), key=lambda m: m["step"])
    if not models:
        raise StabilityError(f"no evaluated revisions{f' of {repo}' if repo else ''} with steps in {store.path}")
    known_groups = store.task_groups()
    wanted = None if tasks is None else {m for t in tasks for m in known_groups.get(t, [t])}
    by_name: dict[str, dict] = {}
    for t in store.tasks():
        usable = (wanted is None or t["name"] in wanted) and t["kind"] in PER_EXAMPLE_KINDS
        bigger = t["name"] not in by_name or (t["n_examples"] or 0) > (by_name[t["name"]]["n_examples"] or 0)
        if usable and bigger:
            by_name[t["name"]] = t
    task_objs = [SeriesTask(t["name"], t["kind"], t["data_hash"]) for t in by_name.values()]
    if not task_objs:
        raise StabilityError(f"no multiple-choice or minimal-pairs task in {store.path} matches {tasks}")
    groups = {g: [m for m in ms if m in by_name] for g, ms in known_groups.items()}
    groups = {g: ms for g, ms in groups.items() if len(ms) >= 2}
    members = [Member(m["model_key"], m["label"], m["step"]) for m in models]
    with store:  # one connection for the many reads below
        raw = series_report(store, members, task_objs, groups)
        ens = {
            w: ensemble_report(store, members, [(s, w) for s in range(len(members) - w + 1)], task_objs, groups)
            for w in ensembles
            if 2 <= w <= len(members)
        }
    comparison = compare(raw, {}, ens)
    source = f"results store {store.path}, {len(members)} revisions{f' of {repo}' if repo else ''}"
    result = StabilityOutput(comparison, source, title or repo)
    grouped = {m for ms in groups.values() for m in ms}
    if groups and not subtasks:
        result.headline = [t for t in comparison.raw.tasks if t not in grouped]
    result.group_notes = {g: f"pools the examples of {len(ms)} tasks (size-weighted)" for g, ms in groups.items()}
    if out is not None:
        result.files = write_outputs(
            comparison, Path(out), model=result.model, source=source, plot_tasks=result.headline
        )
    return result


def _fmt_step(step: float | None) -> str:
    if step is None:
        return "?"
    step = int(step)
    return f"{step // 1000}k" if step >= 10000 and step % 1000 == 0 else str(step)


def write_outputs(
    comparison: Comparison,
    out: Path,
    *,
    model: str | None,
    source: str,
    stem: str = "stability",
    plot_tasks: Sequence[str] | None = None,
) -> list[Path]:
    """The table as CSV and JSON, the score plot and (with per-example data) the flip-rate plot, PNG and SVG.

    The table has every task; the plots only ``plot_tasks`` when given (a group's pooled row instead of its
    forty paradigm panels).
    """
    out.mkdir(parents=True, exist_ok=True)
    files = [comparison.to_csv(out / f"{stem}.csv"), comparison.to_json(out / f"{stem}.json")]
    tasks = list(plot_tasks) if plot_tasks else list(comparison.raw.tasks)
    chance = {t: CHANCE[t] for t in tasks if t in CHANCE}
    files += plot_scores(comparison, out / f"{stem}-scores", tasks=tasks, model=model, source=source, chance=chance)
    has_examples = any(ts.flip_rate is not None for ts in comparison.raw.tasks.values())
    if has_examples and (comparison.averaged or comparison.ensembled):
        files += plot_by_window(comparison, out / f"{stem}-flip-rate", tasks=tasks, model=model, source=source)
    return files
