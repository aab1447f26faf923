"""How unstable downstream scores are along a pretraining trajectory: pure numpy, no model, no I/O.

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

Uncertainty: :func:`mean_stderr` is a score's standard error over examples as lm-eval reports ``acc_stderr``
(``sqrt(var(ddof=1) / n)``); :func:`bootstrap_interval` and :func:`series_intervals` give fixed-seed 95%
percentile bootstrap intervals over examples for the instability figures; over several tasks at once,
:func:`stratified_bootstrap_interval` resamples within each task, :func:`tasks_mean_stderr` combines per-task
errors of an unweighted mean over tasks, and :func:`paired_difference` compares two models on the same examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hubmerge.errors import StabilityError
from hubmerge.results.scores import softmax_choices  # the same softmax the probability ensemble uses

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


def score_series(
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
    s = score_series(scores, labels=labels)
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
    s = score_series(scores)
    if s.size == 1:
        return math.nan, None
    falls = s[:-1] - s[1:]
    t = int(np.argmax(falls))  # first maximum: ties go to the earliest fall
    return (float(falls[t]), t) if falls[t] > 0 else (0.0, None)


def window_stats(scores: Sequence[float] | np.ndarray, window: int | None = None, stride: int = 1) -> list[WindowStats]:
    """Mean, population std, range and worst drop in each window of ``window`` points, starts 0, s, 2s, ...

    ``window=None`` (or one longer than the series) is the whole series as a single window.
    """
    s = score_series(scores)
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


# --- uncertainty ------------------------------------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def mean_stderr(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of a mean over examples, as lm-eval's ``acc_stderr``: ``sqrt(var(ddof=1) / n)``.

    lm-eval's ``mean_stderr`` is the sample standard deviation over √n; NaN for fewer than two examples
    (one example has no spread to estimate from).
    """
    arr = _array(values, "per-example values").ravel()
    if arr.size and not np.isfinite(arr).all():
        raise StabilityError("per-example values: a NaN or infinite value; leave absent examples out instead")
    if arr.size < 2:
        return math.nan
    return float(math.sqrt(arr.var(ddof=1) / arr.size))


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n_examples: int,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """A percentile bootstrap interval over examples: ``statistic(idx)`` is evaluated on ``resamples`` draws of
    ``n_examples`` example indices with replacement (a fixed-seed generator, so the same inputs give the same
    interval), and the central ``level`` share of the values is returned as ``(low, high)``.

    ``statistic`` gets the index array and returns one number (e.g. the flip rate of ``correct[:, idx]``); a draw
    on which it is undefined (NaN, or a :class:`StabilityError` such as a step with no example in common) is left
    out. ``(nan, nan)`` when no draw is defined or there are no examples.
    """
    return stratified_bootstrap_interval(
        lambda idx: statistic(idx[0]), [n_examples], resamples=resamples, level=level, seed=seed
    )


def stratified_bootstrap_interval(
    statistic: Callable[[list[np.ndarray]], float],
    sizes: Sequence[int],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """:func:`bootstrap_interval` over several tasks at once: each draw resamples every task's examples within
    that task (``sizes[k]`` indices with replacement for task k), so a statistic over tasks (a mean over tasks of
    flip rates) keeps each task's size, as the point estimate does. One stratum draws exactly what
    :func:`bootstrap_interval` draws. ``(nan, nan)`` when a task has no examples or no draw is defined.
    """
    if not sizes or min(sizes) < 1 or resamples < 1:
        return math.nan, math.nan
    if not 0 < level < 1:
        raise StabilityError(f"bootstrap level {level}: must be between 0 and 1")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = [rng.integers(0, n, size=n) for n in sizes]
        try:
            v = float(statistic(idx))
        except StabilityError:
            continue
        if math.isfinite(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.asarray(values), [tail, 100 - tail])
    return float(low), float(high)


def tasks_mean_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of an unweighted mean over T tasks of independent per-task means: ``sqrt(Σ se_t²) / T``.

    The sweep's mean score is such a mean (each task counts once, whatever its size). lm-eval's group stderr
    (``pooled_sample_stderr``) is for a size-weighted mean, which this is not; a group such as BLiMP is one task
    here, its se computed directly on its pooled examples (lm-eval's pooled formula approximates exactly that,
    leaving out the spread between its subtasks' means). NaN if any task's se is (one example).
    """
    se = np.asarray(stderrs, dtype=np.float64)
    if se.size == 0 or not np.isfinite(se).all():
        return math.nan
    return float(math.sqrt(float((se**2).sum())) / se.size)


def mean_flip_rate_interval(
    series: Sequence[tuple[np.ndarray, np.ndarray | None]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Bootstrap interval of the mean over tasks of the flip rate, from each task's ``(correct[m, n], present)``;
    examples are resampled within each task (:func:`stratified_bootstrap_interval`)."""
    checked = [_per_example(c, p, "correctness") for c, p in series]

    def stat(idx: list[np.ndarray]) -> float:
        return float(np.mean([flip_rate(c[:, i], p[:, i]) for (c, p), i in zip(checked, idx, strict=True)]))

    sizes = [c.shape[1] for c, _ in checked]
    return stratified_bootstrap_interval(stat, sizes, resamples=resamples, level=level, seed=seed)


@dataclass(frozen=True)
class PairedDifference:
    """Model A minus model B on the same examples, as a mean over tasks of per-task mean differences."""

    difference: float
    stderr: float  # tasks_mean_stderr of each task's mean_stderr of the per-example differences
    interval: tuple[float, float]  # stratified percentile bootstrap over examples
    n_examples: int

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes 0: A and B differ beyond what resampling the examples explains."""
        low, high = self.interval
        return bool(math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0))


def paired_difference(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> PairedDifference:
    """Paired difference of two models' per-example values (correctness) over the same examples, per task
    ``(a[n], b[n])``: pairing removes the between-example spread both share, so it is far tighter than comparing
    two independent intervals. The difference is the mean over tasks of ``mean(a - b)``."""
    diffs = [_array(a, "per-example values").ravel() - _array(b, "per-example values").ravel() for a, b in pairs]
    if not diffs or any(d.size == 0 for d in diffs):
        raise StabilityError("a paired difference needs at least one example in every task")

    def stat(idx: list[np.ndarray]) -> float:
        return float(np.mean([d[i].mean() for d, i in zip(diffs, idx, strict=True)]))

    return PairedDifference(
        difference=float(np.mean([d.mean() for d in diffs])),
        stderr=tasks_mean_stderr([mean_stderr(d) for d in diffs]),
        interval=stratified_bootstrap_interval(
            stat, [d.size for d in diffs], resamples=resamples, level=level, seed=seed
        ),
        n_examples=int(sum(d.size for d in diffs)),
    )


def series_intervals(
    correct: np.ndarray,
    pred: np.ndarray | None,
    present: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of the task-level MTV, the flip rate and (with ``pred``) the IS of a series of models,
    resampling examples (the columns of ``correct[m, n]``) together, so the three share each draw.

    A model's score on a draw is its accuracy over the drawn examples it has (``present``).
    """
    correct, mask = _per_example(correct, present, "correctness")

    def mtv(idx: np.ndarray) -> float:
        c, p = correct[:, idx], mask[:, idx]
        counts = p.sum(axis=1)
        if (counts == 0).any():
            return math.nan
        return mean_total_variation((c * p).sum(axis=1) / counts)

    out = {
        "mtv": bootstrap_interval(mtv, correct.shape[1], resamples=resamples, level=level, seed=seed),
        "flip_rate": bootstrap_interval(
            lambda idx: flip_rate(correct[:, idx], mask[:, idx]),
            correct.shape[1],
            resamples=resamples,
            level=level,
            seed=seed,
        ),
    }
    if pred is not None:
        pred_arr, _ = _per_example(pred, mask, "predictions")
        out["instability_score"] = bootstrap_interval(
            lambda idx: instability_score(pred_arr[:, idx], mask[:, idx]),
            correct.shape[1],
            resamples=resamples,
            level=level,
            seed=seed,
        )
    return out
