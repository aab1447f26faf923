"""``hubmerge sweep RECIPE``: the paper's experiment as one command.

Along a trajectory of T checkpoints, for every window size w and position (stride s), the averaged
model is built (all windows in one shared read, see :mod:`hubmerge.merging.sweep`), scored and, unless
kept, deleted; the raw checkpoints are scored once; the ensembles of the same windows come from stored
log-likelihoods. Then the stability report lays raw, averaged and ensembled series side by side and
recommends a window. Every step is resumable: scores live in the results store and finished windows
are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hubmerge.errors import RecipeError
from hubmerge.evaluation.runner import (
    EvalTarget,
    load_tasks,
    plan_eval,
    run_eval,
    score_task,
    source_targets,
    store_batch,
    target_from_folder,
    task_groups,
)
from hubmerge.evaluation.tasks.specs import TaskData
from hubmerge.hub.client import HubClient
from hubmerge.hub.pull import resolve_hub_sources
from hubmerge.hub.revisions import parse_revision
from hubmerge.hub.stream import OpenedStream, open_stream
from hubmerge.io.checkpoint import SourceRef
from hubmerge.io.cluster import RayOptions, check_resources, cluster_gpus, ray_session
from hubmerge.io.files import atomic_write
from hubmerge.io.progress import QUIET, Display
from hubmerge.merging.recipe import HubSources, RecipeDocument, load_recipe
from hubmerge.merging.sweep import DELETED_SUFFIX, WindowOutput, plan_sweep, run_sweep, window_positions
from hubmerge.results.keys import model_key, task_key
from hubmerge.results.store import ResultsStore
from hubmerge.stability.metrics import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    mean_flip_rate_interval,
    mean_stderr,
    paired_difference,
    tasks_mean_stderr,
)
from hubmerge.stability.report import Comparison, StabilityReport, compare
from hubmerge.stability.series import (
    PER_EXAMPLE_KINDS,
    Member,
    SeriesTask,
    choice_series,
    ensemble_report,
    series_report,
)
from hubmerge.workflows.merge import check_online, note_dropped, stream_plan
from hubmerge.workflows.reports import write_outputs

# Window sizes whose instability is within this factor of the lowest count as "the lowest".
INSTABILITY_TOLERANCE = 1.10


@dataclass
class SweepReport:
    comparison: Comparison
    recommendation: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    windows: int = 0
    bytes_read: int = 0
    headline: list[str] | None = None  # the tasks to show: a group's pooled row instead of its paradigms


def series_tasks(tasks: list[TaskData]) -> list[SeriesTask]:
    """What the stability series need of loaded tasks; a limited task counts only the examples it loaded."""
    return [SeriesTask(t.spec.name, t.spec.kind, t.data_hash, tuple(ex.doc_id for ex in t.examples)) for t in tasks]


def recommend(comparison: Comparison, tasks: list[str] | None = None) -> dict[str, Any]:
    """The window to publish: among window sizes whose averaged series is (nearly) the least unstable, the
    window position with the best mean score.

    Instability of a size is the mean over tasks of the example-level flip rate of its averaged series
    (task-level MTV when there are no per-example scores); sizes within ``INSTABILITY_TOLERANCE`` of the
    lowest tie. Among their windows the best mean score over tasks wins; ties go to the latest window.

    It also says how sure the pick is, since a window chosen on 40 examples can be noise: the examples it rests on,
    its score's standard error, and bootstrap intervals of its size's instability and of the size it beat (or
    that beat it); ``versus_last`` (added by the sweep, which holds the store) compares it with the last checkpoint.
    """
    candidates = []
    for w, report in sorted(comparison.averaged.items()):
        values = [
            ts.flip_rate if ts.flip_rate is not None else ts.mtv
            for name, ts in report.tasks.items()
            if tasks is None or name in tasks
        ]
        values = [v for v in values if v is not None and not math.isnan(v)]
        if values and report.labels:
            candidates.append((float(np.mean(values)), w, report))
    if not candidates:
        return {"how": "no averaged windows with at least two positions; nothing to recommend"}
    lowest = min(c[0] for c in candidates)
    stable = [c for c in candidates if c[0] <= lowest * INSTABILITY_TOLERANCE + 1e-12]
    best = None
    for instability, w, report in stable:
        for i, label in enumerate(report.labels):
            score = float(np.mean([report.scores[t][i] for t in report.scores if tasks is None or t in tasks]))
            key = (score, report.steps[i] or 0)
            if best is None or key > best[0]:
                best = (key, w, label, instability)
    (score, _), w, label, instability = best
    chosen = comparison.averaged[w]
    names = [t for t in chosen.scores if tasks is None or t in tasks]
    by_size = {c[1]: c[0] for c in candidates}
    ranked = sorted(by_size, key=lambda size: (by_size[size], size))
    other = ranked[0] if ranked[0] != w else ranked[1] if len(ranked) > 1 else None
    compared = None
    if other is not None:
        compared = {
            "window_size": other,
            "role": "lowest" if other == ranked[0] else "runner-up",
            "instability": by_size[other],
            "instability_interval": _flip_rate_interval(comparison.averaged[other], names),
        }
    return {
        "window_size": w,
        "window": label,
        "mean_score": score,
        "instability": instability,
        **_score_evidence(chosen, chosen.labels.index(label), names),
        "instability_interval": _flip_rate_interval(chosen, names),
        "compared": compared,
        "interval": INTERVAL_HOW,
        "how": (
            f"window sizes whose averaged series has a mean flip rate within {INSTABILITY_TOLERANCE - 1:.0%} of the "
            f"lowest ({lowest:.4f}) were kept ({', '.join(str(c[1]) for c in stable)}); among their windows the "
            "best mean score over tasks was chosen, ties going to the latest"
        ),
    }


INTERVAL_HOW = (
    f"{BOOTSTRAP_LEVEL:.0%} percentile bootstrap over examples ({BOOTSTRAP_RESAMPLES} resamples, seed "
    f"{BOOTSTRAP_SEED}), resampled within each task; standard errors as lm-eval's acc_stderr per task, combined for "
    "the unweighted mean over tasks as sqrt(sum of squares) / number of tasks; a group counts as one task, its "
    "error computed on its pooled examples (which lm-eval's pooled_sample_stderr approximates)"
)


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined figure (one example, one window) is ``null``."""
    return x if math.isfinite(x) else None


def _score_evidence(report: StabilityReport, i: int, names: list[str]) -> dict[str, Any]:
    """How many examples the score of window ``i`` rests on, and its standard error, per task and over tasks."""
    n = {t: report.tasks[t].n_examples for t in names}
    stderr = {
        t: _finite(mean_stderr(report.examples[t].correct[i]))
        for t in names
        if t in report.examples and report.examples[t].correct is not None
    }
    total = None if any(v is None for v in n.values()) else sum(n.values())  # type: ignore[misc]
    combined = tasks_mean_stderr([math.nan if v is None else v for v in stderr.values()])
    return {
        "n_examples": n,
        "n_examples_total": total,
        "stderr": stderr,
        "mean_score_stderr": _finite(combined) if len(stderr) == len(names) else None,
    }


def _flip_rate_interval(report: StabilityReport, names: list[str]) -> list[float | None] | None:
    """The bootstrap interval of a size's instability (the mean flip rate over tasks); None without examples."""
    arrays = [report.examples.get(t) for t in names]
    if not arrays or any(a is None or a.correct is None for a in arrays):
        return None
    low, high = mean_flip_rate_interval([(a.correct, a.present) for a in arrays])  # type: ignore[union-attr]
    return [_finite(low), _finite(high)]


def versus_last(
    store: ResultsStore,
    recommendation: dict[str, Any],
    window_key: str,
    last: Member,
    tasks: list[SeriesTask],
    groups: dict[str, list[str]],
) -> dict[str, Any] | None:
    """Is the recommended window better than taking the last checkpoint? The paired difference of their
    correctness over the examples both have, per task of the recommendation (a group pools its paradigms')."""
    by_name = {t.name: t for t in tasks if t.kind in PER_EXAMPLE_KINDS}
    pairs, last_scores = [], []
    for name in recommendation.get("n_examples", {}):
        parts = [by_name[m] for m in groups.get(name, [name]) if m in by_name]
        if not parts:
            return None
        series = [choice_series(store, [window_key, last.key], t.key, wanted=t.wanted) for t in parts]
        a = np.concatenate([c.correct[0] for c in series])
        b = np.concatenate([c.correct[1] for c in series])
        if a.size == 0:
            return None
        pairs.append((a, b))
        last_scores.append(float(b.mean()))
    if not pairs:
        return None
    d = paired_difference(pairs)
    return {
        "checkpoint": last.label,
        "last_score": float(np.mean(last_scores)),
        "difference": d.difference,
        "stderr": _finite(d.stderr),
        "interval": [_finite(d.interval[0]), _finite(d.interval[1])],
        "n_examples": d.n_examples,
        "distinguishable": d.distinguishable,
    }


def run_sweep_recipe(
    recipe: RecipeDocument | str | Path,
    client: HubClient | None = None,
    *,
    display: Display = QUIET,
    keep: bool | None = None,
    out: str | Path | None = None,
    stream: bool | None = None,
    ray: RayOptions | None = None,
) -> SweepReport:
    """``hubmerge sweep RECIPE``: score the raw checkpoints, build and score every averaged window (one shared
    read), compute the ensembles from stored scores, and write the stability report and recommendation.

    ``stream`` overrides a Hub recipe's ``sources.fetch``: streamed, no weight is downloaded (see
    :mod:`hubmerge.hub.stream`); raw checkpoints are then scored from exact copies written in the same pass.

    ``ray``: the same sweep on a Ray cluster, one Ray instance for the whole command. Each pass is one Ray task
    that reads its sources (paths every worker sees, or the Hub when streamed), builds its windows, scores them
    on the recipe's tasks (on a GPU where the cluster has one) and returns their rows; the raw checkpoints are
    scored by (model, task) Ray tasks. Only this driver writes the store and the report, so both equal a
    one-machine sweep's."""
    if ray is not None:
        with ray_session(ray.address) as session:
            return _sweep(recipe, client, display, keep, out, stream, ray, ray_eval_resources(session, ray))
    return _sweep(recipe, client, display, keep, out, stream, None, None)


def ray_eval_resources(session: Any, ray: RayOptions) -> dict[str, float]:
    """What each task that scores asks for: the CPUs given, and one GPU where the cluster has one (unless told)."""
    gpus = ray.gpus_per_task
    if gpus is None:
        gpus = 1.0 if cluster_gpus(session) >= 1 else 0.0
    check_resources(session, ray.cpus_per_task, gpus)  # more than the cluster has: one line
    cluster = session.cluster_resources()
    slots = math.floor(cluster.get("CPU", 0) / ray.cpus_per_task)
    if gpus > 0:
        slots = min(slots, math.floor(cluster.get("GPU", 0) / gpus))
    return {"num_cpus": ray.cpus_per_task, "num_gpus": gpus, "slots": max(1, slots)}


def windows_per_pass(windows: int, slots: int) -> int:
    """A Ray sweep's passes when the recipe sets no ``max_windows_on_disk``: one per task the cluster can run at once
    (each pass builds and scores its windows on one worker, so fewer passes leave workers idle, more read the
    sources more often). Windows are cut in order of their last source, so each pass spans few sources."""
    return max(1, math.ceil(windows / max(1, slots)))


# What a pass task asks Ray for on top of its merge's bound, per parameter, to score a window: an allowance (not a
# measured peak) of the model in float32 (4 bytes) and as much again for activations, tokenizer and the rest.
SCORING_MEMORY_FACTOR = 8


@dataclass(frozen=True)
class WindowScorer:
    """What a sweep's Ray task runs on each window it has built: every example of the recipe's tasks, scored
    where the window is, as column batches for the store (keyed by task). The model leaves no worker."""

    tasks: list[TaskData]
    batch_size: int | None
    device: str

    def __call__(self, path: Path) -> dict[str, list[dict[str, Any]]]:
        from hubmerge.evaluation.scoring import load_model

        model, tokenizer = load_model(path, device=self.device)
        return {
            task_key(t.spec.name, t.data_hash): score_task(
                model, tokenizer, t, [ex.doc_id for ex in t.examples], batch_size=self.batch_size, device=self.device
            )
            for t in self.tasks
        }


def _sweep(
    recipe: RecipeDocument | str | Path,
    client: HubClient | None,
    display: Display,
    keep: bool | None,
    out: str | Path | None,
    stream: bool | None,
    ray: RayOptions | None,
    resources: dict[str, float] | None,
) -> SweepReport:
    """The sweep itself; ``ray`` and ``resources`` (what the scoring tasks ask for, and how many the cluster runs
    at once: ``slots``) are set together or not at all."""
    device = "cuda" if resources and resources["num_gpus"] > 0 else "cpu"
    asked = {k: v for k, v in (resources or {}).items() if k in ("num_cpus", "num_gpus")}
    on_ray: dict[str, Any] = {"use_ray": True, "ray_resources": asked, "device": device} if ray else {}
    doc = recipe if isinstance(recipe, RecipeDocument) else load_recipe(recipe)
    recipe_ = doc.recipe
    where = doc.where
    if recipe_.sweep is None or recipe_.evaluate is None:
        raise RecipeError(f"{where}: a sweep needs both a 'sweep:' block (sizes, stride) and an 'evaluate:' block")
    client = client or HubClient()
    sources: list[SourceRef]
    opened: OpenedStream | None = None  # fetch: stream
    if isinstance(recipe_.sources, HubSources):
        hub = recipe_.sources
        streamed = stream if stream is not None else hub.fetch == "stream"
        if streamed:
            check_online(doc, client)
        resolved = resolve_hub_sources(
            hub.repo, hub.selector, hub.on_anomaly, client, download=not streamed, display=display, all_sidecars=True
        )
        note_dropped(resolved, display)
        if streamed:
            opened = open_stream(hub.repo, resolved.kept, client, connections=hub.connections, all_sidecars=True)
            sources = opened[0]
        else:
            sources = resolved.sources
    else:
        if stream:
            raise RecipeError(f"{where}: --stream applies to Hub sources; this recipe lists local folders")
        sources = [SourceRef(p, p.name) for p in doc.local_sources()]
    sweep_cfg, eval_cfg = recipe_.sweep, recipe_.evaluate
    sizes = sweep_cfg.sizes
    if max(sizes) > len(sources):
        raise RecipeError(
            f"{where}: field 'sweep.sizes': window {max(sizes)} is longer than the {len(sources)} sources",
            field="sweep.sizes",
        )
    tasks = load_tasks(
        eval_cfg.task_list, data=eval_cfg.data, limit=eval_cfg.limit, lm_eval_include=eval_cfg.include_list
    )
    groups = task_groups(eval_cfg.task_list, tasks)
    store = ResultsStore(eval_cfg.results)
    bs = eval_cfg.batch_size
    copies: list[int] = []
    if opened is None:
        raw = source_targets(sources)
        run_eval(plan_eval(raw, tasks, store), store, client=client, batch_size=bs, display=display, **on_ray)
    else:
        # Streamed: the raw checkpoints are not on disk. Those still lacking scores are written as exact copies in
        # the sweep's own pass (each source byte is read once) and scored there, under their own content keys.
        raw = streamed_targets(sources)
        todo = plan_eval(raw, tasks, store).todo
        copies = [
            i
            for i, t in enumerate(raw)
            if any(todo.get((t.key, task_key(task.spec.name, task.data_hash))) for task in tasks)
        ]
        for t in raw:
            store.register_checkpoint(t)  # first: the store records the revision, not a copy's temporary folder

    root = Path(recipe_.output.path).expanduser().resolve()
    averaged_sizes = [w for w in sizes if w >= 2]
    keep = sweep_cfg.keep if keep is None else keep
    window_keys: dict[str, str] = {}

    def on_window(wo: WindowOutput) -> None:
        if wo.window.size == 1:  # a raw checkpoint's exact copy, scored under the checkpoint's own key
            target = dataclasses.replace(raw[wo.window.start], path=wo.path)
        elif wo.scores is not None:  # scored (and perhaps deleted) by its Ray task: its hashes came back with it
            shards = [h for f, h in wo.files.items() if f.endswith(".safetensors")]
            target = EvalTarget(wo.window.name, shards, path=wo.path)
        else:
            target = target_from_folder(wo.path, label=wo.window.name)
        if wo.window.size > 1:
            window_keys[wo.window.name] = target.key
        if wo.scores is not None:
            store_scores(store, target, tasks, wo.scores)
        else:
            run_eval(plan_eval([target], tasks, store), store, batch_size=bs, display=display, **on_ray)

    result = None
    windows = []
    per_pass = sweep_cfg.max_windows_on_disk
    if per_pass is None and resources is not None:
        count = len(window_positions(len(sources), averaged_sizes, sweep_cfg.stride)) + len(copies)
        per_pass = windows_per_pass(count, int(resources["slots"]))
        display.note(
            f"--ray: {count} windows in passes of at most {per_pass}, one a task the cluster runs at once "
            f"({int(resources['slots'])}); set sweep.max_windows_on_disk to choose"
        )
    if averaged_sizes or copies:
        splan = plan_sweep(
            sources,
            averaged_sizes,
            root,
            stride=sweep_cfg.stride,
            method=recipe_.method,
            decay=recipe_.decay,
            weights=sweep_cfg.weights,
            dtype=recipe_.dtype,
            max_shard_size=recipe_.output.max_shard_size,
            max_windows_on_disk=per_pass,
            name=recipe_.name,
            nonfinite=recipe_.nonfinite,
            keep=keep,
            **(stream_options(opened, copies) if opened is not None else {}),
        )
        windows = splan.windows
        pass_ray, scorer = None, None
        if ray is not None and resources is not None:
            pass_ray = dataclasses.replace(ray, gpus_per_task=resources["num_gpus"])
            scorer = WindowScorer(tasks, bs, device)
        result = run_sweep(
            splan,
            on_window=on_window,
            keep=keep,
            display=display,
            ray=pass_ray,
            score=scorer,
            score_memory=SCORING_MEMORY_FACTOR * sum(t.numel for t in splan.tensors),
        )
        for name in result.skipped:  # deleted in an earlier run: its scores are in the store
            window_keys[name] = _window_key_of_tombstone(root / f"{name}{DELETED_SUFFIX}")

    # With ``align``, every series covers the same window ends: from the first end the largest window reaches.
    first_end = max(sizes) - 1 if sweep_cfg.align else 0
    members = [Member(t.key, t.label, t.step) for t in raw]
    stasks = series_tasks(tasks)
    label_keys: dict[tuple[int, str], str] = {}  # (size, window label) -> the averaged model's store key
    with store:  # one connection for the hundreds of reads below
        raw_report = series_report(store, members[first_end:], stasks, groups)
        averaged, ensembled = {}, {}
        for w in averaged_sizes:
            positions = [
                (s, w)
                for s, size in window_positions(len(raw), [w], sweep_cfg.stride)
                if size == w and s + w - 1 >= first_end
            ]
            chosen = [n for n in windows if n.size == w and n.end >= first_end]
            series = [
                Member(window_keys[n.name], f"{raw[n.start].label}..{raw[n.end].label}", raw[n.end].step)
                for n in chosen
            ]
            label_keys.update({(w, m.label): m.key for m in series})
            averaged[w] = series_report(store, series, stasks, groups)
            ensembled[w] = ensemble_report(store, members, positions, stasks, groups)
    comparison = compare(raw_report, averaged, ensembled)
    grouped = {m for group in groups.values() for m in group}
    plotted = [t for t in comparison.raw.tasks if t not in grouped] if groups else None
    report = SweepReport(comparison, recommend(comparison, plotted), headline=plotted)
    rec = report.recommendation
    if "window" in rec:
        with store:
            rec["versus_last"] = versus_last(
                store, rec, label_keys[(rec["window_size"], rec["window"])], members[-1], stasks, groups
            )
    report.windows = len(window_keys)
    report.bytes_read = result.bytes_read if result else 0
    out_dir = Path(out) if out else root / "report"
    report.files = write_outputs(
        comparison, out_dir, model=recipe_.name, source=f"hubmerge sweep {where}", plot_tasks=plotted
    )
    atomic_write(out_dir / "recommendation.json", json.dumps(report.recommendation, indent=2) + "\n")
    report.files.append(out_dir / "recommendation.json")
    return report


def store_scores(
    store: ResultsStore, target: EvalTarget, tasks: list[TaskData], scores: dict[str, list[dict[str, Any]]]
) -> None:
    """A window's rows, scored by its Ray task, into the store, as ``run_eval`` would have stored them here."""
    for task in tasks:
        store.register_task(task)
    store.register_checkpoint(target)
    for key, batches in scores.items():
        for batch in batches:
            store_batch(store, target.key, key, batch)


def streamed_targets(sources: list[SourceRef]) -> list[EvalTarget]:
    """Evaluation targets of streamed sources: keyed by the LFS sha256 the stream verified, as a pull's are."""
    return [
        EvalTarget(
            s.label,
            sorted((s.sha256 or {}).values()),
            path=s.path,
            repo=s.repo,
            revision=s.revision,
            commit=s.commit,
            step=parse_revision(s.revision or s.label).step,
        )
        for s in sources
    ]


def stream_options(opened: OpenedStream, copies: list[int]) -> dict:
    """:func:`plan_sweep`'s options for a streamed sweep: remote checkpoints, the byte order, the raw copies."""
    return {"checkpoints": opened[1], "stream": lambda tensors: stream_plan(tensors, opened), "copies": copies}


def _window_key_of_tombstone(tomb: Path) -> str:
    """The store key of a window an earlier run scored and deleted, from the provenance it left behind."""
    prov = json.loads(tomb.read_text())
    return model_key([h for f, h in prov["files"].items() if f.endswith(".safetensors")])
