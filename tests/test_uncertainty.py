"""Standard errors and bootstrap intervals of the stability engine: pure functions, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hubmerge.stability.metrics import (
    bootstrap_interval,
    flip_rate,
    mean_flip_rate_interval,
    mean_stderr,
    mean_total_variation,
    paired_difference,
    series_intervals,
    stratified_bootstrap_interval,
    tasks_mean_stderr,
)


def test_mean_stderr_is_lm_evals_acc_stderr():
    x = [1, 0, 1, 1, 0, 1, 1, 1]  # mean 0.75, sample variance 0.75*0.25*8/7
    assert mean_stderr(x) == pytest.approx(math.sqrt(0.75 * 0.25 * 8 / 7 / 8))
    assert mean_stderr(np.array(x, dtype=float)) == pytest.approx(np.std(x, ddof=1) / math.sqrt(len(x)))
    assert mean_stderr([1, 1, 1]) == 0.0
    assert math.isnan(mean_stderr([1]))  # one example: no spread to estimate from
    with pytest.raises(Exception, match="NaN"):
        mean_stderr([1.0, math.nan])


def test_bootstrap_interval_is_fixed_seed_and_covers_the_mean():
    rng = np.random.default_rng(3)
    x = rng.random(200)
    lo, hi = bootstrap_interval(lambda idx: x[idx].mean(), len(x))
    assert (lo, hi) == bootstrap_interval(lambda idx: x[idx].mean(), len(x))  # same seed, same interval
    assert lo < x.mean() < hi
    # about mean ± 1.96 standard errors for a mean
    se = mean_stderr(x)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_interval(lambda idx: 0.5, 10) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_interval(lambda idx: math.nan, 10))
    assert all(math.isnan(v) for v in bootstrap_interval(lambda idx: 1.0, 0))


def test_series_intervals_bracket_the_point_estimates():
    rng = np.random.default_rng(0)
    correct = (rng.random((4, 120)) < [[0.3], [0.5], [0.4], [0.7]]).astype(int)
    present = np.ones_like(correct, dtype=bool)
    out = series_intervals(correct, correct, present, resamples=300)
    assert set(out) == {"mtv", "flip_rate", "instability_score"}
    fr = flip_rate(correct, present)
    mtv = mean_total_variation(correct.mean(axis=1))
    assert out["flip_rate"][0] <= fr <= out["flip_rate"][1]
    assert out["mtv"][0] <= mtv <= out["mtv"][1]
    assert out["instability_score"] == out["flip_rate"]  # binary choices: a changed answer is a flip
    # constant correctness: nothing moves on any draw
    still = np.ones((3, 10), dtype=int)
    assert series_intervals(still, None, np.ones_like(still, dtype=bool))["flip_rate"] == (0.0, 0.0)


def test_stratified_bootstrap_and_the_sweeps_combinations():
    """One stratum draws what bootstrap_interval draws; the mean over tasks of independent means has standard
    error sqrt(Σ se²)/T; a paired difference is computed on per-example differences."""
    rng = np.random.default_rng(5)
    x = rng.random(50)
    assert stratified_bootstrap_interval(lambda idx: x[idx[0]].mean(), [50]) == bootstrap_interval(
        lambda idx: x[idx].mean(), 50
    )
    assert tasks_mean_stderr([0.03, 0.04]) == pytest.approx(0.05 / 2)
    assert math.isnan(tasks_mean_stderr([0.03, math.nan])) and math.isnan(tasks_mean_stderr([]))
    a1, b1 = np.array([1, 1, 0, 1, 1, 0.0]), np.array([0, 1, 0, 0, 1, 0.0])  # +2/6
    a2, b2 = np.array([1, 0, 1, 0.0]), np.array([1, 0, 1, 0.0])  # identical: 0
    d = paired_difference([(a1, b1), (a2, b2)])
    assert d.difference == pytest.approx((2 / 6 + 0) / 2) and d.n_examples == 10
    assert d.stderr == pytest.approx(math.sqrt(mean_stderr(a1 - b1) ** 2 + 0.0) / 2)
    assert d.interval[0] <= d.difference <= d.interval[1]
    assert d.distinguishable == (d.interval[0] > 0 or d.interval[1] < 0)
    assert not paired_difference([(a2, b2)]).distinguishable  # no difference on any draw: [0, 0] holds 0
    c1 = (rng.random((5, 40)) < 0.5).astype(float)
    c2 = (rng.random((5, 30)) < 0.7).astype(float)
    lo, hi = mean_flip_rate_interval([(c1, None), (c2, None)])
    assert lo <= (flip_rate(c1) + flip_rate(c2)) / 2 <= hi
    assert (lo, hi) == mean_flip_rate_interval([(c1, None), (c2, None)])
