"""Plots are written, readable as PNG and SVG, and identical from one run to the next."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from hubmerge.errors import StabilityError  # noqa: E402
from hubmerge.stability.plots import choose_xscale, plot_by_window, plot_scores  # noqa: E402
from hubmerge.stability.report import ExampleArrays, StabilityReport, compare  # noqa: E402

PYTHIA_STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 3000, 13000, 143000]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _series(steps, k: int = 1, seed: int = 0) -> StabilityReport:
    rng = np.random.default_rng(seed)
    correct = (rng.random((len(steps), 30)) < np.linspace(0.3, 0.7, len(steps))[:, None]).astype(int)
    points = [
        (f"w{k}-{s}", s, {"blimp_a": c.mean(), "blimp_b": 1 - c.mean()}) for s, c in zip(steps, correct, strict=True)
    ]
    examples = {t: ExampleArrays(correct=correct, pred=correct) for t in ("blimp_a", "blimp_b")}
    return StabilityReport.build(points, examples, metrics={"blimp_a": "acc", "blimp_b": "acc"})


@pytest.fixture(scope="module")
def comparison():
    steps = list(range(1000, 9000, 1000))
    return compare(
        _series(steps),
        {w: _series(steps[w - 1 :], w, seed=w) for w in (2, 4)},
        {w: _series(steps[w - 1 :], w, seed=10 + w) for w in (2, 4)},
    )


def _check(paths):
    png, svg = sorted(paths)
    assert png.suffix == ".png" and png.read_bytes().startswith(PNG_MAGIC)
    root = ET.fromstring(svg.read_bytes())
    assert root.tag.endswith("svg")
    return png, svg


def test_scores_plot_png_and_svg_deterministic(tmp_path, comparison):
    first = _check(plot_scores(comparison, tmp_path / "a" / "scores.png", model="toy", source="synthetic"))
    assert [p.name for p in first] == ["scores.png", "scores.svg"]  # the suffix given is dropped, both written
    second = _check(plot_scores(comparison, tmp_path / "b" / "scores", model="toy", source="synthetic"))
    assert first[1].read_bytes() == second[1].read_bytes()
    assert first[0].read_bytes() == second[0].read_bytes()
    assert b"Date" not in first[1].read_bytes()


def test_scores_plot_log_spaced_steps_with_step_zero(tmp_path):
    assert choose_xscale(PYTHIA_STEPS) == "symlog"
    assert choose_xscale(list(range(13000, 143001, 10000))) == "linear"
    assert choose_xscale([None, 1, 1000]) == "linear"
    (svg,) = plot_scores(_series(PYTHIA_STEPS), tmp_path / "pythia", tasks=["blimp_a"], chance={"blimp_a": 0.5},
                         formats=["svg"])  # fmt: skip
    assert svg.stat().st_size > 0


def test_flip_rate_by_window_plot(tmp_path, comparison):
    png, svg = _check(plot_by_window(comparison, tmp_path / "flip", model="toy"))
    assert png.stat().st_size > 1000
    again = plot_by_window(comparison, tmp_path / "again" / "flip", model="toy", formats=["svg"])[0]
    assert again.read_bytes() == svg.read_bytes()
    plot_by_window(comparison, tmp_path / "is", metric="instability_score", formats=["png"])


def test_plot_errors(tmp_path, comparison):
    with pytest.raises(StabilityError, match="no scores for task"):
        plot_scores(comparison, tmp_path / "x", tasks=["nope"])
    with pytest.raises(StabilityError, match="plot format"):
        plot_scores(comparison, tmp_path / "x", formats=["jpg"])
    with pytest.raises(StabilityError, match="xscale"):
        plot_scores(comparison, tmp_path / "x", xscale="log")
    aggregate_only = StabilityReport.build([("s1", 1, {"a": 0.5}), ("s2", 2, {"a": 0.75})])
    with pytest.raises(StabilityError, match="needs per-example results"):
        plot_by_window(compare(aggregate_only), tmp_path / "y")
