"""The two plots a user looks at first: score against training step, and instability against window size.

Both take a :class:`~hubmerge.stability.Comparison` (raw, windowed averages, windowed ensembles) or a single
:class:`~hubmerge.stability.StabilityReport`, draw one panel per task, and write PNG and SVG. Output is
byte-for-byte reproducible (no dates in the metadata, fixed SVG ids), so reruns do not churn a repository's
files. matplotlib is imported on first use only: the CLI's fast commands should not pay for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubmerge.errors import StabilityError
from hubmerge.stability.report import Comparison, StabilityReport

FORMATS = ("png", "svg")
METRIC_LABELS = {
    "acc": "accuracy (acc, share correct)",
    "acc_norm": "length-normalised accuracy (acc_norm)",
    "ppl": "perplexity (ppl)",
    "flip_rate": "flip rate (share of examples per step)",
    "instability_score": "instability score (share of answers changed per step)",
    "gold_prob_mtv": "MTV of the gold-choice probability",
    "mtv": "task-level MTV (score units)",
    "std": "standard deviation of the score",
    "range": "range of the score",
}
_RC = {
    "svg.hashsalt": "hubmerge",  # fixed ids in the SVG: same figure, same bytes
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 11,
    "figure.titlesize": 13,
}


def _comparison(data: Comparison | StabilityReport) -> Comparison:
    return data if isinstance(data, Comparison) else Comparison(data)


def _tasks(report: StabilityReport, tasks: Iterable[str] | None) -> list[str]:
    names = list(report.tasks) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in report.tasks]
    if unknown:
        raise StabilityError(f"no scores for task(s) {', '.join(unknown)}; the report has {', '.join(report.tasks)}")
    if not names:
        raise StabilityError("no task to plot")
    return names


def choose_xscale(steps: Sequence[float | None]) -> str:
    """``symlog`` when the steps span three decades or more (Pythia's 0, 1, 2, 4, ..., 143000), else ``linear``.

    symlog is linear on [0, 1] and logarithmic above, so step 0 sits at the left edge instead of vanishing.
    """
    positive = [s for s in steps if s is not None and s > 0]
    if len(positive) < 2 or any(s is None or s < 0 for s in steps):
        return "linear"
    return "symlog" if max(positive) / min(positive) >= 1000 else "linear"


def _step_label(x: float, _pos: Any = None) -> str:
    if x == 0:
        return "0"
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def _figure(n_panels: int, width: float = 4.0, height: float = 3.1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(max(width * ncols, 8.0), height * nrows + 1.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def wrap_title(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters, after a space, ``_`` or ``-`` where it can.

    Task names such as ``blimp_agreement_across_object_relative_clause`` have no spaces, so textwrap would leave
    them whole and matplotlib would draw them past the panel (and the figure's edge); a part longer than a line
    is cut where it must.
    """
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for part in re.split(r"(?<=[ _-])", paragraph):
            while len(part) > width:  # one unbreakable run longer than a line
                if line:
                    lines.append(line.rstrip())
                    line = ""
                lines.append(part[:width])
                part = part[width:]
            if len(line) + len(part.rstrip()) > width and line:
                lines.append(line.rstrip())
                line = ""
            line += part
        lines.append(line.rstrip())
    return "\n".join(lines)


def _chars_across(inches: float, fontsize: float) -> int:
    """How many characters of a title fit across ``inches`` at ``fontsize`` points (DejaVu Sans averages a little
    under 0.6 em a character; a little room is left so that nothing touches the edge)."""
    return max(8, int(inches * 72 / (0.6 * fontsize)))


def _panel_title(ax, text: str) -> None:
    """A panel's title, wrapped to the panel's width: a long task name would otherwise run into its neighbour's
    title and, in the last column, off the figure (the layout engine does not shrink titles)."""
    fig = ax.get_figure()
    ncols = ax.get_subplotspec().get_gridspec().ncols
    usable = fig.get_figwidth() / ncols - 0.6  # the y label and tick labels take the panel's left part
    ax.set_title(wrap_title(text, _chars_across(usable, _points("axes.titlesize"))))


def _points(key: str) -> float:
    """An rc font size in points (rc values may be names such as ``large``)."""
    import matplotlib
    from matplotlib.font_manager import FontProperties

    return float(FontProperties(size=matplotlib.rcParams[key]).get_size_in_points())


def _title(fig, headline: str, model: str | None, source: str | None) -> None:
    title = f"{model}: {headline}" if model else headline
    text = f"{title}\nSource: {source}" if source else title
    fig.suptitle(wrap_title(text, _chars_across(fig.get_figwidth() - 0.4, _points("figure.titlesize"))))


def _legend(fig, axes) -> None:
    handles, labels = {}, {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles[label], labels[label] = h, label
    if handles:
        per_row = 4 if fig.get_figwidth() >= 10 else 3
        fig.legend(list(handles.values()), list(labels), loc="outside lower center", ncols=min(per_row, len(handles)))


def _save(fig, path: str | Path, formats: Sequence[str]) -> list[Path]:
    import matplotlib

    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in {".png", ".svg"} else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.draw_without_rendering()  # lay out once, then freeze: each format gets the same positions
    fig.set_layout_engine("none")
    written = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise StabilityError(f"plot format {fmt!r}: choose from {', '.join(FORMATS)}")
        out = stem.parent / f"{stem.name}.{fmt}"
        metadata = {"Date": None} if fmt == "svg" else {"Software": f"matplotlib {matplotlib.__version__}"}
        fig.savefig(out, format=fmt, dpi=120, metadata=metadata)
        written.append(out)
    return written


def plot_scores(
    data: Comparison | StabilityReport,
    path: str | Path,
    *,
    tasks: Iterable[str] | None = None,
    model: str | None = None,
    source: str | None = None,
    xscale: str = "auto",
    chance: Mapping[str, float] | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Score against training step per task: raw checkpoints, each window size's averages and ensembles.

    ``path`` is the file stem (a ``.png``/``.svg`` suffix is dropped); one file per format is written and the
    paths returned. ``xscale``: ``auto`` (:func:`choose_xscale`), ``linear`` or ``symlog``. ``chance`` draws a
    dotted chance level per task.
    """
    import matplotlib
    from matplotlib.ticker import FuncFormatter, NullLocator

    comp = _comparison(data)
    names = _tasks(comp.raw, tasks)
    series = comp.series()
    use_index = any(s is None for _, _, r in series for s in r.steps)
    scale = "linear" if use_index else (choose_xscale(comp.raw.steps) if xscale == "auto" else xscale)
    if scale not in {"linear", "symlog"}:
        raise StabilityError(f"xscale {xscale!r}: choose auto, linear or symlog")
    sizes = sorted({w for _, w, _ in series[1:]})
    colours = {w: f"C{i % 10}" for i, w in enumerate(sizes)}
    with matplotlib.rc_context(_RC):
        fig, axes = _figure(len(names))
        for ax, task in zip(axes, names, strict=True):
            for method, w, report in series:
                if task not in report.scores:
                    continue
                x = list(range(len(report.steps))) if use_index else list(report.steps)
                if method == "raw":
                    style = {"color": "0.15", "marker": "o", "markersize": 3, "linewidth": 1.2, "label": "raw"}
                else:
                    style = {
                        "color": colours[w],
                        "linestyle": "-" if method == "average" else "--",
                        "marker": "s" if method == "average" else "^",
                        "markersize": 3,
                        "linewidth": 1.6,
                        "label": f"{'weight average' if method == 'average' else 'ensemble'}, window {w}",
                    }
                ax.plot(x, report.scores[task], **style)
            if chance and task in chance:
                ax.axhline(chance[task], color="0.5", linestyle=":", linewidth=1.2, label="chance")
            _panel_title(ax, task)
            metric = comp.raw.tasks[task].metric
            ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=10)
            if use_index:
                ax.set_xlabel("checkpoint (training order)")
            else:
                ax.set_xlabel("training step" + (" (symlog scale)" if scale == "symlog" else ""))
            if scale == "symlog":
                ax.set_xscale("symlog", linthresh=1, linscale=0.4)
                top = max(s for s in comp.raw.steps if s is not None)
                decades = int(math.log10(top))
                every = 1 if decades <= 3 else 2  # keep labels apart on a narrow panel; keep the top decade
                ax.set_xticks([0] + [10**k for k in range(decades % every, decades + 1, every)])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_xlim(-0.3, top * 1.3)
                ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
            else:
                ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
            ax.grid(True, alpha=0.3)
        _legend(fig, axes)
        _title(fig, "downstream score against training step", model, source)
        return _save(fig, path, formats)


def plot_by_window(
    data: Comparison,
    path: str | Path,
    *,
    metric: str = "flip_rate",
    tasks: Iterable[str] | None = None,
    model: str | None = None,
    source: str | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """An instability metric (flip rate by default) against window size: raw is window 1, then averaging and
    ensembling at each window size, one panel per task."""
    import matplotlib

    comp = _comparison(data)
    names = [t for t in _tasks(comp.raw, tasks) if getattr(comp.raw.tasks[t], metric, None) is not None]
    if not names:
        raise StabilityError(
            f"no task has {metric} for the raw checkpoints; it needs per-example results (the results store), "
            "which lm-eval aggregate files do not have"
        )
    with matplotlib.rc_context(_RC):
        fig, axes = _figure(len(names))
        all_sizes = sorted({1} | set(comp.averaged) | set(comp.ensembled))
        for ax, task in zip(axes, names, strict=True):
            raw = getattr(comp.raw.tasks[task], metric)
            for label, by_w, style in (
                ("weight average", comp.averaged, {"color": "C0", "marker": "s", "linestyle": "-"}),
                ("ensemble", comp.ensembled, {"color": "C1", "marker": "^", "linestyle": "--"}),
            ):
                pts = [(w, getattr(r.tasks[task], metric)) for w, r in sorted(by_w.items()) if task in r.tasks]
                pts = [(w, v) for w, v in pts if v is not None and not math.isnan(v)]
                if pts:
                    ax.plot([1] + [w for w, _ in pts], [raw] + [v for _, v in pts], label=label, linewidth=1.6, **style)
            ax.plot([1], [raw], "o", color="0.15", markersize=6, label="raw checkpoints (window 1)", zorder=3)
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_sizes)
            ax.set_xticklabels([str(w) for w in all_sizes])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            _panel_title(ax, task)
            ax.set_xlabel("window size (checkpoints)")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=10)
            ax.grid(True, alpha=0.3)
        _legend(fig, axes)
        _title(fig, f"{metric.replace('_', ' ')} against window size", model, source)
        return _save(fig, path, formats)


@dataclass
class WindowSeries:
    """What the card's window plot draws, worked out before any drawing so that it can be checked: each panel's
    source scores at the sources' training steps (their order 0..n-1 when a step is unknown, with the axis saying
    so) and the merged model's score, drawn at the newest source's step across the window it averages.

    ``tasks`` is the panel order (a group's pooled panel before its members); ``titles`` overrides a panel's
    title (a group says it is pooled).
    """

    labels: list[str]  # the sources, oldest to newest
    x: list[float]  # each source's training step, or its position when some step is unknown
    uses_steps: bool
    tasks: list[str]
    scores: dict[str, list[float]]  # task -> the sources' scores, in ``labels`` order
    merged: dict[str, float]  # task -> the merged model's score, where it was scored
    metric: dict[str, str]
    titles: dict[str, str] = field(default_factory=dict)
    merged_label: str = "merged model (average of the window)"

    @property
    def xlabel(self) -> str:
        return "training step" if self.uses_steps else "checkpoint (training order; steps unknown)"

    @property
    def window(self) -> tuple[float, float]:
        """The span of the merged window along the x axis: oldest to newest source."""
        return self.x[0], self.x[-1]

    @property
    def merged_x(self) -> float:
        """Where the merged model is drawn: at the newest source, the point the merge replaces."""
        return self.x[-1]


def window_figure(series: WindowSeries, *, model: str | None = None, source: str | None = None):
    """The window plot as a laid-out matplotlib figure (:func:`plot_window` saves it): per panel the sources'
    scores, the window shaded, and the merged model as a star at the newest source on a dashed line across the
    window, so a reader sees where the average sits against the checkpoints it replaces."""
    import matplotlib
    from matplotlib.ticker import FuncFormatter

    with matplotlib.rc_context(_RC):
        fig, axes = _figure(len(series.tasks))
        x0, x1 = series.window
        scale = choose_xscale(series.x) if series.uses_steps else "linear"
        pad = (x1 - x0) * 0.06 or 0.5
        for ax, task in zip(axes, series.tasks, strict=True):
            ax.axvspan(x0, x1, color="C0", alpha=0.1, linewidth=0, label="the merged window")
            ax.plot(series.x, series.scores[task], color="0.15", marker="o", markersize=4, linewidth=1.2,
                    label="source checkpoints")  # fmt: skip
            if task in series.merged:
                m = series.merged[task]
                ax.plot([x0, x1], [m, m], color="C3", linestyle="--", linewidth=1.2, marker="*", markevery=[1],
                        markersize=13, zorder=3, clip_on=False, label=series.merged_label)  # fmt: skip
            _panel_title(ax, series.titles.get(task, task))
            metric = series.metric.get(task, "acc")
            ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=10)
            ax.set_xlabel(series.xlabel + (" (symlog scale)" if scale == "symlog" else ""))
            if scale == "symlog":
                ax.set_xscale("symlog", linthresh=1, linscale=0.4)
            else:
                ax.set_xlim(x0 - pad, x1 + pad)
            if not series.uses_steps:
                ax.set_xticks(series.x)
                tilt = {"rotation": 30, "ha": "right"} if len(series.labels) > 3 else {}
                ax.set_xticklabels(series.labels, **tilt)
            elif scale == "linear" and len(series.x) <= 8:
                ax.set_xticks(series.x)
            if series.uses_steps:
                ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
            ax.grid(True, alpha=0.3)
        _legend(fig, axes)
        _title(fig, "downstream score along the merged window", model, source)
    return fig


def plot_window(
    series: WindowSeries,
    path: str | Path,
    *,
    model: str | None = None,
    source: str | None = None,
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """The card's plot: :func:`window_figure` written to ``path`` (a file stem) in each format."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        return _save(window_figure(series, model=model, source=source), path, formats)
