"""Stability metrics against values worked out by hand (binary fractions, so equality is exact)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from hubmerge.errors import HubmergeError, StabilityError
from hubmerge.stability.metrics import (
    align_examples,
    example_mean_total_variation,
    flip_rate,
    from_example_rows,
    gold_probability,
    instability_score,
    mean_total_variation,
    window_stats,
    worst_drop,
)
from hubmerge.stability.report import ExampleArrays, StabilityReport, compare

# --- task level ----------------------------------------------------------------------------------------------------


def test_mtv_by_hand():
    # |0.75 - 0.5| + |0.25 - 0.75| = 0.75 over m - 1 = 2 steps
    assert mean_total_variation([0.5, 0.75, 0.25]) == 0.375
    assert mean_total_variation([0.25, 0.5]) == 0.25


def test_mtv_ties_constant_series_is_zero():
    assert mean_total_variation([0.5, 0.5, 0.5]) == 0.0
    assert worst_drop([0.5, 0.5, 0.5]) == (0.0, None)


def test_single_checkpoint_is_undefined_not_zero():
    assert math.isnan(mean_total_variation([0.7]))
    drop, at = worst_drop([0.7])
    assert math.isnan(drop) and at is None
    (w,) = window_stats([0.7])
    assert w.mean == 0.7 and math.isnan(w.std) and math.isnan(w.range)


def test_no_checkpoint_is_refused():
    with pytest.raises(StabilityError, match="no checkpoints"):
        mean_total_variation([])


def test_nan_score_refused_naming_the_checkpoint():
    with pytest.raises(StabilityError, match=r"checkpoint 1 \(step2000\).*not a number"):
        mean_total_variation([0.5, float("nan"), 0.25], labels=["step1000", "step2000", "step3000"])
    with pytest.raises(StabilityError, match="not a number"):
        mean_total_variation([0.5, float("inf")])
    assert issubclass(StabilityError, HubmergeError) and StabilityError.exit_code == 2


def test_worst_drop_is_the_largest_fall_and_ties_go_to_the_earliest():
    assert worst_drop([0.5, 0.25, 0.75, 0.5]) == (0.25, 0)  # two falls of 0.25: the first
    assert worst_drop([0.25, 0.75, 0.125]) == (0.625, 1)
    assert worst_drop([0.25, 0.5, 0.75]) == (0.0, None)  # never falls


# --- windows -------------------------------------------------------------------------------------------------------


def test_window_stats_by_hand():
    s = [0.5, 0.75, 0.25, 0.5]
    w0, w1 = window_stats(s, window=3)
    # [0.5, 0.75, 0.25]: mean 0.5; population std sqrt((0 + 0.0625 + 0.0625) / 3); range 0.5; fall 0.75 -> 0.25
    assert (w0.start, w0.stop, w0.mean, w0.range, w0.worst_drop, w0.worst_drop_at) == (0, 3, 0.5, 0.5, 0.5, 1)
    assert w0.std == pytest.approx(math.sqrt(0.125 / 3), abs=1e-15)
    # [0.75, 0.25, 0.5]: the same numbers, the fall is again at checkpoint 1 -> 2
    assert (w1.start, w1.stop, w1.mean, w1.range, w1.worst_drop, w1.worst_drop_at) == (1, 4, 0.5, 0.5, 0.5, 1)


def test_window_stride_and_population_std():
    a, b = window_stats([0.5, 0.75, 0.25, 0.5], window=2, stride=2)
    assert (a.start, b.start) == (0, 2)
    assert a.std == 0.125 and b.std == 0.125  # population: |x - y| / 2, not |x - y| / sqrt(2)
    assert a.worst_drop == 0.0 and a.worst_drop_at is None  # both windows rise
    # a tail shorter than the window is not a window of its own
    assert [w.start for w in window_stats([0.0] * 5, window=2, stride=2)] == [0, 2]


def test_window_longer_than_series_is_the_whole_series_and_window_one_is_refused():
    (w,) = window_stats([0.5, 0.75], window=8)
    assert (w.start, w.stop, w.range) == (0, 2, 0.25)
    with pytest.raises(StabilityError, match="at least 2 points"):
        window_stats([0.5, 0.75], window=1)


# --- example level -------------------------------------------------------------------------------------------------


def test_flip_rate_by_hand():
    correct = [[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]]
    # step 1: example 0 flips (1/4); step 2: examples 0, 1, 3 flip (3/4); mean 1/2
    assert flip_rate(correct) == 0.5
    assert example_mean_total_variation(correct) == 0.5


def test_gold_probability_mtv_by_hand():
    gold_prob = [[0.5, 0.25], [0.75, 0.25], [0.75, 0.5]]
    # step 1: (0.25 + 0) / 2; step 2: (0 + 0.25) / 2; mean 0.125
    assert example_mean_total_variation(gold_prob) == 0.125


def test_instability_score_counts_answer_changes_even_between_wrong_answers():
    pred = [[0, 1, 2, 3], [0, 2, 2, 3], [1, 2, 2, 0]]
    # step 1: example 1 changes (1/4); step 2: examples 0 and 3 change (2/4); mean 3/8
    assert instability_score(pred) == 0.375
    # gold is 0 for both examples: 1 -> 2 keeps both wrong, so the flip rate stays 0 while IS does not
    pred2 = np.array([[1, 0], [2, 0]])
    assert instability_score(pred2) == 0.5
    assert flip_rate((pred2 == 0).astype(int)) == 0.0


def test_example_metrics_on_one_checkpoint_are_nan():
    assert math.isnan(flip_rate([[1, 0]]))
    assert math.isnan(instability_score([[1, 0]]))
    assert math.isnan(example_mean_total_variation([[0.5, 0.25]]))


def test_missing_examples_are_compared_pairwise():
    ids, values, present = align_examples([{"a": 1, "b": 0, "c": 1}, {"a": 0, "c": 1}, {"a": 0, "b": 1, "c": 0}])
    assert ids == ["a", "b", "c"]
    assert present.tolist() == [[True, True, True], [True, False, True], [True, True, True]]
    # step 1 over {a, c}: a flips -> 1/2; step 2 over {a, c}: c flips -> 1/2. b (missing at 1) takes no part.
    assert flip_rate(values, present) == 0.5
    # the same pairwise rule for predictions and probabilities
    assert instability_score(values, present) == 0.5
    assert example_mean_total_variation(values, present) == 0.5


def test_pair_without_common_examples_is_refused():
    present = np.array([[True, False], [False, True]])
    with pytest.raises(StabilityError, match="checkpoints 0 and 1 have no example in common"):
        flip_rate(np.array([[1, 0], [0, 1]]), present)


def test_nan_example_value_refused_unless_marked_missing():
    values = np.array([[1.0, np.nan], [0.0, 1.0]])
    with pytest.raises(StabilityError, match="checkpoint 0, example 1 is not a number.*present mask"):
        flip_rate(values)
    present = ~np.isnan(values)
    assert flip_rate(values, present) == 1.0  # only example 0 is compared, and it flips


def test_bad_per_example_values_refused():
    with pytest.raises(StabilityError, match="0 or 1"):
        flip_rate([[1, 0], [0.5, 1]])
    with pytest.raises(StabilityError, match="integer >= 0"):
        instability_score([[1, -1], [0, 1]])
    with pytest.raises(StabilityError, match="2-d"):
        flip_rate([1, 0, 1])
    with pytest.raises(StabilityError, match="present mask has shape"):
        flip_rate([[1, 0], [0, 1]], present=np.ones((2, 3), dtype=bool))


def test_gold_probability_softmax_ties_and_padding():
    ll = np.array([[-1.0, -1.0], [np.log(0.25), np.log(0.75)], [0.0, np.nan]])
    p = gold_probability(ll, [1, 1, 0])
    assert p[0] == 0.5  # a tie shares the mass
    assert p[1] == pytest.approx(0.75, abs=1e-12)
    assert p[2] == 1.0  # the only real choice of a padded row
    with pytest.raises(StabilityError, match="outside"):
        gold_probability(ll, [0, 0, 1])  # choice 1 of row 2 is padding


def test_from_example_rows_transposes_and_marks_none():
    values, present = from_example_rows([[1, None, 0], [0, 1, 1]])
    assert values.shape == (3, 2)
    assert present.tolist() == [[True, True], [False, True], [True, True]]
    with pytest.raises(StabilityError, match="one value per checkpoint"):
        from_example_rows([[1, 0], [1]])


# --- report and comparison -----------------------------------------------------------------------------------------

POINTS = [
    ("step1", 1, {"a": 0.5, "b": 0.25}),
    ("step2", 2, {"a": 0.75, "b": 0.25}),
    ("step4", 4, {"a": 0.25, "b": 0.5}),
]


def test_report_per_task_by_hand(tmp_path):
    correct = np.array([[1, 0], [1, 1], [0, 1]])
    report = StabilityReport.build(
        POINTS, {"a": ExampleArrays(correct=correct, pred=1 - correct)}, metrics={"a": "acc", "b": "acc"}
    )
    a, b = report.tasks["a"], report.tasks["b"]
    assert (a.metric, a.n_points, a.mean, a.mtv, a.range, a.worst_drop) == ("acc", 3, 0.5, 0.375, 0.5, 0.5)
    assert (a.worst_drop_from, a.worst_drop_to) == ("step2", "step4")
    assert (a.flip_rate, a.instability_score, a.n_examples) == (0.5, 0.5, 2)
    assert a.gold_prob_mtv is None
    assert (b.mtv, b.worst_drop, b.worst_drop_from, b.flip_rate) == (0.125, 0.0, None, None)
    assert report.steps == (1.0, 2.0, 4.0)

    rows = list(csv.DictReader(report.to_csv(tmp_path / "r.csv").open()))
    assert [r["task"] for r in rows] == ["a", "b"]
    assert float(rows[0]["mtv"]) == 0.375 and rows[1]["flip_rate"] == ""
    data = json.loads(report.to_json(tmp_path / "r.json").read_text())
    assert data["tasks"][0]["windows"][0]["worst_drop_at"] == 1
    assert "2510.04848" in data["citation"]


def test_report_on_one_checkpoint_writes_empty_cells_and_null(tmp_path):
    report = StabilityReport.build([("step1", 1, {"a": 0.5})], {"a": ExampleArrays(correct=np.array([[1, 0]]))})
    t = report.tasks["a"]
    assert t.mean == 0.5 and math.isnan(t.mtv) and math.isnan(t.std) and math.isnan(t.flip_rate)
    row = next(csv.DictReader(report.to_csv(tmp_path / "r.csv").open()))
    assert row["mtv"] == "" and row["mean"] == "0.5"
    data = json.loads(report.to_json(tmp_path / "r.json").read_text())  # strict JSON: no NaN literal
    assert data["tasks"][0]["mtv"] is None


def test_report_refuses_missing_task_nan_score_and_mismatched_examples():
    with pytest.raises(StabilityError, match="checkpoint step2 has no score for task 'b'"):
        StabilityReport.build([("step1", 1, {"a": 0.5, "b": 0.5}), ("step2", 2, {"a": 0.5})])
    with pytest.raises(StabilityError, match=r"task 'a'.*checkpoint 1 \(step2\)"):
        StabilityReport.build([("step1", 1, {"a": 0.5}), ("step2", 2, {"a": float("nan")})])
    with pytest.raises(StabilityError, match="2 checkpoints but there are 3 scores"):
        StabilityReport.build(POINTS, {"a": ExampleArrays(correct=np.array([[1], [0]]))})
    with pytest.raises(StabilityError, match="no task scores"):
        StabilityReport.build(POINTS, {"zzz": ExampleArrays(correct=np.array([[1], [0], [1]]))})
    assert set(StabilityReport.build(POINTS, tasks=["b"]).tasks) == {"b"}


def test_report_windows_summarise_std_and_range_as_means_and_drop_as_worst():
    pts = [(f"s{i}", i, {"a": v}) for i, v in enumerate([0.5, 0.75, 0.25, 0.5])]
    t = StabilityReport.build(pts, window=2, stride=1).tasks["a"]
    # windows [0.5,0.75], [0.75,0.25], [0.25,0.5]: std 0.125, 0.25, 0.125; range 0.25, 0.5, 0.25
    assert t.std == pytest.approx(0.5 / 3, abs=1e-15) and t.range == pytest.approx(1 / 3, abs=1e-15)
    assert (t.worst_drop, t.worst_drop_from, t.worst_drop_to) == (0.5, "s1", "s2")
    assert len(t.windows) == 3


def test_compare_side_by_side(tmp_path):
    averaged = [("avg2-1", 2, {"a": 0.625, "b": 0.25}), ("avg2-2", 4, {"a": 0.5, "b": 0.375})]
    comp = compare(POINTS, {2: averaged}, {2: StabilityReport.build(averaged)})
    assert [(r["task"], r["method"], r["window_size"]) for r in comp.rows()] == [
        ("a", "raw", 1),
        ("b", "raw", 1),
        ("a", "average", 2),
        ("b", "average", 2),
        ("a", "ensemble", 2),
        ("b", "ensemble", 2),
    ]
    wide = {r["task"]: r for r in comp.wide("mtv")}
    assert wide["a"] == {"task": "a", "raw": 0.375, "average w=2": 0.125, "ensemble w=2": 0.125}
    with pytest.raises(StabilityError, match="unknown metric"):
        comp.wide("nope")
    rows = list(csv.DictReader(comp.to_csv(tmp_path / "c.csv").open()))
    assert len(rows) == 6 and rows[2]["method"] == "average"
    assert json.loads(comp.to_json(tmp_path / "c.json").read_text())["series"][1]["method"] == "average"
    with pytest.raises(StabilityError, match="window size 0"):
        compare(POINTS, {0: averaged})


# --- the evaluate modules ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics():
    pytest.importorskip("evaluate")
    from hubmerge.metrics import load_metric

    return {name: load_metric(name) for name in ("mean_total_variation", "flip_rate", "instability_score")}


def test_evaluate_modules_equal_the_pure_functions(metrics):
    rng = np.random.default_rng(0)
    correct = rng.integers(0, 2, (6, 40))
    pred = rng.integers(0, 4, (6, 40))
    present = rng.random((6, 40)) > 0.1
    scores = rng.random(6)

    def rows(a):  # one row per example, None where its checkpoint lacks it
        return [[int(a[t, i]) if present[t, i] else None for t in range(a.shape[0])] for i in range(a.shape[1])]

    mtv = metrics["mean_total_variation"]
    assert mtv.compute(predictions=scores.tolist()) == {"mean_total_variation": mean_total_variation(scores)}
    assert mtv.compute(predictions=rows(correct))["mean_total_variation"] == pytest.approx(
        example_mean_total_variation(correct, present), abs=1e-15
    )
    assert metrics["flip_rate"].compute(predictions=rows(correct)) == {"flip_rate": flip_rate(correct, present)}
    assert metrics["instability_score"].compute(predictions=rows(pred)) == {
        "instability_score": instability_score(pred, present)
    }
    with pytest.raises(StabilityError, match="not a number"):
        mtv.compute(predictions=[0.5, float("nan")])
