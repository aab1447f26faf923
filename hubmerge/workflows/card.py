"""The stability model card of a merged folder, from its ``hubmerge.json`` and the results store.

The card's text is rendered by :mod:`hubmerge.stability.card`; this module supplies what it needs from the other
engines: how the merge method is described (the merging registry) and the evidence the store holds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmerge.errors import HubError
from hubmerge.hub.client import HubClient
from hubmerge.io.provenance import PROVENANCE_FILE, dumps, read_provenance, try_read_provenance
from hubmerge.merging.methods import METHODS
from hubmerge.results.store import ResultsStore
from hubmerge.stability.card import (
    CardEvidence,
    MethodText,
    evidence_from_store,
    publishable_provenance,
    source_labels,
    source_license,
    window_plot,
)
from hubmerge.stability.card import build_card as render_card_text
from hubmerge.stability.card import write_card as render_card

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from hubmerge.hub.push import PushResult


def method_text(prov: Mapping[str, Any]) -> MethodText:
    """How the card names the method ``hubmerge.json`` records, from the merging engine's registry."""
    name = str(prov.get("method") or "uniform")
    method = METHODS.get(name)
    if method is None:  # written by another hubmerge version: say what it was called
        return MethodText("An average", f"`{name}`")
    decay = ((prov.get("recipe") or {}).get("ema") or {}).get("decay")
    return MethodText(method.phrase, method.describe(decay))


def build_card(folder: str | Path, evidence: CardEvidence | None = None, **options: Any) -> ModelCard:
    """The card of a merged folder, in memory (:func:`write_card` saves it with the files it links to); ``options``
    (``command``, ``license``, ``license_note``, ``recipe_text``) as :func:`hubmerge.stability.card.build_card`
    takes them, the method's wording from the merging registry."""
    return render_card_text(folder, evidence, method=method_text(read_provenance(folder)), **options)


def write_card(folder: str | Path, evidence: CardEvidence | None = None, **options: Any) -> Path:
    """Write the card (README.md, recipe.yaml, the plot) into a merged folder; returns the README's path.
    ``options`` as :func:`build_card`."""
    return render_card(folder, evidence, method=method_text(read_provenance(folder)), **options)


def sources_license(
    prov: Mapping[str, Any], folder: Path, client: HubClient | None
) -> tuple[dict[str, str], str | None]:
    """The license the card states and, when none is found, the note saying what was checked.

    The newest source's own files first (a local folder's README.md or config.json); for a Hub source, its
    model card's data on the Hub (at the commit read, else the default branch). A Hub that cannot be asked
    (offline, unreachable) is said in the note rather than taken for "no license".
    """
    found = source_license(prov, folder)
    newest = prov["sources"][-1]
    repo = newest.get("repo")
    if found or not repo:
        return found, None
    terms = "check the source repository's terms before reusing these weights"
    if client is None or client.offline:
        why = "HF_HUB_OFFLINE is set" if client is not None else "the Hub was not asked"
        return {}, (
            f"The license of `{repo}` was not read from the Hub ({why}) and no file on disk states one, so the "
            f"metadata says `license: other`: {terms}, or rerun `hubmerge card` online or with `--license`."
        )
    try:
        found = client.card_license(str(repo), newest.get("commit") or newest.get("revision"))
    except HubError as e:
        return {}, (
            f"The license of `{repo}` could not be read from the Hub ({e}), so the metadata says `license: other`: "
            f"{terms}, or rerun `hubmerge card` when the Hub answers, or with `--license`."
        )
    if found:
        return found, None
    return {}, (
        f"Neither the model card of `{repo}` on the Hub nor the sources' files state a license, so the metadata "
        f"says `license: other`: {terms}."
    )


def card_groups(store_groups: Mapping[str, Sequence[str]], names: Iterable[str]) -> dict[str, list[str]]:
    """The task groups a card pools, among the task names ``names``: lm-eval's groups as the store recorded them
    (an import, or an evaluation of ``lm_eval:`` tasks) and the built-in groups (BLiMP) whose ``<group>_<paradigm>``
    tasks are there. Read from the store and the registry alone, so that ``hubmerge card`` long after a merge
    pools what the merge's own card pooled; groups of one member are left out."""
    from hubmerge.evaluation.tasks.registry import get_task_spec, list_tasks  # here: `hubmerge card` alone needs it

    names = list(dict.fromkeys(names))
    groups = {g: [t for t in names if t in set(ms) and t != g] for g, ms in store_groups.items()}
    for spec in (get_task_spec(n) for n in list_tasks()):
        if spec.is_group:
            members = [t for t in names if t.startswith(f"{spec.name}_")]
            groups.setdefault(spec.name, [])
            groups[spec.name] += [t for t in members if t not in groups[spec.name]]
    return {g: ms for g, ms in groups.items() if len(ms) >= 2}


def source_steps(prov: Mapping[str, Any], steps: Mapping[str, int | None] | None) -> dict[str, int | None]:
    """Each source's training step: as the store recorded it, else parsed from a Hub source's revision name
    (Pythia's ``step143000``, OLMo's ``step1000-tokens4B``); None for a local folder, which has no step."""
    from hubmerge.hub.revisions import parse_revision

    out: dict[str, int | None] = {}
    for label, s in zip(source_labels(prov), prov["sources"], strict=True):
        step = (steps or {}).get(label)
        if step is None and s.get("repo") and s.get("revision"):
            step = parse_revision(str(s["revision"])).step
        out[label] = step
    return out


def write_card_from_store(
    folder: str | Path,
    results: str | Path | None = None,
    tasks: list[str] | None = None,
    *,
    license: str | None = None,
    recipe_text: str | None = None,
    client: HubClient | None = None,
) -> Path:
    """``hubmerge card``: the evidence a results store holds for a merge and its sources, with a plot of the
    sources' scores at their training steps and the merged model among them, written as the folder's README.md.

    A task group (BLiMP's paradigms, an lm-eval group) gets a pooled row that leads its members in the tables and
    the plot, as the sweep's stability report does; a group named in ``tasks`` stands for its members."""
    folder = Path(folder)
    prov = read_provenance(folder)  # a folder that is not a merge's output is named before the store is opened
    store = ResultsStore(results, read_only=True)
    groups = card_groups(store.task_groups(), (t["name"] for t in store.tasks()))
    if tasks is not None:
        tasks = list(dict.fromkeys(m for t in tasks for m in groups.get(t, [t])))
    evidence = evidence_from_store(folder, store, tasks, groups=groups)
    evidence.steps = source_steps(prov, evidence.steps)
    with tempfile.TemporaryDirectory(prefix="hubmerge-card-") as tmp:
        evidence.plot = window_plot(folder, evidence, Path(tmp), method_text(prov))
        lic, note = (license, None) if license else sources_license(prov, folder, client)
        return write_card(folder, evidence, license=lic or None, license_note=note, recipe_text=recipe_text)


def push_merge(folder: str | Path, repo: str, client: HubClient, **options: Any) -> PushResult:
    """``hubmerge push`` and a recipe's ``output.push``: the folder in one commit, its ``hubmerge.json`` published
    as the card publishes it (no local path), whether or not a card was written; ``options`` as
    :func:`hubmerge.hub.push.push` takes them. The folder's own ``hubmerge.json`` is left as it is."""
    from hubmerge.hub.push import push

    folder = Path(folder)
    prov = try_read_provenance(folder)
    replace = None
    if prov is not None and isinstance(prov.get("sources"), list) and prov["sources"]:
        published = publishable_provenance(prov, folder)
        if not (folder / published["recipe_file"]).is_file():  # no card shipped the recipe: name the user's file
            published["recipe_file"] = Path(str(prov.get("recipe_file") or "")).name or None
        replace = {PROVENANCE_FILE: dumps(published).encode()}
    return push(folder, repo, client, replace=replace, **options)
