"""``hubmerge sweep RECIPE``: the paper's experiment as one command.

Along a trajectory of T checkpoints, for every window size w and position (stride s), the averaged
model is built (all windows in one shared read, see :mod:`hubmerge.sweep_merge`), scored and, unless
kept, deleted; the raw checkpoints are scored once; the ensembles of the same windows come from stored
log-likelihoods. Then the stability report lays raw, averaged and ensembled series side by side and
recommends a window. Every step is resumable: scores live in the results store and finished windows
are skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RecipeError
from .evaluation import EvalTarget, plan_eval, run_eval, target_from_folder
from .plan import SourceRef
from .revisions import parse_revision

# Window sizes whose instability is within this factor of the lowest count as "the lowest".
INSTABILITY_TOLERANCE = 1.10


def source_targets(sources: list[SourceRef]) -> list[EvalTarget]:
    """Evaluation targets for merge sources; Hub snapshots lacking config/tokenizer are completed on use."""
    from .store import weight_hashes_of_folder

    targets = []
    for s in sources:
        step = parse_revision(s.revision or s.label).step
        complete = (s.path / "config.json").is_file()
        targets.append(
            EvalTarget(
                s.label,
                weight_hashes_of_folder(s.path),
                path=s.path if complete or not s.repo else None,
                repo=s.repo,
                revision=s.revision,
                commit=s.commit,
                step=step,
            )
        )
    return targets


def load_recipe_tasks(cfg: Any) -> list[Any]:
    """The tasks of a recipe's ``evaluate:`` block; ``data`` is one path for all tasks or one per task."""
    from .tasks import expand_tasks, load_task

    tasks = []
    for name in cfg.task_list:
        data = cfg.data.get(name) if isinstance(cfg.data, dict) else cfg.data
        tasks += [load_task(n, data=data, limit=cfg.limit_for(name)) for n in expand_tasks(name, data=data)]
    return tasks


@dataclass
class SweepReport:
    comparison: Any
    recommendation: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    windows: int = 0
    bytes_read: int = 0
    headline: list[str] | None = None  # the tasks to show: a group's pooled row instead of its paradigms


def _window_key(prov: dict[str, Any]) -> str:
    from .store import model_key

    return model_key([h for f, h in prov["files"].items() if f.endswith(".safetensors")])


def task_groups(cfg: Any, tasks: list[Any]) -> dict[str, list[str]]:
    """Group name -> its paradigms' task names, for each group (``blimp``) a recipe's ``evaluate:`` lists."""
    from .tasks import get_task_spec

    loaded = {t.spec.name for t in tasks}
    groups = {}
    for name in cfg.task_list:
        spec = get_task_spec(name) if not name.endswith((".yaml", ".yml")) else None
        if spec is not None and spec.is_group:
            groups[name] = [t for t in loaded if t.startswith(f"{name}_")]
    return {g: sorted(m) for g, m in groups.items() if len(m) >= 2}


def _wanted(task: Any, stored: np.ndarray) -> np.ndarray:
    """The stored examples the task asks for: a limited task is reported on its first N, not on all stored."""
    examples = getattr(task, "examples", None)
    if examples is None:  # a task rebuilt from the store: everything stored counts
        return stored
    return np.intersect1d(stored, np.fromiter((e.doc_id for e in examples), dtype=stored.dtype))


def _add_groups(points: list[Any], examples: dict[str, Any], metrics: dict[str, str], groups: dict | None) -> None:
    """A group's row pools its paradigms' examples, as lm-eval's size-weighted group score does."""
    from .stability import ExampleArrays

    for group, members in (groups or {}).items():
        have = [m for m in members if m in examples]
        if len(have) < 2:
            continue

        def cat(attr: str, have: list[str] = have) -> np.ndarray:
            return np.concatenate([getattr(examples[m], attr) for m in have], axis=1)

        pooled = ExampleArrays(correct=cat("correct"), pred=cat("pred"), gold_prob=cat("gold_prob"))
        for i, p in enumerate(points):
            p[2][group] = float(pooled.correct[i].mean())
        examples[group], metrics[group] = pooled, "acc"


def _series(
    store: Any,
    keys: list[str],
    labels: list[str],
    steps: list[Any],
    tasks: list[Any],
    groups: dict[str, list[str]] | None = None,
) -> Any:
    """A StabilityReport over models already in the store, with per-example arrays from their scores."""
    from .ensemble import predictions, softmax_choices
    from .stability import ExampleArrays, StabilityReport
    from .store import task_key

    points = [(lab, st, {}) for lab, st in zip(labels, steps, strict=True)]
    examples = {}
    metrics = {}
    for task in tasks:
        if task.spec.kind not in ("multiple_choice", "minimal_pairs"):
            continue
        tk = task_key(task.spec.name, task.data_hash)
        mats = [store.choice_matrix(k, tk) for k in keys]
        common = _wanted(task, mats[0].doc_ids)
        for m in mats[1:]:
            common = np.intersect1d(common, m.doc_ids)
        rows = [np.searchsorted(m.doc_ids, common) for m in mats]
        gold = mats[0].gold[rows[0]]
        preds = np.stack([predictions(m.ll[r], m.chars[r])[0] for m, r in zip(mats, rows, strict=True)])
        probs = np.stack([softmax_choices(m.ll[r])[np.arange(len(r)), gold] for m, r in zip(mats, rows, strict=True)])
        correct = (preds == gold).astype(float)
        for i, p in enumerate(points):
            p[2][task.spec.name] = float(correct[i].mean())
        examples[task.spec.name] = ExampleArrays(correct=correct, pred=preds, gold_prob=probs)
        metrics[task.spec.name] = "acc"
    _add_groups(points, examples, metrics, groups)
    return StabilityReport.build(points, examples, metrics=metrics)


def _ensemble_series(
    store: Any,
    raw: list[EvalTarget],
    windows: list[tuple[int, int]],
    tasks: list[Any],
    groups: dict[str, list[str]] | None = None,
) -> Any:
    """Probability-averaging ensembles of the same windows, as a series with per-example arrays."""
    from .ensemble import softmax_choices
    from .stability import ExampleArrays, StabilityReport
    from .store import task_key

    points = [(f"{raw[s].label}..{raw[s + w - 1].label}", raw[s + w - 1].step, {}) for s, w in windows]
    examples, metrics = {}, {}
    for task in tasks:
        if task.spec.kind not in ("multiple_choice", "minimal_pairs"):
            continue
        tk = task_key(task.spec.name, task.data_hash)
        runs = [store.ensemble([t.key for t in raw[s : s + w]], tk) for s, w in windows]
        common = _wanted(task, runs[0]["doc_ids"])
        for r in runs[1:]:
            common = np.intersect1d(common, r["doc_ids"])
        rows = [np.searchsorted(r["doc_ids"], common) for r in runs]
        gold = runs[0]["gold"][rows[0]]
        preds = np.stack([r["pred_probability"][i] for r, i in zip(runs, rows, strict=True)])
        probs = []
        # Each checkpoint belongs to up to w windows: read its scores once per task, not once per window.
        matrices = {t.key: store.choice_matrix(t.key, tk) for s, w in windows for t in raw[s : s + w]}
        for (s, w), r, i in zip(windows, runs, rows, strict=True):
            mats = [matrices[t.key] for t in raw[s : s + w]]
            member = [softmax_choices(m.ll[np.searchsorted(m.doc_ids, r["doc_ids"][i])]) for m in mats]
            probs.append(np.mean(member, axis=0)[np.arange(len(i)), gold])
        correct = (preds == gold).astype(float)
        for j, p in enumerate(points):
            p[2][task.spec.name] = float(correct[j].mean())
        examples[task.spec.name] = ExampleArrays(correct=correct, pred=preds, gold_prob=np.stack(probs))
        metrics[task.spec.name] = "acc"
    _add_groups(points, examples, metrics, groups)
    return StabilityReport.build(points, examples, metrics=metrics)


def recommend(comparison: Any, tasks: list[str] | None = None) -> dict[str, Any]:
    """The window to publish: among window sizes whose averaged series is (nearly) the least unstable, the
    window position with the best mean score.

    Instability of a size is the mean over tasks of the example-level flip rate of its averaged series
    (task-level MTV when there are no per-example scores); sizes within ``INSTABILITY_TOLERANCE`` of the
    lowest tie. Among their windows the best mean score over tasks wins; ties go to the latest window.
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
    return {
        "window_size": w,
        "window": label,
        "mean_score": score,
        "instability": instability,
        "how": (
            f"window sizes whose averaged series has a mean flip rate within {INSTABILITY_TOLERANCE - 1:.0%} of the "
            f"lowest ({lowest:.4f}) were kept ({', '.join(str(c[1]) for c in stable)}); among their windows the "
            "best mean score over tasks was chosen, ties going to the latest"
        ),
    }


def run_sweep_recipe(
    recipe_path: str | Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    quiet: bool = False,
    keep: bool | None = None,
    out: str | Path | None = None,
    console: Any = None,
) -> SweepReport:
    from .pull import resolve_hub_sources
    from .recipe import HubSources, check_local_paths, load_recipe
    from .reports import write_outputs
    from .store import ResultsStore
    from .sweep_merge import plan_sweep, run_sweep

    recipe, _ = load_recipe(recipe_path)
    where = str(recipe_path)
    if recipe.sweep is None or recipe.evaluate is None:
        raise RecipeError(f"{where}: a sweep needs both a 'sweep:' block (sizes, stride) and an 'evaluate:' block")
    if isinstance(recipe.sources, HubSources):
        sources = resolve_hub_sources(recipe.sources, endpoint=endpoint, token=token, quiet=quiet).sources
    else:
        sources = [SourceRef(p, p.name) for p in check_local_paths(recipe, where)]
    sizes = recipe.sweep.sizes
    if max(sizes) > len(sources):
        raise RecipeError(
            f"{where}: field 'sweep.sizes': window {max(sizes)} is longer than the {len(sources)} sources"
        )
    tasks = load_recipe_tasks(recipe.evaluate)
    groups = task_groups(recipe.evaluate, tasks)
    store = ResultsStore(recipe.evaluate.results)
    raw = source_targets(sources)
    bs = recipe.evaluate.batch_size
    run_eval(plan_eval(raw, tasks, store), store, batch_size=bs, endpoint=endpoint, token=token, quiet=quiet)

    root = Path(recipe.output.path).expanduser().resolve()
    averaged_sizes = [w for w in sizes if w >= 2]
    keep = recipe.sweep.keep if keep is None else keep
    window_keys: dict[str, str] = {}

    def on_window(wo: Any) -> None:
        target = target_from_folder(wo.path, label=wo.window.name)
        window_keys[wo.window.name] = target.key
        run_eval(plan_eval([target], tasks, store), store, batch_size=bs, quiet=quiet)

    result = None
    if averaged_sizes:
        splan = plan_sweep(
            sources,
            averaged_sizes,
            root,
            stride=recipe.sweep.stride,
            method=recipe.method,
            decay=recipe.ema.decay if recipe.ema else None,
            dtype=recipe.dtype,
            max_shard_size=recipe.output.max_shard_size,
            max_windows_on_disk=recipe.sweep.max_windows_on_disk,
            name=recipe.name,
        )
        result = run_sweep(splan, on_window=on_window, keep=keep, quiet=quiet)
        for name in result.skipped:  # deleted in an earlier run: its scores are in the store
            window_keys[name] = _window_key(json.loads((root / f"{name}.deleted.json").read_text()))

    from .stability import compare
    from .sweep_merge import window_positions

    # With ``align``, every series covers the same window ends: from the first end the largest window reaches.
    first_end = max(sizes) - 1 if recipe.sweep.align else 0
    with store:  # one connection for the hundreds of reads below
        shown = raw[first_end:]
        keys, labels, steps = [t.key for t in shown], [t.label for t in shown], [t.step for t in shown]
        raw_report = _series(store, keys, labels, steps, tasks, groups)
        averaged, ensembled = {}, {}
        for w in averaged_sizes:
            positions = [
                (s, w)
                for s, size in window_positions(len(raw), [w], recipe.sweep.stride)
                if size == w and s + w - 1 >= first_end
            ]
            names = [n for n in splan.windows if n.size == w and n.end >= first_end]
            keys = [window_keys[n.name] for n in names]
            labels = [f"{raw[n.start].label}..{raw[n.end].label}" for n in names]
            averaged[w] = _series(store, keys, labels, [raw[n.end].step for n in names], tasks, groups)
            ensembled[w] = _ensemble_series(store, raw, positions, tasks, groups)
    comparison = compare(raw_report, averaged, ensembled)
    grouped = {m for members in groups.values() for m in members}
    plotted = [t for t in comparison.raw.tasks if t not in grouped] if groups else None
    report = SweepReport(comparison, recommend(comparison, plotted), headline=plotted)
    report.windows = len(window_keys)
    report.bytes_read = result.bytes_read if result else 0
    out_dir = Path(out) if out else root / "report"
    report.files = write_outputs(
        comparison, out_dir, model=recipe.name, source=f"hubmerge sweep {recipe_path}", plot_tasks=plotted
    )
    (out_dir / "recommendation.json").write_text(json.dumps(report.recommendation, indent=2) + "\n")
    report.files.append(out_dir / "recommendation.json")
    return report
