"""Every table and plan the CLI prints, in one place: rich renderings of what the workflows return.

Nothing here computes: each function takes a result object (a plan, a report, scores) and a rich ``Console``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from hubmerge.evaluation.runner import EvalResult
from hubmerge.hub.integrity import IntegrityReport
from hubmerge.hub.revisions import Revision, revisions_notice, revisions_table_rows
from hubmerge.io.sizes import format_size
from hubmerge.merging.plan import MergePlan
from hubmerge.merging.sweep import SweepPlan
from hubmerge.results.keys import task_key
from hubmerge.results.store import SCORE_METRICS, Score
from hubmerge.stability.report import Comparison, TaskStability

if TYPE_CHECKING:
    from hubmerge.workflows.imports import ImportReport


def render_plan(plan: MergePlan, console: Console) -> None:
    """Print the plan as a rich table (sources) and a summary (what is read, written, held in memory)."""
    table = Table(title=f"merge plan: {plan.name} ({plan.method})", title_justify="left")
    for col in ("#", "source", "format", "files", "size", "weight"):
        table.add_column(col, justify="right" if col in ("#", "files", "size", "weight") else "left")
    for i, (s, ck, w) in enumerate(zip(plan.sources, plan.checkpoints, plan.weights, strict=True)):
        table.add_row(str(i), s.describe(), ck.format, str(len(ck.files)), format_size(ck.nbytes), f"{w:.4f}")
    console.print(table)
    tensors = plan.tensors
    averaged = sum(t.floating for t in tensors)
    console.print(f"tensors:   {len(tensors)} ({averaged} averaged in float32, {len(tensors) - averaged} copied)")
    if plan.dropped_aliases:
        console.print(f"tied:      {', '.join(plan.dropped_aliases)} (re-tied on load, as in the sources)")
    console.print(f"dtype:     {plan.out_dtype or 'as the sources'}")
    if plan.stream is not None:
        st = plan.stream
        console.print(
            f"read:      {format_size(plan.bytes_read)}, streamed from the Hub: {format_size(st.bytes)} in {st.files} "
            f"files by range requests ({st.connections} connections, sha256 of every byte checked), nothing cached"
        )
    else:
        console.print(f"read:      {format_size(plan.bytes_read)}")
    shards = ", ".join(f"{s.file} ({format_size(s.nbytes)})" for s in plan.shards)
    console.print(f"write:     {format_size(plan.bytes_written)} in {len(plan.shards)} shard(s): {shards}")
    console.print(f"copied:    {', '.join(plan.sidecar_files) or 'nothing'} (from the newest source)")
    if plan.disk_free is not None:
        console.print(f"disk:      {format_size(plan.disk_bytes)} needed, {format_size(plan.disk_free)} free")
    in_flight = f" + {format_size(plan.stream.in_flight_bytes)} in flight" if plan.stream else ""
    console.print(
        f"memory:    ~{format_size(plan.memory_estimate)} peak "
        f"({format_size(plan.buffer_bytes)} of buffers{in_flight}, independent of model size and source count)"
    )
    console.print(f"output:    {plan.output}")


def render_sweep_plan(plan: SweepPlan, console: Console) -> None:
    """Print what a sweep will read, hold in memory and write, and how its disk use is bounded."""
    table = Table(title=f"sweep plan: {plan.name} ({plan.method}, stride {plan.stride})", title_justify="left")
    for col in ("window", "size", "sources", "status"):
        table.add_column(col)
    for w in plan.windows:
        srcs = f"{plan.sources[w.start].label} .. {plan.sources[w.end].label}"
        table.add_row(w.name, str(w.size), srcs, plan.status[w.name])
    console.print(table)
    todo = plan.todo
    console.print(f"windows:   {len(plan.windows)} ({len(todo)} to compute, {len(plan.batches)} pass(es))")
    console.print(
        f"read:      {format_size(plan.bytes_read)} (independent merges would read "
        f"{format_size(plan.bytes_read_independent)})"
    )
    console.print(f"write:     {format_size(plan.bytes_written)} in {len(todo)} window folder(s)")
    console.print(
        f"memory:    ~{format_size(plan.memory_estimate)} peak ({format_size(plan.buffer_bytes)} of buffers: "
        f"{plan.chunk_elems} elements x {plan.max_open} open windows, independent of model size)"
    )
    console.print(
        f"disk:      {format_size(plan.disk_bytes(True))} if kept; {format_size(plan.disk_bytes(False))} at most "
        "if each window is deleted once handed over"
        + (f"; {format_size(plan.disk_free)} free" if plan.disk_free is not None else "")
    )
    console.print(f"output:    {plan.root}")


def render_integrity(report: IntegrityReport, console: Console) -> None:
    table = Table(title=f"integrity of {report.repo}", title_justify="left")
    for col in ("revision", "commit", "format", "weights", "size", "status"):
        table.add_column(col, justify="right" if col in ("weights", "size") else "left")
    for r in report.checked:
        found = report.for_revision(r.revision)
        status = "; ".join(f"[red]{f.kind}[/red]: {f.detail}" for f in found) if found else "[green]ok[/green]"
        table.add_row(
            r.revision,
            (r.commit or "")[:10],
            r.weight_format or "-",
            str(len(r.weights)),
            format_size(r.weight_bytes),
            status,
        )
    console.print(table)
    n = len({f.revision for f in report.findings})
    console.print(f"{n} of {len(report.checked)} revisions with anomalies" if n else "no anomalies found")


def render_revisions(revs: list[Revision], title: str, console: Console) -> None:
    """Branches in training order: name, stage (or trajectory), step, tokens, commit; a notice for odd names."""
    table = Table(title=title, title_justify="left")
    for col in ("revision", "stage", "step", "tokens", "commit"):
        table.add_column(col, justify="right" if col in ("step", "tokens") else "left")
    for row in revisions_table_rows(revs):
        table.add_row(row["name"], row["stage"] or row["trajectory"], row["step"], row["tokens"], row["commit"])
    console.print(table)
    if notice := revisions_notice(revs):
        console.print(notice)


def render_scores(rows: list[Score], title: str, console: Console) -> None:
    """``hubmerge results``: one line per (model, task) with its metrics ("-" where a task does not define one;
    the acc_norm and acc_mutual_info columns only where some task has them)."""
    view = Table(title=title, title_justify="left")
    norm = any(r.acc_norm is not None for r in rows)
    mutual_info = any(r.acc_mutual_info is not None for r in rows)
    extra = (*(("acc_norm",) * norm), *(("acc_mutual_info",) * mutual_info))
    cols = ("task", "model", "step", "n", "acc", *extra, "perplexity")
    for c in (*cols, "bits/byte"):
        view.add_column(c, justify="left" if c in ("task", "model") else "right")
    for r in rows:
        ppl = r.perplexity if r.perplexity is not None else r.word_perplexity
        view.add_row(
            r.task,
            r.model,
            "-" if r.step is None else str(r.step),
            f"{r.n}/{r.n_examples}",
            _fmt(r.acc),
            *([_fmt(r.acc_norm)] if norm else []),
            *([_fmt(r.acc_mutual_info)] if mutual_info else []),
            _fmt(ppl, 2),
            _fmt(r.bits_per_byte),
        )
    console.print(view)


def _choice_metrics(task: Any) -> list[str]:
    """The accuracy columns of a choice task: what its definition asks for (lm-eval's BLiMP: acc only)."""
    if task.spec.kind == "minimal_pairs":  # lm-eval reports acc only: the choices are whole sentences
        return ["acc"]
    return [m for m in ("acc", "acc_norm", "acc_mutual_info") if m in task.spec.metric_names] or ["acc"]


def scores_json(rows: Sequence[Score]) -> list[dict[str, Any]]:
    """``hubmerge results --json``: each score with exactly the metrics its task defines (as the store recorded
    them; every metric computed where it did not), as ``hubmerge eval --json`` gives them."""
    out = []
    for s in rows:
        row = dict(s.__dict__)
        for m in SCORE_METRICS if s.metrics is not None else ():
            if m not in s.metrics:
                row.pop(m)
        out.append(row)
    return out


def results_json(result: EvalResult) -> dict[str, Any]:
    """``hubmerge eval --json``: every score and ensemble with exactly the metrics its task defines (BLiMP and
    WinoGrande: ``acc`` only, as in lm-eval)."""
    defined = {task_key(t.spec.name, t.data_hash): set(t.spec.metric_names) for t in result.plan.tasks}
    scores = scores_json(result.scores)  # the store recorded each task's metric_names when the run registered it
    keys = ("label", "task", "n", "probability", "majority", "probability_norm", "majority_norm", "member_labels")
    ensembles = []
    for e in result.ensembles:
        norm = "acc_norm" in defined.get(e["task_key"], {"acc_norm"})
        ensembles.append({k: e[k] for k in keys if norm or not k.endswith("_norm")})
    return {"scored_requests": result.scored, "scores": scores, "ensembles": ensembles}


def render_results(result: EvalResult, console: Console) -> None:
    """Per task: each model's accuracies (or perplexities), then the ensembles."""
    by_task: dict[str, list[Any]] = {}
    for s in result.scores:
        by_task.setdefault(s.task_key, []).append(s)
    labels = {t.key: t.label for t in result.plan.targets}
    for task in result.plan.tasks:
        rows = by_task.get(task_key(task.spec.name, task.data_hash), [])
        lm = task.spec.kind in ("perplexity", "cloze")
        metrics = _choice_metrics(task)
        table = Table(title=f"{task.spec.name} ({task.spec.kind}, {len(task.examples)} examples)", title_justify="left")
        for c in ["model", "n", "acc", "perplexity", "bits/byte"] if lm else ["model", "n", *metrics]:
            table.add_column(c, justify="left" if c == "model" else "right")
        order = {t.key: i for i, t in enumerate(result.plan.targets)}
        for s in sorted(rows, key=lambda s: order.get(s.model_key, 1 << 30)):
            name = labels.get(s.model_key, s.model)
            if lm:
                ppl = s.perplexity if s.perplexity is not None else s.word_perplexity
                table.add_row(name, str(s.n), _fmt(s.acc), _fmt(ppl, 2), _fmt(s.bits_per_byte))
            else:
                table.add_row(name, str(s.n), *(_fmt(getattr(s, m)) for m in metrics))
        for e in result.ensembles:
            if e["task_key"] == task_key(task.spec.name, task.data_hash):
                for how, key in (("prob. avg.", "probability"), ("majority", "majority")):
                    cells = {"acc": e[key], "acc_norm": e[f"{key}_norm"]}  # ensembles: from conditional scores
                    row = [_fmt(cells.get(m)) for m in metrics]
                    table.add_row(f"{e['label']} ({how})", str(e["n"]), *row)
        console.print(table)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cell(v: Any, digits: int = 4) -> str:
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


def _drop_where(ts: TaskStability) -> str:
    return f"{ts.worst_drop_from}→{ts.worst_drop_to}" if ts.worst_drop_from and ts.worst_drop else "-"


def render_comparison(comparison: Comparison, console: Console, title: str, tasks: Sequence[str] | None = None) -> None:
    """Raw only: one row per task. With averages/ensembles: per task, one row per series, side by side.

    Columns with no value anywhere (per-example metrics of aggregate-only input) are left out; the
    side-by-side tables keep the headline metrics (the CSV and JSON have them all). ``tasks`` limits the
    tables to those tasks (a group's pooled row instead of forty paradigms).
    """
    rows: list[tuple[str, str, Any]] = [
        (task, "raw" if m == "raw" else f"{m} w={w}", ts)
        for m, w, report in comparison.series()
        for task, ts in report.tasks.items()
        if tasks is None or task in tasks
    ]
    raw_only = len(comparison.series()) == 1
    columns = _METRIC_COLUMNS if raw_only else [c for c in _METRIC_COLUMNS if c[1] not in ("std", "range")]
    shown = [(h, a) for h, a in columns if any(_cell(getattr(ts, a)) != "-" for _, _, ts in rows)]
    digits = 4 if raw_only else 3
    if raw_only:
        groups = [(title, rows)]
    else:
        shown_tasks = [t for t in comparison.raw.tasks if tasks is None or t in tasks]
        groups = [(f"{title}: {t}", [r for r in rows if r[0] == t]) for t in shown_tasks]
    for heading, group in groups:
        table = Table(title=heading, title_justify="left")
        table.add_column("task" if raw_only else "series", no_wrap=True)
        table.add_column("n", justify="right")
        for header, _ in shown:
            table.add_column(header, justify="right")
        if raw_only:
            table.add_column("worst drop at")
        for task, series, ts in group:
            cells = [_cell(getattr(ts, a), digits) for _, a in shown]
            name = f"{task} ({ts.metric})" if raw_only else series
            table.add_row(name, str(ts.n_points), *cells, *([_drop_where(ts)] if raw_only else []))
        console.print(table)


def _interval(iv: Sequence[float | None] | None) -> str:
    return "-" if not iv or None in iv else f"[{iv[0]:.4f}, {iv[1]:.4f}]"


def recommendation_evidence(rec: Mapping[str, Any]) -> list[str]:
    """The lines under ``recommended:``: how many examples the choice rests on, the score's standard error, the
    instability intervals, and whether the window beats the last checkpoint beyond the examples' noise."""
    lines = []
    n = rec.get("n_examples_total")
    se = rec.get("mean_score_stderr")
    if n is not None:
        per_task = ", ".join(f"{t} {k}" for t, k in (rec.get("n_examples") or {}).items())
        error = f", standard error {se:.4f}" if se is not None else ""
        lines.append(f"rests on {n} examples ({per_task}){error}")
    if rec.get("instability_interval") is not None:
        line = f"flip rate {rec['instability']:.4f} {_interval(rec['instability_interval'])}"
        other = rec.get("compared")
        if other is not None:
            line += (
                f"; {other['role']} size {other['window_size']}: {other['instability']:.4f} "
                f"{_interval(other.get('instability_interval'))}"
            )
        lines.append(line + " (95% bootstrap)")
    vs = rec.get("versus_last")
    if vs is not None:
        verdict = "distinguishable" if vs["distinguishable"] else "not distinguishable from it"
        lines.append(
            f"versus the last checkpoint {vs['checkpoint']} ({vs['last_score']:.4f}): {vs['difference']:+.4f} "
            f"{_interval(vs['interval'])} over {vs['n_examples']} paired examples, {verdict}"
        )
    return lines


def render_import(report: ImportReport, console: Console) -> None:
    """``hubmerge results import``: per task, how many checkpoints were imported, kept or replaced; then notices."""
    by_task: dict[str, dict[str, int]] = {}
    for _, task, n in report.imported:
        entry = by_task.setdefault(task, {"imported": 0, "examples": 0, "unchanged": 0, "replaced": 0})
        entry["imported"] += 1
        entry["examples"] = max(entry["examples"], n)
    for kind in ("unchanged", "replaced"):
        for _, task in getattr(report, kind):
            by_task.setdefault(task, {"imported": 0, "examples": 0, "unchanged": 0, "replaced": 0})[kind] += 1
    table = Table(title=f"imported {report.runs} lm-eval runs", title_justify="left")
    for col in ("task", "checkpoints imported", "examples", "already stored", "replaced"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, e in sorted(by_task.items()):
        table.add_row(task, str(e["imported"]), str(e["examples"]), str(e["unchanged"]), str(e["replaced"]))
    console.print(table)
    if report.aggregate_only:
        tasks = sorted({t for _, t in report.aggregate_only})
        console.print(
            f"aggregate scores only (no samples file): {', '.join(tasks)}; `hubmerge stability --lm-eval` reads them"
        )
    for notice in report.notices:
        console.print(f"note: {notice}", highlight=False)


def render_skipped(skipped: Mapping[str, str], err: Console, shown: int = 6) -> None:
    """Tasks left out, one line per reason: Pythia's files leave out 20 crows_pairs tasks for the same one."""
    by_reason: dict[str, list[str]] = {}
    for task, why in skipped.items():
        by_reason.setdefault(why, []).append(task)
    for why, tasks in by_reason.items():
        names = ", ".join(tasks[:shown]) + (f" and {len(tasks) - shown} more" if len(tasks) > shown else "")
        what = f"{len(tasks)} tasks ({names})" if len(tasks) > 1 else tasks[0]
        err.print(f"skipped {what}: {why}", highlight=False)
