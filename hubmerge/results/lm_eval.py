"""Read lm-evaluation-harness result files (aggregate scores only) into per-task score series ordered by step.

Published trajectories (Pythia's ``evals/``, OLMo's, your own runs) are usually lm-eval JSON files, one per
checkpoint, so ``hubmerge stability`` can measure instability without evaluating anything. Layouts read:

- lm-eval 0.3 (Pythia's files): ``results[task][metric]``, ``versions``, ``config.model_args`` as a
  ``"pretrained=...,revision=step1000"`` string;
- lm-eval 0.4: ``results[task]["acc,none"]`` (metric, filter), an ``alias`` per task, ``configs``, ``groups``,
  ``n-shot``, ``config.model_args`` as a string or a dict, ``model_name``.

A metric under the default filter ``none`` is read as plain ``acc``; other filters keep their name
(``exact_match,strict-match``). The step is taken from the revision in ``model_args`` (``step1000``,
``step1000-tokens4B``) and from the file name (``160m_step1000.json``); when both are there they must agree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hubmerge.errors import StabilityError

DEFAULT_METRICS = ("acc",)
_STEP = re.compile(r"step[-_]?(\d+)", re.IGNORECASE)
# lm-eval 0.3 files (Pythia's) name no groups; these subtask name patterns are the groups lm-eval 0.4 defines.
NAMED_GROUPS = {"mmlu": re.compile(r"^hendrycksTest-"), "blimp": re.compile(r"^blimp_")}


@dataclass(frozen=True)
class EvalFile:
    """One result file: ``results[task][metric]`` as floats, and where in training it was evaluated."""

    path: Path
    step: int | None
    revision: str | None
    model: str | None
    results: dict[str, dict[str, float]]
    num_fewshot: int | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)  # lm-eval 0.4 group -> its leaf tasks
    sizes: dict[str, int] = field(default_factory=dict)  # task -> examples scored (n-samples effective)

    @property
    def label(self) -> str:
        return self.revision or (f"step{self.step}" if self.step is not None else self.path.stem)


def model_args(config: Mapping[str, Any]) -> dict[str, str]:
    """``config.model_args`` as a mapping: lm-eval 0.4.13 writes a dict, older versions ``k=v,k=v``."""
    args = config.get("model_args")
    if isinstance(args, Mapping):
        return {str(k): str(v) for k, v in args.items()}
    if isinstance(args, str):
        return dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    return {}


def _metrics(task: str, raw: Any, path: Path) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise StabilityError(f"{path}: results[{task!r}] is {type(raw).__name__}, expected an object of metrics")
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key == "alias" or isinstance(value, (str, bool)) or value is None:
            continue  # labels, and lm-eval's "N/A" stderr for metrics without one
        if not isinstance(value, (int, float)):
            raise StabilityError(f"{path}: results[{task!r}][{key!r}] is {value!r}, expected a number")
        name = key[: -len(",none")] if key.endswith(",none") else key
        out[name] = float(value)
    return out


def read_results(path: str | Path, step: int | None = None) -> EvalFile:
    """One lm-eval result file; ``step`` overrides what the file name and revision say."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise StabilityError(f"{path}: cannot read the lm-eval result file ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StabilityError(f"{path}: not a JSON file ({e})") from e
    if not isinstance(data, Mapping) or not isinstance(data.get("results"), Mapping):
        raise StabilityError(f"{path}: no 'results' object; is this an lm-evaluation-harness result file?")
    config = data.get("config") if isinstance(data.get("config"), Mapping) else {}
    args = model_args(config)
    revision = args.get("revision")
    model = args.get("pretrained") or (data.get("model_name") if isinstance(data.get("model_name"), str) else None)
    from_name = _STEP.search(path.stem)
    from_rev = _STEP.search(revision) if revision else None
    if from_name and from_rev and int(from_name.group(1)) != int(from_rev.group(1)):
        raise StabilityError(
            f"{path}: the file name says step {from_name.group(1)} but model_args says revision={revision}; "
            "rename the file or fix its config"
        )
    if step is None:
        found = from_rev or from_name
        step = int(found.group(1)) if found else None
    fewshot = config.get("num_fewshot")
    results = {str(task): _metrics(str(task), raw, path) for task, raw in data["results"].items()}
    subtasks = data.get("group_subtasks") if isinstance(data.get("group_subtasks"), Mapping) else {}
    subtasks = {str(g): [str(t) for t in ts] for g, ts in subtasks.items() if isinstance(ts, list) and ts}
    groups = {g: leaves for g in subtasks if (leaves := group_leaves(g, subtasks))}
    counts = data.get("n-samples") if isinstance(data.get("n-samples"), Mapping) else {}
    sizes = {
        str(t): int(c["effective"])
        for t, c in counts.items()
        if isinstance(c, Mapping) and isinstance(c.get("effective"), int)
    }
    return EvalFile(path, step, revision, model, results, fewshot if isinstance(fewshot, int) else None, groups, sizes)


def group_leaves(group: str, subtasks: Mapping[str, list[str]], seen: frozenset[str] = frozenset()) -> list[str]:
    """A group's tasks, nested groups expanded (``group_subtasks`` lists subgroups by name; a name listed with no
    members, as early 0.4 releases listed every standalone task, is a task)."""
    out: list[str] = []
    for member in subtasks.get(group, []):
        if subtasks.get(member) and member not in seen:
            out += group_leaves(member, subtasks, seen | {group})
        else:
            out.append(member)
    return out


def result_files(where: str | Path | Iterable[str | Path]) -> list[Path]:
    """Each folder's ``*.json`` files (not recursive) and each given file; a folder's files sorted by name."""
    items = [where] if isinstance(where, (str, Path)) else list(where)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise StabilityError(f"{p}: no *.json lm-eval result files in this folder")
            files += found
        else:
            files.append(p)
    return files


@dataclass(frozen=True)
class LmEvalTrajectory:
    """Per-task score series over result files ordered by step; ``skipped`` says which tasks were left out, why."""

    files: tuple[EvalFile, ...]
    model: str | None
    metric: dict[str, str]
    scores: dict[str, np.ndarray]
    stderr: dict[str, np.ndarray | None]
    skipped: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> member tasks with series
    group_notes: dict[str, str] = field(default_factory=dict)  # how each group's series was made

    @property
    def headline(self) -> list[str]:
        """What tables and plots show: each group's series in place of its members, and the other tasks."""
        members = {m for ms in self.groups.values() for m in ms}
        return [t for t in self.scores if t not in members]

    @property
    def steps(self) -> list[int | None]:
        return [f.step for f in self.files]

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self.files]

    def points(self, tasks: Iterable[str] | None = None) -> list[tuple[str, int | None, dict[str, float]]]:
        """``(label, step, {task: score})`` per file: the input of ``StabilityReport.build``."""
        names = list(self.scores) if tasks is None else list(tasks)
        return [(f.label, f.step, {t: float(self.scores[t][i]) for t in names}) for i, f in enumerate(self.files)]


def _task_series(task: str, files: Sequence[EvalFile], prefs: Sequence[str]) -> tuple[str, np.ndarray] | str:
    """The chosen metric and its values over ``files``, or why the task cannot be read."""
    missing = next((f for f in files if task not in f.results), None)
    if missing:
        return f"no results for it in {missing.path}"
    first = files[0].results[task]
    name = next((m for m in prefs if m in first), None)
    if name is None:
        return f"none of the metrics {', '.join(prefs)} in {files[0].path} (it has {', '.join(sorted(first))})"
    lacking = next((f for f in files if name not in f.results[task]), None)
    if lacking:
        return f"no {name!r} in {lacking.path}"
    for f in files:
        if not math.isfinite(f.results[task][name]):
            raise StabilityError(f"{f.path}: task {task!r} has {name} = {f.results[task][name]}, not a number")
    return name, np.array([f.results[task][name] for f in files], dtype=np.float64)


def load_results(
    where: str | Path | Iterable[str | Path],
    metric: str | Sequence[str] = DEFAULT_METRICS,
    *,
    metrics: Mapping[str, str] | None = None,
    tasks: Iterable[str] | None = None,
) -> LmEvalTrajectory:
    """Score series per task from lm-eval result files, ordered by training step.

    ``metric`` is the primary metric, or a preference list (``("acc", "acc_norm")``) tried in order; ``metrics``
    overrides it per task (``{"lambada_openai": "ppl"}``). Without ``tasks``, every task is read whose metric
    every file has, and the others are listed in ``skipped``; a task asked for by name must be complete.
    """
    files = [read_results(p) for p in result_files(where)]
    if not files:
        raise StabilityError("no lm-eval result files given")
    no_step = [str(f.path) for f in files if f.step is None]
    if no_step:
        raise StabilityError(
            f"{no_step[0]}: no training step in the file name (…_step1000.json) or in model_args' revision; "
            "rename the file so that it carries the step"
        )
    by_step: dict[int, EvalFile] = {}
    for f in files:
        if f.step in by_step:
            raise StabilityError(f"{by_step[f.step].path} and {f.path} are both step {f.step}; keep one")
        by_step[f.step] = f
    files = [by_step[s] for s in sorted(by_step)]
    models = {f.model for f in files if f.model}
    if len(models) > 1:
        first = {m: next(str(f.path) for f in files if f.model == m) for m in sorted(models)}
        raise StabilityError(
            "the files evaluate different models, so they are not one trajectory: "
            + "; ".join(f"{m} ({p})" for m, p in first.items())
        )
    preference = (metric,) if isinstance(metric, str) else tuple(metric)
    overrides = dict(metrics or {})
    asked = None if tasks is None else list(tasks)
    names = asked if asked is not None else sorted({t for f in files for t in f.results})
    chosen: dict[str, str] = {}
    scores: dict[str, np.ndarray] = {}
    stderr: dict[str, np.ndarray | None] = {}
    skipped: dict[str, str] = {}
    for task in names:
        found = _task_series(task, files, (overrides[task],) if task in overrides else preference)
        if isinstance(found, str):
            if asked is not None:
                raise StabilityError(f"task {task!r}: {found}")
            skipped[task] = found
            continue
        chosen[task], scores[task] = found
        err = f"{chosen[task]}_stderr"
        has_err = all(err in f.results[task] for f in files)
        stderr[task] = np.array([f.results[task][err] for f in files]) if has_err else None
    groups, notes = _groups(files, scores, chosen, stderr)
    return LmEvalTrajectory(tuple(files), next(iter(models), None), chosen, scores, stderr, skipped, groups, notes)


def _groups(
    files: Sequence[EvalFile],
    scores: dict[str, np.ndarray],
    chosen: dict[str, str],
    stderr: dict[str, np.ndarray | None],
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each lm-eval group among the series, with a series of its own: lm-eval's where the files hold it, else the
    members' mean, size-weighted where every file gives the sizes (as lm-eval aggregates), unweighted otherwise.
    ``scores`` and ``chosen`` gain the computed groups."""
    declared: dict[str, list[str]] = {}
    for f in files:
        for g, members in f.groups.items():
            declared.setdefault(g, list(dict.fromkeys(members)))
    if not declared:  # lm-eval 0.3: groups by subtask name
        for g, pattern in NAMED_GROUPS.items():
            members = [t for t in scores if pattern.match(t)]
            if members:
                declared[g] = members
    groups, notes = {}, {}
    for g, members in declared.items():
        have = [m for m in members if m in scores]
        if len(have) < 2:
            continue
        groups[g] = have
        if g in scores:
            notes[g] = f"lm-eval's own score of the group ({len(have)} tasks)"
            continue
        metric_names = {chosen[m] for m in have}
        sizes = [[f.sizes.get(m) for m in have] for f in files]
        if all(all(isinstance(n, int) and n > 0 for n in row) for row in sizes):
            weights = np.asarray(sizes, dtype=np.float64)
            notes[g] = f"mean of {len(have)} tasks weighted by their sizes, as lm-eval aggregates a group"
        else:
            weights = np.ones((len(files), len(have)))
            notes[g] = f"unweighted mean of {len(have)} tasks (the files give no task sizes)"
        stacked = np.stack([scores[m] for m in have], axis=1)
        scores[g] = (stacked * weights).sum(axis=1) / weights.sum(axis=1)
        chosen[g] = metric_names.pop() if len(metric_names) == 1 else "mean score"
        stderr[g] = None
    return groups, notes
