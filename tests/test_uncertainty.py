"""Standard errors and bootstrap intervals of the stability engine: pure functions, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hubmerge.stability.metrics import (
    bootstrap_interval,
    flip_rate,
    mean_stderr,
    mean_total_variation,
    series_intervals,
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
