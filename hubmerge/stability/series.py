"""Per-example series from the results store: the one place stored log-likelihoods become stability inputs.

A series is a list of stored models in training order (raw checkpoints, windowed averages) or of windows of them
(probability-averaging ensembles, computed from stored scores with no model run). For each multiple-choice or
minimal-pairs task, :func:`choice_series` reads every model's choice matrix once and returns the aligned
per-example predictions, correctness and gold-choice probabilities that the metrics need; :func:`series_report`
and :func:`ensemble_report` turn them into a :class:`~hubmerge.stability.report.StabilityReport`. The sweep, the
stability command and the model card all read the store through here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hubmerge.results.keys import task_key
from hubmerge.results.scores import predictions, softmax_choices
from hubmerge.results.store import ChoiceMatrix, ResultsStore
from hubmerge.stability.report import ExampleArrays, StabilityReport

PER_EXAMPLE_KINDS = ("multiple_choice", "minimal_pairs")


@dataclass(frozen=True)
class Member:
    """A stored model as a series sees it: its store key, how tables name it, and where it is in training."""

    key: str
    label: str
    step: int | float | None = None


@dataclass(frozen=True)
class SeriesTask:
    """What a series needs of a task: its name, kind and data hash (its store key), and which examples count.

    ``wanted`` limits the series to those doc ids (a task evaluated on its first N examples is reported on
    those N, whatever else the store holds); None counts everything stored.
    """

    name: str
    kind: str
    data_hash: str
    wanted: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        return task_key(self.name, self.data_hash)


@dataclass(frozen=True)
class ChoiceSeries:
    """Per-example results of one task along a series, each ``[models, examples]``.

    With ``present`` None, the examples are those every model has (the common set); otherwise they are the union
    and ``present`` marks which model has which.
    """

    doc_ids: np.ndarray
    gold: np.ndarray
    pred: np.ndarray
    correct: np.ndarray
    gold_prob: np.ndarray
    present: np.ndarray | None = None

    def arrays(self) -> ExampleArrays:
        return ExampleArrays(correct=self.correct, pred=self.pred, gold_prob=self.gold_prob, present=self.present)


def _common(doc_id_sets: Sequence[np.ndarray], wanted: tuple[int, ...] | None) -> np.ndarray:
    common = doc_id_sets[0]
    if wanted is not None:
        common = np.intersect1d(common, np.asarray(wanted, dtype=common.dtype))
    for ids in doc_id_sets[1:]:
        common = np.intersect1d(common, ids)
    return common


def choice_series(
    store: ResultsStore,
    keys: Sequence[str],
    task: str,
    *,
    metric: str = "acc",
    wanted: tuple[int, ...] | None = None,
    union: bool = False,
    matrices: Mapping[str, ChoiceMatrix] | None = None,
) -> ChoiceSeries:
    """The aligned per-example results of models ``keys`` (in order) on the task with store key ``task``.

    ``metric``: ``acc`` (argmax of the log-likelihood) or ``acc_norm`` (per character), as lm-eval predicts.
    ``union``: align over every example any model has, with a ``present`` mask, instead of the common ones.
    ``matrices`` are choice matrices already read (a model in several windows is read once).
    """
    mats = [matrices[k] if matrices is not None and k in matrices else store.choice_matrix(k, task) for k in keys]
    if union:
        ids = np.unique(np.concatenate([m.doc_ids for m in mats])) if mats else np.zeros(0, dtype=np.int64)
        if wanted is not None:
            ids = np.intersect1d(ids, np.asarray(wanted, dtype=ids.dtype))
    else:
        ids = _common([m.doc_ids for m in mats], wanted)
    shape = (len(mats), len(ids))
    pred = np.zeros(shape, dtype=np.int64)
    prob = np.zeros(shape, dtype=np.float64)
    gold = np.zeros(len(ids), dtype=np.int64)
    present = np.zeros(shape, dtype=bool)
    for i, m in enumerate(mats):
        if len(m.doc_ids) == 0:
            continue
        pos = np.searchsorted(ids, m.doc_ids)
        has = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == m.doc_ids) if len(ids) else pos < 0
        rows, cols = np.flatnonzero(has), pos[has]
        ll = m.ll[rows]
        by_acc, by_norm = predictions(ll, m.chars[rows])
        pred[i, cols] = by_norm if metric == "acc_norm" else by_acc
        prob[i, cols] = softmax_choices(ll)[np.arange(len(rows)), m.gold[rows]]
        gold[cols] = m.gold[rows]
        present[i, cols] = True
    correct = (pred == gold).astype(float)
    return ChoiceSeries(ids, gold, pred, correct, prob, present if union else None)


def _add_groups(
    points: list[tuple[str, Any, dict[str, float]]],
    examples: dict[str, ExampleArrays],
    metrics: dict[str, str],
    groups: Mapping[str, Sequence[str]] | None,
) -> None:
    """A group's row pools its paradigms' examples, as lm-eval's size-weighted group score does."""
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


def _report(
    points: list[tuple[str, Any, dict[str, float]]],
    per_task: Mapping[str, ChoiceSeries],
    groups: Mapping[str, Sequence[str]] | None,
) -> StabilityReport:
    examples: dict[str, ExampleArrays] = {}
    metrics: dict[str, str] = {}
    for name, series in per_task.items():
        for i, p in enumerate(points):
            p[2][name] = float(series.correct[i].mean())
        examples[name], metrics[name] = series.arrays(), "acc"
    _add_groups(points, examples, metrics, groups)
    return StabilityReport.build(points, examples, metrics=metrics)


def series_report(
    store: ResultsStore,
    members: Sequence[Member],
    tasks: Sequence[SeriesTask],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> StabilityReport:
    """A StabilityReport over stored models in order, with per-example arrays from their scores (common examples)."""
    points = [(m.label, m.step, {}) for m in members]
    keys = [m.key for m in members]
    per_task = {
        t.name: choice_series(store, keys, t.key, wanted=t.wanted) for t in tasks if t.kind in PER_EXAMPLE_KINDS
    }
    return _report(points, per_task, groups)


def ensemble_report(
    store: ResultsStore,
    members: Sequence[Member],
    windows: Sequence[tuple[int, int]],
    tasks: Sequence[SeriesTask],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> StabilityReport:
    """Probability-averaging ensembles of ``(start, size)`` windows of ``members``, as a series with per-example
    arrays: each example's prediction is the argmax of the members' mean softmax, its gold probability that mean's
    gold entry."""
    points = [(f"{members[s].label}..{members[s + w - 1].label}", members[s + w - 1].step, {}) for s, w in windows]
    per_task = {}
    for task in tasks:
        if task.kind not in PER_EXAMPLE_KINDS:
            continue
        runs = [store.ensemble([m.key for m in members[s : s + w]], task.key) for s, w in windows]
        common = _common([r["doc_ids"] for r in runs], task.wanted)
        rows = [np.searchsorted(r["doc_ids"], common) for r in runs]
        gold = runs[0]["gold"][rows[0]]
        preds = np.stack([r["pred_probability"][i] for r, i in zip(runs, rows, strict=True)])
        # Each checkpoint belongs to up to w windows: read its scores once per task, not once per window.
        matrices = {m.key: store.choice_matrix(m.key, task.key) for s, w in windows for m in members[s : s + w]}
        probs = []
        for (s, w), r, i in zip(windows, runs, rows, strict=True):
            mats = [matrices[m.key] for m in members[s : s + w]]
            member = [softmax_choices(m.ll[np.searchsorted(m.doc_ids, r["doc_ids"][i])]) for m in mats]
            probs.append(np.mean(member, axis=0)[np.arange(len(i)), gold])
        correct = (preds == gold).astype(float)
        per_task[task.name] = ChoiceSeries(common, gold, preds, correct, np.stack(probs))
    return _report(points, per_task, groups)
