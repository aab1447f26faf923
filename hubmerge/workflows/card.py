"""The stability model card of a merged folder, from its ``hubmerge.json`` and the results store.

The card's text is rendered by :mod:`hubmerge.stability.card`; this module supplies what it needs from the other
engines: how the merge method is described (the merging registry) and the evidence the store holds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmerge.io.provenance import read_provenance
from hubmerge.merging.methods import METHODS
from hubmerge.results.store import ResultsStore
from hubmerge.stability.card import CardEvidence, MethodText, evidence_from_store, window_plot
from hubmerge.stability.card import build_card as render_card_text
from hubmerge.stability.card import write_card as render_card

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


def method_text(prov: Mapping[str, Any]) -> MethodText:
    """How the card names the method ``hubmerge.json`` records, from the merging engine's registry."""
    name = str(prov.get("method") or "uniform")
    method = METHODS.get(name)
    if method is None:  # written by another hubmerge version: say what it was called
        return MethodText("An average", f"`{name}`")
    decay = ((prov.get("recipe") or {}).get("ema") or {}).get("decay")
    return MethodText(method.phrase, method.describe(decay))


def build_card(
    folder: str | Path,
    evidence: CardEvidence | None = None,
    *,
    command: str | None = None,
    license: str | None = None,
    recipe_text: str | None = None,
) -> ModelCard:
    """The card of a merged folder, in memory (:func:`write_card` saves it with the files it links to)."""
    method = method_text(read_provenance(folder))
    return render_card_text(folder, evidence, method=method, command=command, license=license, recipe_text=recipe_text)


def write_card(
    folder: str | Path,
    evidence: CardEvidence | None = None,
    *,
    command: str | None = None,
    license: str | None = None,
    recipe_text: str | None = None,
) -> Path:
    """Write the card (README.md, recipe.yaml, the plot) into a merged folder; returns the README's path."""
    method = method_text(read_provenance(folder))
    return render_card(folder, evidence, method=method, command=command, license=license, recipe_text=recipe_text)


def write_card_from_store(
    folder: str | Path,
    results: str | Path | None = None,
    tasks: list[str] | None = None,
    *,
    license: str | None = None,
    recipe_text: str | None = None,
) -> Path:
    """``hubmerge card``: the evidence a results store holds for a merge and its sources, with a plot of the
    sources' scores along the window, written as the folder's README.md."""
    folder = Path(folder)
    read_provenance(folder)  # a folder that is not a merge's output is named before the store is opened
    store = ResultsStore(results, read_only=True)
    evidence = evidence_from_store(folder, store, tasks)
    with tempfile.TemporaryDirectory(prefix="hubmerge-card-") as tmp:
        evidence.plot = window_plot(folder, evidence, Path(tmp))
        return write_card(folder, evidence, license=license, recipe_text=recipe_text)
