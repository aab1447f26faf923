"""The stability model card: a README.md for a merged folder that shows what was merged and the evidence for it.

A card is built from two things: the folder's ``hubmerge.json`` (sources with their commits and weights, the
recipe, method, dtype, file hashes) and, optionally, a :class:`CardEvidence` (scores of the merged model, of each
source and of the sources' ensemble; instability before and after; a plot). :func:`evidence_from_store` fills the
evidence from a results store.

What the card promises:

- Front matter the Hub understands (``base_model``, ``tags``, ``library_name``, ``license``, ``model-index``),
  built with :class:`huggingface_hub.ModelCardData` and parsed back with :class:`huggingface_hub.ModelCard` before
  anything is written, so a card the client cannot read is never saved.
- The same inputs give the same bytes: no dates, no timings, no host names. The card lists the merge's own file
  hashes but not its own (README.md, recipe.yaml and the plot are left out), so rewriting it is a fixed point.
- It reproduces: the recipe is saved next to it as ``recipe.yaml`` (the file the merge read, when it still parses
  to what ``hubmerge.json`` recorded, else the recorded mapping as YAML) and ``hubmerge merge recipe.yaml`` is the
  command shown. The user's home folder is written as ``~`` (hubmerge expands it), Hub sources are shown as
  ``repo@revision`` with their commit, and anything that looks like a Hugging Face token is masked.
- ``hubmerge.json`` stays true: it lists every file of the folder with its sha256 (``hubmerge sweep`` resumes
  only windows whose files all match), so after writing the card its ``files`` gain README.md, recipe.yaml and the
  plot, rewritten atomically like every file written here.

"Stability after". Before is the raw trajectory: MTV, instability score and flip rate along the sources in
training order (:mod:`hubmerge.stability.metrics`). A single merge is one model, not a trajectory, so it has no
MTV of its own; the honest "after" is the same metrics along a series of windowed averages (the sweep's averaged
models, in order), which :func:`evidence_from_store` computes when given ``averaged=``. Without that series the
"after" columns are left out and the card instead says where the merged model sits relative to its window: the
window's mean, standard deviation and range of the score, the merged score minus that mean, and the share of
answers and of correctness that differ between the newest source and the merged model (what switching from the
last checkpoint to the merge changes)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hubmerge.errors import HubmergeError, StoreError
from hubmerge.io.files import atomic_write, sha256_file
from hubmerge.io.provenance import PROVENANCE_FILE, read_provenance, write_provenance
from hubmerge.results.keys import model_key, weight_hashes_of_folder
from hubmerge.results.store import ResultsStore
from hubmerge.stability.metrics import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    flip_rate,
    instability_score,
    mean_stderr,
    mean_total_variation,
    series_intervals,
)
from hubmerge.stability.plots import WindowSeries, plot_window
from hubmerge.stability.series import choice_series

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
README = "README.md"
RECIPE = "recipe.yaml"
PLOT_STEM = "stability"
PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp")
TAGS = ["merge", "checkpoint-averaging", "hubmerge"]
PAPER = "https://arxiv.org/abs/2510.04848"
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")  # HF user tokens: "hf_" and 34 letters or digits

# evidence.stability keys, in table order, with their column headers and what the card says each one means
STABILITY_COLUMNS: dict[str, tuple[str, str]] = {
    "mtv_before": ("MTV before", "task-level mean total variation along the sources, 1/(m-1) Σ |s(θt+1) - s(θt)|"),
    "mtv_after": ("MTV after", "the same along the series of windowed weight averages"),
    "is_before": ("IS before", "instability score: share of examples whose predicted answer changes per step"),
    "is_after": ("IS after", "the same along the averaged series"),
    "flip_before": ("flip rate before", "share of examples whose correctness flips per step (example-level MTV)"),
    "flip_after": ("flip rate after", "the same along the averaged series"),
    "window_mean": ("window mean", "mean score of the merged sources"),
    "window_std": ("window std", "population standard deviation of the sources' scores"),
    "window_range": ("window range", "max - min of the sources' scores"),
    "merged_minus_mean": ("merged − mean", "the merged model's score minus the window mean"),
    "is_vs_newest": ("answers changed vs newest", "share of examples whose answer differs: newest source vs merge"),
    "flip_vs_newest": ("correctness flips vs newest", "share of examples whose correctness differs: newest vs merge"),
}
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "accuracy (length-normalised)"}
AFTER_KEYS = ("mtv_after", "is_after", "flip_after")
SIGNED = ("merged_minus_mean",)
TRAJECTORY_KEYS = ("mtv_before", "mtv_after", "is_before", "is_after", "flip_before", "flip_after")
WINDOW_KEYS = ("window_mean", "window_std", "window_range", "merged_minus_mean", "is_vs_newest", "flip_vs_newest")


@dataclass
class CardEvidence:
    """Everything the card shows besides ``hubmerge.json``; every field is optional.

    ``scores[task]`` maps ``"merged"`` and each source's label (:func:`source_labels`) to the score shown, which is
    ``metric[task]`` (``acc`` when absent). ``stability[task]`` holds any of :data:`STABILITY_COLUMNS` (None or NaN
    where undefined); ``after_description`` says what the "after" series was. ``plot`` is an image copied into the
    folder as ``stability.<ext>``; ``task_sources`` says where each task's data came from. ``stderr`` holds each
    score's standard error over examples (lm-eval's ``acc_stderr``), ``intervals`` the 95% bootstrap interval of
    each instability figure, ``groups`` the task groups whose pooled rows lead the tables (members below).
    ``steps`` is each source's training step (None where unknown: a local folder), so the plot's x axis is the
    real step rather than the sources' order.
    """

    scores: dict[str, dict[str, float]]
    metric: dict[str, str]
    ensemble: dict[str, float] | None = None
    stability: dict[str, dict[str, float]] | None = None
    plot: Path | None = None
    n_examples: dict[str, int] | None = None
    task_sources: dict[str, str] | None = None
    after_description: str | None = None
    stderr: dict[str, dict[str, float]] | None = None  # task -> label -> standard error over examples
    intervals: dict[str, dict[str, tuple[float, float]]] | None = None  # task -> stability key -> 95% bootstrap
    groups: dict[str, list[str]] | None = None  # group -> its member tasks; a group's row pools their examples
    steps: dict[str, int | None] | None = None  # source label -> its training step, None where unknown


@dataclass(frozen=True)
class MethodText:
    """How the card names the merge method: the first sentence's ``phrase`` ("A uniform average") and the
    ``description`` beside the sources table. The merging engine's method registry provides both."""

    phrase: str
    description: str


# --------------------------------------------------------------------------------------------- provenance


def source_labels(prov: Mapping[str, Any]) -> list[str]:
    """How each source is named in tables and ``CardEvidence.scores``: its revision (Hub) or folder name (local).

    Repeated names get ``#2``, ``#3``... so that every source has its own row.
    """
    labels: list[str] = []
    for s in prov["sources"]:
        base = str(s.get("revision") or (s.get("commit") or "")[:12]) if s.get("repo") else Path(s["path"]).name
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}#{n}"
        labels.append(label)
    return labels


def redact(text: str) -> str:
    """Home folder as ``~`` (hubmerge expands it in recipes) and anything shaped like an HF token masked."""
    home = str(Path.home())
    if len(home) > 1:
        text = re.sub(re.escape(home) + r"(?![\w.-])", "~", text)
    return _TOKEN.sub("hf_***", text)


def _display_path(path: str, folder: Path) -> str:
    """A local path as the card publishes it: relative to the folder when it is a neighbour (under the folder's
    parent), else its name alone. A relative path is read relative to the folder, so publishing is a fixed point."""
    base = folder.resolve()
    p = Path(path).expanduser()
    p = p if p.is_absolute() else base / p
    p = Path(os.path.normpath(p))
    try:
        p.relative_to(base.parent)
        return os.path.relpath(p, base)
    except ValueError:
        return p.name


def _local(path: str, folder: Path) -> Path:
    """Where a path recorded in ``hubmerge.json`` is on this machine (a published one is relative to the folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder.resolve() / p


def published_recipe(
    recorded: Mapping[str, Any], folder: Path, data_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The recipe as the card publishes it: runnable from a clone of the repo, with no local path in it.

    Local sources are written as :func:`_display_path` does; ``output.path`` becomes the output folder's name (a
    new folder beside the clone's files) and ``output.push`` is left out (rerunning it must not push to the repo
    it came from); ``evaluate.data`` names the copy of the data shipped with the card (``data_names``: local
    path -> file name) and ``evaluate.results`` is left to its default.
    """
    import copy

    out = copy.deepcopy(dict(recorded))
    sources = out.get("sources")
    if isinstance(sources, list):
        for src in sources:
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                src["path"] = _display_path(src["path"], folder)
    output = out.get("output")
    if isinstance(output, dict):
        if isinstance(output.get("path"), str):
            output["path"] = Path(output["path"]).name or folder.name
        output.pop("push", None)
    ev = out.get("evaluate")
    if isinstance(ev, dict):
        ev.pop("results", None)
        data = ev.get("data")
        names = data_names or {}

        def one(d: Any) -> Any:
            if not isinstance(d, str):
                return d
            return names.get(str(_local(d, Path.cwd()).resolve()), Path(d).name)

        if isinstance(data, dict):
            ev["data"] = {k: one(v) for k, v in data.items()}
        elif data is not None:
            ev["data"] = one(data)
        if isinstance(ev.get("include"), list):
            ev["include"] = [Path(str(i)).name for i in ev["include"]]
        elif isinstance(ev.get("include"), str):
            ev["include"] = Path(ev["include"]).name
    return out


def publishable_provenance(
    prov: Mapping[str, Any], folder: Path, data_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``hubmerge.json`` as it is published with the card: no local path. A Hub source keeps its repo, revision,
    commit and hashes (its path was the HF cache's copy), a local one a relative or bare path, the recipe is
    :func:`published_recipe` and ``recipe_file`` is the card's own ``recipe.yaml``."""
    out = dict(prov)
    sources = []
    for s in prov["sources"]:
        s = dict(s)
        if s.get("repo"):
            s.pop("path", None)
        elif isinstance(s.get("path"), str):
            s["path"] = _display_path(s["path"], folder)
        sources.append(s)
    out["sources"] = sources
    out["recipe"] = published_recipe(prov.get("recipe") or {}, folder, data_names)
    out["recipe_file"] = RECIPE
    return out


def _recipe_text(
    prov: Mapping[str, Any], folder: Path, text: str | None = None, data_names: Mapping[str, str] | None = None
) -> str:
    """The published recipe (:func:`published_recipe`) in the user's own words where it can be: the recipe file
    with its changed values rewritten in place (comments kept), else the published mapping as YAML.

    ``text`` is the recipe file's content as the merge read it; without it the file named in ``hubmerge.json``
    is read (``hubmerge card`` long after the merge), and used only if it still parses to what was recorded.
    """
    import yaml

    recorded = prov.get("recipe") or {}
    where = prov.get("recipe_file")
    published = published_recipe(recorded, folder, data_names)
    if text is None and where:
        try:
            text = _local(where, folder).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = None
    if text is not None:
        try:
            if yaml.safe_load(text) == recorded:
                text = _rewrite_values(text, recorded, published)
            if yaml.safe_load(text) == published:
                return redact(text if text.endswith("\n") else text + "\n")
        except yaml.YAMLError:
            pass
    return redact(yaml.safe_dump(published, sort_keys=False, allow_unicode=True))


def _rewrite_values(text: str, before: Any, after: Any) -> str:
    """The recipe's text with each string value that publishing changed replaced where it is written, so comments
    survive; the caller checks that the result still parses to the published recipe."""
    pairs: list[tuple[str, str]] = []

    def walk(a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if k in b:
                    walk(a[k], b[k])
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for x, y in zip(a, b, strict=True):
                walk(x, y)
        elif isinstance(a, str) and isinstance(b, str) and a != b:
            pairs.append((a, b))

    walk(before, after)
    for a, b in sorted(set(pairs), key=lambda p: -len(p[0])):
        text = text.replace(a, b)
    return text


def _front_matter(path: Path) -> dict[str, Any]:
    from huggingface_hub import metadata_load

    try:
        data = metadata_load(path)
    except Exception:  # an unreadable card is no licence information
        return {}
    return data if isinstance(data, dict) else {}


def source_license(prov: Mapping[str, Any], folder: Path | None = None) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link`` for ``other``) of the newest source, if it says one.

    Read from its README.md front matter, else from its config.json; empty when neither is on disk (``hubmerge
    pull`` fetches weights and configs, not cards: the workflow asks the Hub for a Hub source's card data).
    """
    where = prov["sources"][-1].get("path")
    if not where:
        return {}
    newest = _local(where, folder) if folder is not None else Path(where)
    meta = _front_matter(newest / README) if (newest / README).is_file() else {}
    if not isinstance(meta.get("license"), str):
        try:
            config = json.loads((newest / "config.json").read_text(encoding="utf-8"))
            meta = config if isinstance(config, dict) else {}
        except (OSError, ValueError):
            meta = {}
    keys = ("license", "license_name", "license_link")
    return {k: meta[k] for k in keys if isinstance(meta.get(k), str) and meta[k]} if "license" in meta else {}


# --------------------------------------------------------------------------------------------- the card


def _fmt(v: Any, digits: int = 4, *, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:{'+' if signed else ''}.{digits}f}" if isinstance(v, (float, int)) else str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


LICENSE_UNKNOWN = {"license": "other"}
LICENSE_NOTE = (
    "The sources' files (README.md front matter, config.json) state no license, so the metadata says "
    "`license: other`: check the terms of where the checkpoints came from before reusing these weights."
)


def _describe_source(s: Mapping[str, Any], folder: Path) -> str:
    if s.get("repo"):
        return f"{s['repo']}@{s.get('revision') or '?'}"
    return _display_path(s["path"], folder)


def _merged_section(
    prov: Mapping[str, Any], folder: Path, labels: list[str], method: MethodText, extra: Sequence[str] = ()
) -> list[str]:
    rows = []
    for i, (s, label) in enumerate(zip(prov["sources"], labels, strict=True)):
        commit = f"`{s['commit']}`" if s.get("commit") else "— (local folder)"
        rows.append([str(i + 1), label, _describe_source(s, folder), commit, f"{float(s.get('weight', 0)):.6g}"])
    out = ["## What was merged", ""]
    out += _table(["#", "label", "checkpoint", "commit", "weight"], rows)
    out += ["", f"Sources are listed oldest to newest. Method: {method.description}."]
    if any(s.get("repo") for s in prov["sources"]) and prov.get("endpoint"):
        out.append(f"Hub sources were read from {prov['endpoint']}.")
    dtype = prov.get("dtype")
    out.append(f"Output dtype: `{dtype}`." if dtype else "Output dtype: that of the sources (accumulated in float32).")
    integrity = prov.get("integrity")
    if isinstance(integrity, dict):
        dropped = integrity.get("dropped") or []
        left = ", ".join(str(d.get("revision", d)) if isinstance(d, dict) else str(d) for d in dropped) or "none"
        out.append(
            f"Integrity check: {integrity.get('checked', 'run')}; policy `{integrity.get('policy')}`; "
            f"revisions left out: {left}."
        )
    files = {k: v for k, v in sorted((prov.get("files") or {}).items()) if not _is_card_file(k) and k not in extra}
    if files:
        out += ["", "Files written by the merge (sha256, as in `hubmerge.json`):", ""]
        out += _table(["file", "sha256"], [[name, f"`{digest}`"] for name, digest in files.items()])
    return out


def _is_card_file(name: str) -> bool:
    return name in (README, RECIPE) or (Path(name).stem == PLOT_STEM and Path(name).suffix in PLOT_SUFFIXES)


def _how_section(prov: Mapping[str, Any], recipe: str) -> list[str]:
    out = [
        "## How it was made",
        "",
        f"The recipe (saved next to this card as [`{RECIPE}`]({RECIPE})), as the merge read it except that local "
        "paths are written relative to this repository, `output.path` is a new folder here and `output.push` and "
        "`evaluate.results` are left out, so that it reruns from a clone:",
    ]
    out += ["", "```yaml", recipe.rstrip("\n"), "```"]
    recipe_data = prov.get("recipe") or {}
    sources = recipe_data.get("sources")
    if isinstance(sources, dict) and "select" in sources:
        pinned = ", ".join(str(s.get("revision")) for s in prov["sources"])
        out += [
            "",
            f"The selector chose these revisions when the merge ran; to pin them, replace `select:` with "
            f"`revisions: [{pinned}]`. Branches can move: the commits above are what was read.",
        ]
    out += ["", f"Made with hubmerge {prov.get('hubmerge_version', '')}".rstrip() + "."]
    return out


def _row_labels(evidence: CardEvidence, labels: list[str]) -> list[str]:
    seen = dict.fromkeys(["merged", *labels])
    for by_model in evidence.scores.values():
        for k in by_model:
            seen.setdefault(k, None)
    return list(seen)


def _evaluation_section(
    evidence: CardEvidence, labels: list[str], n_sources: int, data_names: Mapping[str, str], folder: Path
) -> list[str]:
    tasks = list(evidence.scores)
    header = ["model", *[_task_name(evidence, t, f"({evidence.metric.get(t, 'acc')})") for t in tasks]]
    rows = []
    for label in _row_labels(evidence, labels):
        if label not in labels and label != "merged" and all(evidence.scores[t].get(label) is None for t in tasks):
            continue
        name = "**merged (this model)**" if label == "merged" else label
        rows.append([name, *[_score_cell(evidence, t, label) for t in tasks]])
    if evidence.ensemble:
        ens = f"ensemble of the {n_sources} sources (probability averaging)"
        rows.append([ens, *[_fmt(evidence.ensemble.get(t)) for t in tasks]])
    intro = "Accuracy per task (share of examples answered correctly)"
    if evidence.stderr:
        intro += (
            "; ± is the standard error over the task's examples, as lm-evaluation-harness reports `acc_stderr` "
            "(sample standard deviation / √n)"
        )
    if evidence.groups:
        intro += "; a group's column pools its tasks' examples (size-weighted, as lm-eval scores a group) and leads"
    out = ["## Evaluation", "", intro + ":", ""]
    out += _table(header, rows)
    out += [
        "",
        "`acc` picks the choice with the highest log-likelihood, `acc_norm` the highest log-likelihood per "
        "character, as lm-evaluation-harness does. The ensemble averages the sources' choice probabilities "
        "(an output ensemble: it needs every source at inference; the merged model is one model).",
    ]
    details = []
    for t in tasks:
        bits = []
        if evidence.n_examples and evidence.n_examples.get(t) is not None:
            bits.append(f"{evidence.n_examples[t]} examples")
        if evidence.groups and t in evidence.groups:
            bits.append(f"pools {len(evidence.groups[t])} tasks: {', '.join(evidence.groups[t])}")
        if evidence.task_sources and evidence.task_sources.get(t):
            bits.append(data_note(evidence.task_sources[t], data_names.get(evidence.task_sources[t]), folder))
        if bits:
            details.append(f"- `{t}`: {', '.join(bits)}")
    if details:
        out += ["", "What each score rests on:", "", *details]
    return out


def _task_name(evidence: CardEvidence, task: str, extra: str = "") -> str:
    """A task as a table names it: a group in bold and marked pooled, so that its row (or column), which leads
    its members', is not read as one more task."""
    if evidence.groups and task in evidence.groups:
        inner = ", ".join(p for p in ("pooled", extra.strip("()")) if p)
        return f"**{task}** ({inner})"
    return f"{task} {extra}".rstrip()


def _score_cell(evidence: CardEvidence, task: str, label: str) -> str:
    value = _fmt(evidence.scores[task].get(label))
    se = (evidence.stderr or {}).get(task, {}).get(label)
    return f"{value} ± {_fmt(se)}" if _present(se) and value != "—" else value


def hub_dataset(source: str) -> dict[str, str] | None:
    """``{"id", "config", "split"}`` of a task whose data is a Hub dataset (``hf:org/name[/config]:split``)."""
    if not source.startswith("hf:"):
        return None
    where, _, split = source[3:].rpartition(":")
    if not where:
        where, split = split, ""
    parts = where.split("/")
    repo, config = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 1 else (parts[0], "")
    return {"id": repo, "config": config, "split": split}


def data_note(source: str, shipped: str | None = None, folder: Path | None = None) -> str:
    """How the card names a task's data: a Hub dataset by its id, a local file by its name and sha256 (never its
    path); ``shipped`` is the file's name in this repository when the card ships a copy."""
    hub = hub_dataset(source)
    if hub is not None:
        extra = ", ".join(f"{k} `{hub[k]}`" for k in ("config", "split") if hub[k])
        return f"data: the Hub dataset `{hub['id']}`" + (f" ({extra})" if extra else "")
    path = folder / shipped if shipped and folder is not None and (folder / shipped).is_file() else Path(source)
    digest = sha256_file(path) if path.is_file() else None
    name = shipped or path.name
    text = f"data: the local file `{name}`"
    if digest:
        text += f" (sha256 `{digest}`)"
    text += ", not a Hub dataset"
    if shipped:
        text += f"; a copy is in this repository as [`{shipped}`]({shipped})"
    return text


def _stability_section(evidence: CardEvidence, plot_name: str | None) -> list[str]:
    out = ["## Stability", ""]
    stab = evidence.stability or {}
    trajectory = [k for k in TRAJECTORY_KEYS if any(_present(v.get(k)) for v in stab.values())]
    window = [k for k in WINDOW_KEYS if any(_present(v.get(k)) for v in stab.values())]
    for keys, intro in (
        (
            trajectory,
            "Along the trajectory (per step = between consecutive models of the series, averaged over steps):",
        ),
        (window, "The merged model in its window (the sources it averages):"),
    ):
        if not keys:
            continue
        rows = [
            [_task_name(evidence, t), evidence.metric.get(t, "acc"), *[_stab_cell(evidence, t, k) for k in keys]]
            for t in stab
        ]
        out += [intro, "", *_table(["task", "score", *[STABILITY_COLUMNS[k][0] for k in keys]], rows), ""]
        out += [f"- **{STABILITY_COLUMNS[k][0]}**: {STABILITY_COLUMNS[k][1]}." for k in keys]
        if keys is trajectory and evidence.intervals:
            out.append(
                f"- [low, high]: a {BOOTSTRAP_LEVEL:.0%} bootstrap interval over the task's examples "
                f"({BOOTSTRAP_RESAMPLES} resamples with replacement, seed {BOOTSTRAP_SEED}); the examples each row "
                "rests on are listed under Evaluation."
            )
        if keys is trajectory and any(k in keys for k in AFTER_KEYS):
            what = evidence.after_description or "windowed weight averages of the trajectory, in training order"
            out.append(f"- *After* series: {what}.")
        elif keys is trajectory:
            out.append(
                "- No *after* columns: this merge is one model, not a trajectory, so it has no MTV of its own; "
                "evaluate the windowed averages along the trajectory (`hubmerge sweep`) to measure it."
                + (
                    " The next table says where the merged model sits among the checkpoints it averages."
                    if window
                    else ""
                )
            )
        out += ["- — marks a value that is undefined (a single source: nothing moved) or was not measured.", ""]
    if not trajectory and not window:
        out += ["No instability figures were computed for this card.", ""]
    if plot_name:
        out += [f"![Scores and instability along the trajectory]({plot_name})", ""]
    return out[:-1]


def _stab_cell(evidence: CardEvidence, task: str, key: str) -> str:
    value = (evidence.stability or {}).get(task, {}).get(key)
    text = _fmt(value, signed=key in SIGNED)
    ci = (evidence.intervals or {}).get(task, {}).get(key)
    if ci is not None and _present(value) and all(_present(v) for v in ci):
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


DEFAULT_ENDPOINT = "https://huggingface.co"


def reproduce_commands(
    prov: Mapping[str, Any],
    folder: Path,
    evidence: CardEvidence | None,
    command: str | None = None,
    data_names: Mapping[str, str] | None = None,
) -> list[str]:
    """The card's Reproduce block, one command a line, each runnable as written from a clone of the repo.

    Hub sources are read from the endpoint ``hubmerge.json`` records (``--endpoint`` when it is not the Hub's);
    tasks whose data is a local file are evaluated on the copy the card ships (``--data``), one command per file;
    a group stands for its members (``--tasks blimp``).
    """
    endpoint = prov.get("endpoint")
    hub = [s for s in prov["sources"] if s.get("repo")]
    flag = f" --endpoint {endpoint}" if hub and endpoint and endpoint.rstrip("/") != DEFAULT_ENDPOINT else ""
    lines = [f"hubmerge merge {RECIPE}{flag}"]
    if command:
        lines.append(redact(command))
        return lines
    if evidence is None or not evidence.scores:
        return lines
    targets = ["."]
    if hub:
        revisions = ", ".join(str(s.get("revision")) for s in hub)
        targets.append(f"{hub[0]['repo']} --select '{{revisions: [{revisions}]}}'")
    targets += [_display_path(s["path"], folder) for s in prov["sources"] if not s.get("repo")]
    groups = evidence.groups or {}
    grouped = {m: g for g, ms in groups.items() for m in ms}
    by_data: dict[str | None, list[str]] = {}
    for task in evidence.scores:
        if task in groups:
            continue
        source = (evidence.task_sources or {}).get(task)
        local = source is not None and hub_dataset(source) is None
        data = (data_names or {}).get(source, Path(source).name) if local and source else None
        name = grouped.get(task, task)
        names = by_data.setdefault(data, [])
        if name not in names:
            names.append(name)
    for data, names in by_data.items():
        extra = f" --data {data}" if data else ""
        lines.append(f"hubmerge eval {' '.join(targets)} --tasks {','.join(names)}{extra}{flag}")
    return lines


def _reproduce_section(
    prov: Mapping[str, Any],
    folder: Path,
    evidence: CardEvidence | None,
    command: str | None,
    data_names: Mapping[str, str] | None = None,
) -> list[str]:
    lines = reproduce_commands(prov, folder, evidence, command, data_names)
    local = [s for s in prov["sources"] if not s.get("repo")]
    where = (
        "From a clone of this repository, with the local sources at the paths shown above (relative to the clone):"
        if local
        else "From a clone of this repository:"
    )
    out = ["## Reproduce", "", where, "", "```bash", *lines, "```"]
    output = ((prov.get("recipe") or {}).get("output") or {}).get("path")
    target = f"`{Path(output).name}/`" if isinstance(output, str) else "its `output.path`"
    out += [
        "",
        f"`{RECIPE}` writes the merge to {target} inside the clone (pass `--force` to replace it); on CPU the merge is "
        "deterministic, so its files' sha256 can be checked against the ones listed above. Scores go to "
        "`./hubmerge-results`.",
    ]
    return out


def build_card(
    folder: str | Path,
    evidence: CardEvidence | None = None,
    *,
    method: MethodText,
    command: str | None = None,
    license: str | Mapping[str, str] | None = None,
    license_note: str | None = None,
    recipe_text: str | None = None,
) -> ModelCard:
    """The card of a merged folder, in memory; :func:`write_card` saves it with the files it links to.

    ``method`` names the merge method (from the merging engine's registry); ``recipe_text`` is the recipe file as
    the merge read it (default: read again from ``hubmerge.json``'s ``recipe_file``). ``command`` is how the
    evidence was produced (shown under Reproduce; default: a ``hubmerge eval`` line for
    the merged model, its sources and the tasks). ``license`` (an id, or ``license``/``license_name``/
    ``license_link`` as the source's card data says) overrides the one read from the newest source's files; with
    neither the card says ``license: other`` and why: ``license_note`` (what was checked, e.g. the Hub card),
    default :data:`LICENSE_NOTE`.

    Nothing local is published: sources, recipe and data are named as :func:`publishable_provenance` does, a
    task's data by its Hub id only when it is a Hub dataset (only those tasks enter ``model-index``), else by its
    file's name and sha256.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    prov = read_provenance(folder)
    labels = source_labels(prov)
    name = str(prov.get("name") or folder.name)
    repos = list(dict.fromkeys(s["repo"] for s in prov["sources"] if s.get("repo")))
    if isinstance(license, str):
        lic = {"license": license}
    else:
        lic = dict(license) if license else source_license(prov, folder)
    unknown_license = not lic
    lic = lic or dict(LICENSE_UNKNOWN)
    data_names = shipped_data(evidence, folder, prov)

    results = []
    for task, by_model in (evidence.scores if evidence else {}).items():
        value = by_model.get("merged")
        hub = hub_dataset((evidence.task_sources or {}).get(task) or "")  # type: ignore[union-attr]
        if _present(value) and hub is not None:
            metric = evidence.metric.get(task, "acc")  # type: ignore[union-attr]
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=hub["id"],
                    dataset_name=task,
                    dataset_config=hub["config"] or None,
                    dataset_split=hub["split"] or None,
                    metric_type=metric,
                    metric_value=float(value),
                    metric_name=_METRIC_NAMES.get(metric, metric),
                )
            )
    data = ModelCardData(
        base_model=(repos[0] if len(repos) == 1 else repos) or None,
        library_name="transformers",
        pipeline_tag=_pipeline_tag(folder),
        tags=list(TAGS),
        model_name=name if results else None,
        eval_results=results or None,
        **lic,
    )
    if repos:
        data.base_model_relation = "merge"

    plot_name = _plot_name(evidence.plot) if evidence and evidence.plot else None
    n = len(prov["sources"])
    span = f"{labels[0]} … {labels[-1]}" if n > 1 else labels[0]
    origin = f" of `{repos[0]}`" if len(repos) == 1 else ""
    body = [
        f"# {name}",
        "",
        f"{method.phrase} of {n} pretraining "
        f"checkpoint{'s' * (n > 1)}{origin} "
        f"({span}), made with hubmerge. This card is generated from the merge's `{PROVENANCE_FILE}`"
        + (" and the evaluation results." if evidence is not None and evidence.scores else "."),
        "",
        *_merged_section(prov, folder, labels, method, list(data_names.values())),
        "",
        *_how_section(prov, _recipe_text(prov, folder, recipe_text, data_names)),
    ]
    if evidence is not None and evidence.scores:
        body += ["", *_evaluation_section(evidence, labels, n, data_names, folder)]
        if evidence.scores and not results:
            body += [
                "",
                "No score is listed in the metadata's `model-index`: it names a dataset by its Hub id, and none of "
                "these tasks' data is a Hub dataset (see the data of each task above).",
            ]
    if evidence is not None and (evidence.stability or plot_name):
        body += ["", *_stability_section(evidence, plot_name)]
    body += ["", *_reproduce_section(prov, folder, evidence, command, data_names)]
    if unknown_license:
        body += ["", "## License", "", license_note or LICENSE_NOTE]
    body += [
        "",
        "## Citation",
        "",
        f"Instability metrics follow Nishida, Isonuma & Oda (2025), *Instability in Downstream Task Performance "
        f"During LLM Pretraining*, Findings of EMNLP 2025, [arXiv:2510.04848]({PAPER}).",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    card = ModelCard(content)
    if card.data.to_dict() != data.to_dict():  # the client must read back exactly what we meant
        raise HubmergeError(f"{folder}: the card's metadata does not round-trip through huggingface_hub.ModelCard")
    return card


def shipped_data(evidence: CardEvidence | None, folder: Path, prov: Mapping[str, Any]) -> dict[str, str]:
    """Local data files the card ships beside it (source path -> file name in the folder), so the Reproduce
    commands find them in a clone: each task's data file that exists here, or whose copy is already here."""
    out: dict[str, str] = {}
    taken = {README, RECIPE, PROVENANCE_FILE} | {k for k in (prov.get("files") or {}) if not _is_card_file(k)}
    for source in ((evidence.task_sources or {}) if evidence else {}).values():
        if source in out or hub_dataset(source) is not None:
            continue
        name = Path(source).name
        if name in taken and not _is_copy(folder / name, Path(source)):
            name = f"eval-{name}"
        if Path(source).is_file() or (folder / name).is_file():
            out[source] = name
    return out


def _is_copy(shipped: Path, source: Path) -> bool:
    """Whether ``shipped`` already is the card's copy of ``source`` (a rewrite of the card finds its own copy)."""
    if not shipped.is_file():
        return False
    return not source.is_file() or sha256_file(shipped) == sha256_file(source)


def _pipeline_tag(folder: Path) -> str | None:
    """``text-generation`` when the merged config is a causal LM: the task the evaluation results are filed under."""
    try:
        archs = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return "text-generation" if any(str(a).endswith("ForCausalLM") for a in archs) else None


def _plot_name(plot: Path) -> str:
    suffix = Path(plot).suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise HubmergeError(f"{plot}: the card's plot must be an image ({', '.join(PLOT_SUFFIXES)})")
    return f"{PLOT_STEM}{suffix}"


# --------------------------------------------------------------------------------------------- writing


def write_card(
    folder: str | Path,
    evidence: CardEvidence | None = None,
    *,
    method: MethodText,
    command: str | None = None,
    license: str | Mapping[str, str] | None = None,
    license_note: str | None = None,
    recipe_text: str | None = None,
) -> Path:
    """Write README.md, recipe.yaml and the plot into the merged folder, then bring ``hubmerge.json``'s hashes up to
    date; returns the README's path. Each file is replaced atomically; rerunning with the same inputs rewrites the
    same bytes. ``hubmerge.json`` is rewritten as :func:`publishable_provenance` says (no local path), and the local
    data files the tasks read are copied beside the card (:func:`shipped_data`)."""
    folder = Path(folder)
    prov = read_provenance(folder)
    data_names = shipped_data(evidence, folder, prov)
    for source, name in sorted(data_names.items()):
        if Path(source).is_file() and Path(source).resolve() != (folder / name).resolve():
            atomic_write(folder / name, Path(source).read_bytes())
    if data_names:  # listed before the card is built, so that its file table is the same on every rewrite
        files = dict(prov.get("files") or {})
        files.update({name: sha256_file(folder / name) for name in data_names.values()})
        prov["files"] = dict(sorted(files.items()))
        write_provenance(folder, prov)
    card = build_card(
        folder,
        evidence,
        method=method,
        command=command,
        license=license,
        license_note=license_note,
        recipe_text=recipe_text,
    )
    atomic_write(folder / RECIPE, _recipe_text(prov, folder, recipe_text, data_names))
    if evidence is not None and evidence.plot is not None:
        plot = Path(evidence.plot)
        if not plot.is_file():
            raise HubmergeError(f"{plot}: the card's plot does not exist; draw it first (`hubmerge stability`)")
        target = folder / _plot_name(plot)
        if plot.resolve() != target.resolve():
            atomic_write(target, plot.read_bytes())
    readme = folder / README
    atomic_write(readme, card.content)
    prov = publishable_provenance(read_provenance(folder), folder, data_names)
    files = dict(prov.get("files") or {})
    for p in sorted(folder.iterdir()):
        if p.is_file() and (_is_card_file(p.name) or p.name in data_names.values()):
            files[p.name] = sha256_file(p)
    prov["files"] = dict(sorted(files.items()))
    write_provenance(folder, prov)
    return readme


# --------------------------------------------------------------------------------------------- from the store


def _source_key(s: Mapping[str, Any], models: list[dict[str, Any]], folder: Path) -> str | None:
    """The store's key of a source: the model registered with its repo and commit (or revision), else its hashes
    (the weight files' sha256 that ``hubmerge.json`` records, or the folder's, hashed)."""
    if s.get("repo"):
        for field in ("commit", "revision"):
            if s.get(field):
                hits = [m for m in models if m["repo"] == s["repo"] and m[field] == s[field]]
                if hits:
                    return hits[0]["model_key"]
    recorded = s.get("sha256")
    if isinstance(recorded, dict) and recorded:
        try:
            key = model_key(recorded.values())
        except HubmergeError:
            key = None
        if key is not None and any(m["model_key"] == key for m in models):
            return key
    path = s.get("path")
    if path and _local(path, folder).exists():
        try:
            key = model_key(weight_hashes_of_folder(_local(path, folder)))
        except HubmergeError:
            return None
        return key if any(m["model_key"] == key for m in models) else None
    return None


def _ref_key(ref: str | Path, models: list[dict[str, Any]]) -> str:
    """A model of an averaged series: a key, a stored name, or a folder (hashed)."""
    for m in models:
        if str(ref) == m["model_key"] or str(ref) in (m["names"] or []):
            return m["model_key"]
    if Path(ref).is_dir():
        key = model_key(weight_hashes_of_folder(ref))
        if any(m["model_key"] == key for m in models):
            return key
    raise StoreError(f"averaged series: {ref} is neither a stored model (key or name) nor a folder of one")


def _per_example(store: ResultsStore, keys: Sequence[str], task_key: str, metric: str) -> tuple[Any, Any, Any]:
    """``(pred[m, n], correct[m, n], present[m, n])`` of models along one task, aligned by example id."""
    series = choice_series(store, keys, task_key, metric=metric, union=True)
    return series.pred, series.correct, series.present


def _series_stability(
    store: ResultsStore, keys: Sequence[str], scores: Sequence[float], task_key: str, metric: str, per_example: bool
) -> tuple[float | None, float | None, float | None]:
    """(MTV, IS, flip rate) along models in order; None where undefined or where per-example data does not apply."""
    mtv = mean_total_variation(scores)
    if not per_example:
        return _num(mtv), None, None
    pred, correct, present = _per_example(store, keys, task_key, metric)
    return _num(mtv), _num(instability_score(pred, present)), _num(flip_rate(correct, present))


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def evidence_from_store(
    folder: str | Path,
    store: ResultsStore,
    tasks: list[str] | None = None,
    *,
    metric: str | Mapping[str, str] = "acc",
    averaged: Sequence[str | Path] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> CardEvidence:
    """The card's evidence for a merged folder, read from a results store; no model runs.

    The merged model is found by its weight hashes; each source by the model registered with its repo and commit
    (Hub) or by its folder's hashes (local). ``tasks`` defaults to every scored task of the merged model (names or
    task keys). ``metric`` is ``acc``/``acc_norm``, for all tasks or per task. ``averaged`` lists the models of a
    windowed-average series in training order (store keys, names or folders): "after" is measured along it;
    without it the card reports where the merge sits in its window (see the module docstring).
    A source missing from the store leaves its cells, the ensemble and "before" empty rather than guessed.

    Per-example tasks also get each score's standard error (:func:`~hubmerge.stability.metrics.mean_stderr`) and
    bootstrap intervals of the instability figures. ``groups`` (group -> member tasks, as the store or the recipe
    knows them) adds a row per group with 2+ members found, pooling their examples, placed before its members.
    """
    folder = Path(folder)
    prov = read_provenance(folder)
    labels = source_labels(prov)
    models = store.models()
    merged = model_key(weight_hashes_of_folder(folder))
    if not any(m["model_key"] == merged for m in models):
        raise StoreError(
            f"{folder}: the merged model has no results in {store.path}; evaluate it first "
            f"(`hubmerge eval {folder} --tasks ...`)"
        )
    keys = [_source_key(s, models, folder) for s in prov["sources"]]
    after_keys = [_ref_key(r, models) for r in averaged] if averaged else None
    rows = [s for s in store.scores(models=[merged]) if s.acc is not None]
    if tasks is not None:
        unknown = [t for t in tasks if not any(t in (s.task, s.task_key) for s in rows)]
        if unknown:
            have = ", ".join(sorted({s.task for s in rows})) or "none"
            raise StoreError(f"{folder}: the merged model has no scores for {', '.join(unknown)} (it has: {have})")
        rows = [s for s in rows if s.task in tasks or s.task_key in tasks]
    by_name: dict[str, Any] = {}
    for s in rows:  # a task whose data changed has two keys: show the one with more scored examples
        if s.task not in by_name or s.n > by_name[s.task].n:
            by_name[s.task] = s
    rows = list(by_name.values())
    known = {t["task_key"]: t for t in store.tasks()}
    ev = CardEvidence(
        scores={}, metric={}, ensemble={}, stability={}, n_examples={}, task_sources={}, stderr={}, intervals={}
    )
    step_of = {m["model_key"]: m.get("step") for m in models}  # the store learns a Hub revision's step
    ev.steps = {
        label: None if k is None or step_of.get(k) is None else int(step_of[k])
        for label, k in zip(labels, keys, strict=True)
    }
    arrays: dict[str, tuple[Any, Any, Any]] = {}  # complete per-example tasks: (pred, correct, present), merged last
    for row in rows:
        name, tkey = row.task, row.task_key
        m = metric if isinstance(metric, str) else metric.get(name, "acc")
        if m not in ("acc", "acc_norm"):
            raise StoreError(f"task {name}: the card shows acc or acc_norm, not {m!r}")
        if getattr(row, m) is None:  # the store leaves out what a task does not define (WinoGrande: acc only)
            defined = ", ".join(row.metrics or []) or "acc"
            raise StoreError(f"task {name} defines no {m} (it reports {defined}); show it with metric acc")
        needed = list(dict.fromkeys([k for k in keys if k is not None] + (after_keys or [])))
        by_key = {s.model_key: s for s in store.scores(task=tkey, models=needed)} if needed else {}
        scores: dict[str, float] = {"merged": getattr(row, m)}
        for label, k in zip(labels, keys, strict=True):
            value = getattr(by_key[k], m) if k in by_key else None
            if value is not None:
                scores[label] = value
        ev.scores[name] = scores
        ev.metric[name] = m
        ev.n_examples[name] = row.n  # type: ignore[index]
        if known.get(tkey, {}).get("source"):
            ev.task_sources[name] = str(known[tkey]["source"])  # type: ignore[index]
        complete = all(k in by_key and getattr(by_key[k], m) is not None for k in keys)
        per_example = row.kind in ("multiple_choice", "minimal_pairs")
        stab: dict[str, float | None] = {}
        if complete:
            src_scores = [getattr(by_key[k], m) for k in keys]  # type: ignore[index]
            if per_example:
                e = store.ensemble(keys, tkey)  # type: ignore[arg-type]
                ev.ensemble[name] = e["probability_norm" if m == "acc_norm" else "probability"]  # type: ignore[index]
            found_keys: list[str] = keys  # type: ignore[assignment]
            stab["mtv_before"], stab["is_before"], stab["flip_before"] = _series_stability(
                store, found_keys, src_scores, tkey, m, per_example
            )
            arr = np.asarray(src_scores, dtype=np.float64)
            stab["window_mean"] = float(arr.mean())
            stab["window_std"] = float(arr.std()) if arr.size > 1 else None
            stab["window_range"] = float(arr.max() - arr.min()) if arr.size > 1 else None
            stab["merged_minus_mean"] = float(scores["merged"] - arr.mean())
            if per_example:
                pair = [found_keys[-1], merged]
                _, stab["is_vs_newest"], stab["flip_vs_newest"] = _series_stability(
                    store, pair, [src_scores[-1], scores["merged"]], tkey, m, True
                )
        intervals: dict[str, tuple[float, float]] = {}
        if per_example:
            found = [(label, k) for label, k in zip(labels, keys, strict=True) if k in by_key]
            pred, correct, present = _per_example(store, [k for _, k in found] + [merged], tkey, m)
            rows_of = [*(lab for lab, _ in found), "merged"]
            ev.stderr[name] = {label: mean_stderr(correct[i][present[i]]) for i, label in enumerate(rows_of)}  # type: ignore[index]
            if complete:
                arrays[name] = (pred, correct, present)
                intervals.update(_intervals(pred[:-1], correct[:-1], present[:-1], "before"))
        if after_keys and all(k in by_key and getattr(by_key[k], m) is not None for k in after_keys):
            after_scores = [getattr(by_key[k], m) for k in after_keys]
            stab["mtv_after"], stab["is_after"], stab["flip_after"] = _series_stability(
                store, after_keys, after_scores, tkey, m, per_example
            )
            if per_example:
                intervals.update(_intervals(*_per_example(store, after_keys, tkey, m), "after"))
        ev.stability[name] = stab  # type: ignore[index, assignment]
        if intervals:
            ev.intervals[name] = intervals  # type: ignore[index]
    if after_keys:
        ev.after_description = f"{len(after_keys)} windowed weight averages along the trajectory, in training order"
    _add_groups(ev, groups or {}, arrays, labels)
    return ev


def _intervals(pred: Any, correct: Any, present: Any, when: str) -> dict[str, tuple[float, float]]:
    """The bootstrap intervals of MTV, flip rate and IS along a series, under the card's ``*_before``/``_after``."""
    if correct.shape[0] < 2:
        return {}
    got = series_intervals(correct, pred, present)
    names = {"mtv": "mtv", "flip_rate": "flip", "instability_score": "is"}
    return {f"{names[k]}_{when}": v for k, v in got.items()}


def _add_groups(
    ev: CardEvidence, groups: Mapping[str, Sequence[str]], arrays: Mapping[str, tuple[Any, Any, Any]], labels: list[str]
) -> None:
    """A pooled row per group: its members' examples side by side (lm-eval's size-weighted group score), every
    figure computed on the pool; the group leads its members in every table."""
    found: dict[str, list[str]] = {}
    for group, members in groups.items():
        ms = [t for t in members if t in arrays and t != group]
        if len(ms) >= 2 and len({ev.metric[t] for t in ms}) == 1:
            found[group] = ms
    if not found:
        return
    for group, ms in found.items():
        pred, correct, present = (np.concatenate([arrays[t][i] for t in ms], axis=1) for i in range(3))
        pooled = [float(correct[i][present[i]].mean()) for i in range(correct.shape[0])]
        src = np.asarray(pooled[:-1], dtype=np.float64)
        ev.scores[group] = {"merged": pooled[-1], **dict(zip(labels, pooled[:-1], strict=True))}
        ev.metric[group] = ev.metric[ms[0]]
        ev.n_examples[group] = sum(ev.n_examples[t] for t in ms)  # type: ignore[index]
        if ev.ensemble is not None and all(t in ev.ensemble for t in ms):
            ev.ensemble[group] = float(sum(ev.ensemble[t] * ev.n_examples[t] for t in ms) / ev.n_examples[group])  # type: ignore[index]
        ev.stderr[group] = {  # type: ignore[index]
            label: mean_stderr(correct[i][present[i]]) for i, label in enumerate([*labels, "merged"])
        }
        ev.stability[group] = {  # type: ignore[index]
            "mtv_before": _num(mean_total_variation(src)),
            "is_before": _num(instability_score(pred[:-1], present[:-1])),
            "flip_before": _num(flip_rate(correct[:-1], present[:-1])),
            "window_mean": float(src.mean()),
            "window_std": float(src.std()) if src.size > 1 else None,
            "window_range": float(src.max() - src.min()) if src.size > 1 else None,
            "merged_minus_mean": float(pooled[-1] - src.mean()),
            "is_vs_newest": _num(instability_score(pred[-2:], present[-2:])),
            "flip_vs_newest": _num(flip_rate(correct[-2:], present[-2:])),
        }
        ev.intervals[group] = _intervals(pred[:-1], correct[:-1], present[:-1], "before")  # type: ignore[index]
    ev.groups = found
    order = [t for g, ms in found.items() for t in (g, *ms)]
    order += [t for t in ev.scores if t not in order]
    for attr in ("scores", "stability"):
        d = getattr(ev, attr)
        setattr(ev, attr, {t: d[t] for t in order if t in d})


def window_series(
    labels: Sequence[str], evidence: CardEvidence, method: MethodText | None = None
) -> WindowSeries | None:
    """What the card's plot shows, as data: every task scored for all sources (groups first, as in the tables),
    at the sources' training steps when each is known and they increase, else at their order (a local folder has
    no step); the merged model's score; a group's panel titled as pooled. None when there is no window to draw
    (one source, or no task scored for every source)."""
    labels = list(labels)
    tasks = [t for t, by in evidence.scores.items() if all(lab in by for lab in labels)]
    if len(labels) < 2 or not tasks:
        return None
    steps = [(evidence.steps or {}).get(lab) for lab in labels]
    found = [s for s in steps if s is not None]
    known = len(found) == len(labels) and all(a < b for a, b in zip(found, found[1:], strict=False))
    x = [float(s) for s in found] if known else [float(i) for i in range(len(labels))]
    groups = evidence.groups or {}
    titles = {}
    for g in (t for t in tasks if t in groups):
        titles[g] = f"{g} ({len(groups[g])} tasks pooled)"
    what = method.phrase[0].lower() + method.phrase[1:] if method else "average"
    return WindowSeries(
        labels=labels,
        x=x,
        uses_steps=known,
        tasks=tasks,
        scores={t: [float(evidence.scores[t][lab]) for lab in labels] for t in tasks},
        merged={t: float(evidence.scores[t]["merged"]) for t in tasks if _present(evidence.scores[t].get("merged"))},
        metric={t: evidence.metric.get(t, "acc") for t in tasks},
        titles=titles,
        merged_label=f"merged model ({what} of the window)",
    )


def window_plot(folder: Path, evidence: CardEvidence, out_dir: Path, method: MethodText | None = None) -> Path | None:
    """The card's plot (:func:`window_series`) as a PNG in ``out_dir``; None when there is nothing to draw."""
    series = window_series(source_labels(read_provenance(folder)), evidence, method)
    if series is None:
        return None
    paths = plot_window(series, out_dir / "window", model=folder.name, source="the merged window's checkpoints")
    return paths[0]
