"""Plots are written, readable as PNG and SVG, and identical from one run to the next."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from hubmerge.errors import StabilityError  # noqa: E402
from hubmerge.stability.plots import (  # noqa: E402
    WindowSeries,
    choose_xscale,
    plot_by_window,
    plot_scores,
    plot_window,
    window_figure,
    wrap_title,
)
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


# ------------------------------------------------------------------------------------------------ the card's plot

LONG = [  # the demo's BLiMP paradigms: the longest ran past its panel and, in the last column, off the figure
    "blimp_agreement_across_object_relative_clause",
    "blimp_agreement_across_pp",
    "blimp_agreement_across_relative_clause",
    "blimp_determiner_noun_agreement",
]


def _window_series(uses_steps: bool = True) -> WindowSeries:
    tasks = ["blimp", *LONG]
    scores = {t: [0.5 + 0.1 * i + 0.01 * j for j in range(4)] for i, t in enumerate(tasks)}
    return WindowSeries(
        labels=["step225", "step250", "step275", "step300"],
        x=[225.0, 250.0, 275.0, 300.0] if uses_steps else [0.0, 1.0, 2.0, 3.0],
        uses_steps=uses_steps,
        tasks=tasks,
        scores=scores,
        merged={t: s[1] + 0.005 for t, s in scores.items()},
        metric=dict.fromkeys(tasks, "acc"),
        titles={"blimp": "blimp (4 tasks pooled)"},
        merged_label="merged model (a uniform average of the window)",
    )


def _titles_whole(fig) -> None:
    """Every title lies inside the figure, and no panel's title runs into its neighbour's."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    titled = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titled
    boxes = [ax.title.get_window_extent(renderer) for ax in titled]
    for box in [*boxes, fig._suptitle.get_window_extent(renderer)]:
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, box
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


def test_wrap_title_breaks_task_names_at_underscores():
    assert wrap_title("blimp_agreement_across_object_relative_clause", 30) == (
        "blimp_agreement_across_object_\nrelative_clause"
    )
    assert wrap_title("short", 30) == "short"
    assert wrap_title("a model: its headline\nSource: here", 12) == "a model: its\nheadline\nSource: here"
    assert all(len(line) <= 10 for line in wrap_title("x" * 25, 10).split("\n"))


def test_window_plot_draws_real_steps_the_merged_model_and_its_window():
    series = _window_series()
    assert series.window == (225.0, 300.0) and series.merged_x == 300.0
    fig = window_figure(series, model="merged-last4", source="the merged window's checkpoints")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().replace("\n", "") for ax in axes] == ["blimp (4 tasks pooled)", *LONG]  # group first
    for ax, task in zip(axes, series.tasks, strict=True):
        assert ax.get_xlabel() == "training step"
        by_label = {line.get_label(): line for line in ax.get_lines()}
        raw = by_label["source checkpoints"]
        assert list(raw.get_xdata()) == [225.0, 250.0, 275.0, 300.0]
        assert list(raw.get_ydata()) == series.scores[task]
        merged = by_label["merged model (a uniform average of the window)"]
        assert list(merged.get_xdata()) == [225.0, 300.0]  # across the window, the star at the newest source
        assert list(merged.get_ydata()) == [series.merged[task]] * 2
        assert merged.get_marker() == "*" and list(merged.get_markevery()) == [1]
        (span,) = ax.patches
        assert (span.get_x(), span.get_x() + span.get_width()) == (225.0, 300.0)  # the window, shaded
        lo, hi = ax.get_xlim()
        assert lo < 225.0 and hi > 300.0  # the span and the star are inside the panel
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["the merged window", "source checkpoints", "merged model (a uniform average of the window)"]
    _titles_whole(fig)


def test_window_plot_without_steps_says_it_shows_the_order(tmp_path):
    fig = window_figure(_window_series(uses_steps=False))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "checkpoint (training order; steps unknown)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["step225", "step250", "step275", "step300"]
    (a,) = plot_window(_window_series(), tmp_path / "a" / "window")
    (b,) = plot_window(_window_series(), tmp_path / "b" / "window")
    assert a.name == "window.png" and a.read_bytes().startswith(PNG_MAGIC)
    assert a.read_bytes() == b.read_bytes()


def test_score_and_flip_rate_plots_keep_long_titles_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    steps = list(range(1000, 6000, 1000))
    rng = np.random.default_rng(0)
    correct = (rng.random((len(steps), 20)) < 0.6).astype(int)
    points = [
        (f"s{s}", s, {t: c.mean() - 0.01 * i for i, t in enumerate(LONG)}) for s, c in zip(steps, correct, strict=True)
    ]
    examples = {t: ExampleArrays(correct=correct, pred=correct) for t in LONG}
    raw = StabilityReport.build(points, examples, metrics=dict.fromkeys(LONG, "acc"))
    comp = compare(raw, {2: raw}, {})
    plot_scores(comp, tmp_path / "scores", model="EleutherAI/pythia-160m-deduped, a long model name", formats=["png"])
    plot_by_window(comp, tmp_path / "flip", model="toy", formats=["png"])
    assert len(figures) == 2
    for fig in figures:
        _titles_whole(fig)
