"""``hubmerge merge RECIPE``: select and check Hub sources, pull them, merge, evaluate, write the card, push.

The recipe arrives parsed (a :class:`~hubmerge.merging.recipe.RecipeDocument`, read once); every stage below uses
that object, so a recipe edited while a long merge runs changes nothing this merge does afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubmerge.errors import IntegrityError, InvalidValueError, RecipeError
from hubmerge.hub.client import HubClient
from hubmerge.hub.integrity import apply_policy, check
from hubmerge.hub.pull import HubResolution, check_remote_headers, fetch_kept, plan_pull, resolve_hub_sources
from hubmerge.hub.revisions import Revision, resolve_selection
from hubmerge.hub.stream import OpenedStream, check_stream_order, open_stream
from hubmerge.io.checkpoint import SourceRef, byte_order, identical_weights, open_checkpoint
from hubmerge.io.cluster import RayOptions, import_ray
from hubmerge.io.progress import QUIET, Display
from hubmerge.io.sizes import format_size
from hubmerge.merging.distributed import execute_on_ray
from hubmerge.merging.executor import MergeResult, execute
from hubmerge.merging.methods import normalised_weights
from hubmerge.merging.plan import MergePlan, StreamPlan, TensorPlan, build_plan, check_disk_space
from hubmerge.merging.recipe import EvaluateConfig, HubSources, RecipeDocument, load_recipe

if TYPE_CHECKING:
    from hubmerge.evaluation.runner import EvalResult
    from hubmerge.hub.push import PushResult


@dataclass
class MergeOutcome:
    """Everything ``hubmerge merge`` did: the plan, the merged folder, and what the recipe asked for after it."""

    plan: MergePlan
    result: MergeResult
    evaluation: EvalResult | None = None  # when the recipe has an evaluate: block
    card: Path | None = None  # the model card (README.md) written after that evaluation
    pushed: PushResult | None = None  # when the recipe's output.push uploaded the merge

    @property
    def output(self) -> Path:
        return self.result.output

    @property
    def files(self) -> dict[str, str]:
        return self.result.files


def kept_weights(doc: RecipeDocument, selected: list[Revision], kept: list[Revision]) -> list[float] | None:
    """A Hub recipe's ``weights`` (one per selected revision) for the revisions the integrity check kept."""
    weights = doc.recipe.weights
    if weights is None:
        return None
    where = doc.where
    if len(weights) != len(selected):
        raise RecipeError(
            f"{where}: field 'weights': {len(weights)} entries but the selector chose "
            f"{len(selected)} revisions ({', '.join(r.name for r in selected)})",
            field="weights",
        )
    names = {r.name for r in kept}
    shares = [w for w, r in zip(weights, selected, strict=True) if r.name in names]
    try:
        normalised_weights(shares)
    except InvalidValueError:
        dropped = [r.name for r in selected if r.name not in names]
        policy = doc.recipe.sources.on_anomaly if isinstance(doc.recipe.sources, HubSources) else "refuse"
        raise RecipeError(
            f"{where}: field 'weights': the revisions kept after the integrity check "
            f"({', '.join(r.name for r in kept)}) have weights {shares}, which sum to zero once "
            f"{', '.join(dropped)} {'was' if len(dropped) == 1 else 'were'} dropped (sources.on_anomaly: "
            f"{policy}); give the kept revisions a share, or select others",
            field="weights",
        ) from None
    return shares


def plan_merge(
    doc: RecipeDocument,
    client: HubClient | None = None,
    *,
    device: str = "cpu",
    force: bool = False,
    display: Display = QUIET,
    stream: bool | None = None,
) -> MergePlan:
    """The plan of a recipe's merge; Hub sources are selected, checked and pulled (or opened to stream) first.

    ``stream`` overrides the recipe's ``sources.fetch`` (``--stream``). An output that would not fit on its disk is
    refused here (exit 4), before any tensor is read."""
    if not isinstance(doc.recipe.sources, HubSources):
        return check_disk_space(plan_local(doc, device=device, force=force, display=display))
    hub = doc.recipe.sources
    client = client or HubClient()
    streamed = stream if stream is not None else hub.fetch == "stream"
    if streamed:
        check_online(doc, client)
    resolved = resolve_hub_sources(hub.repo, hub.selector, hub.on_anomaly, client, download=False)
    note_dropped(resolved, display)
    weights = kept_weights(doc, resolved.selected, resolved.kept)  # before any download: a bad share costs nothing
    if streamed:
        plan = plan_streamed(doc, resolved, client, device=device, force=force, weights=weights, display=display)
        return check_disk_space(plan)
    # the merge's reader hashes every cached byte as it merges it: no separate pass over the files here
    resolved.sources = fetch_kept(hub.repo, resolved, client, display=display, verify=False)
    doc.check_output([s.path for s in resolved.sources])
    plan = build_plan(doc, resolved.sources, device=device, force=force, weights=weights)
    plan.extra_provenance.update(resolved.provenance)
    return check_disk_space(plan)


def plan_local(doc: RecipeDocument, *, device: str = "cpu", force: bool = False, display: Display = QUIET) -> MergePlan:
    """A recipe of local folders: the same weights listed twice (one folder, or two folders holding identical
    files) would count twice in the average; the recipe's ``on_anomaly`` refuses it (exit 6) or drops the copy."""
    paths = doc.local_sources()
    sources = [SourceRef(p, p.name) for p in paths]
    checkpoints = [open_checkpoint(p) for p in paths]
    duplicates = identical_weights(checkpoints)
    if not duplicates:
        return build_plan(doc, sources, device=device, force=force, checkpoints=checkpoints)
    policy = doc.recipe.on_anomaly
    found = [
        f"sources.{j}.path ({paths[j]}) holds weights bit-identical to sources.{i}.path ({paths[i]})"
        for j, i in duplicates.items()
    ]
    if policy == "refuse":
        raise IntegrityError(
            f"{doc.where}: {'; '.join(found)}: it would count twice in the average; remove it, or set "
            "`on_anomaly: drop_duplicates` in the recipe to merge without the copy",
            path=doc.where,
        )
    keep = [k for k in range(len(sources)) if k not in duplicates]
    weights = [doc.recipe.weights[k] for k in keep] if doc.recipe.weights is not None else None
    dropped = [
        {"revision": sources[j].label, "reason": f"duplicate: weights are bit-identical to sources.{i}.path"}
        for j, i in duplicates.items()
    ]
    for d in dropped:
        display.note(f"dropped {d['revision']}: {d['reason']}")
    plan = build_plan(
        doc,
        [sources[k] for k in keep],
        device=device,
        force=force,
        weights=weights,
        checkpoints=[checkpoints[k] for k in keep],
    )
    plan.extra_provenance["integrity"] = {"policy": policy, "checked": "local (weight bytes)", "dropped": dropped}
    return plan


def stream_plan(tensors: list[TensorPlan], opened: OpenedStream) -> StreamPlan:
    """How a merge (or a sweep's pass) reads streamed sources: the newest revision's byte order, checked against
    every source's, and the reader; refuses a source stored in another order before any weight is read."""
    sources, checkpoints, streams = opened
    order = byte_order(tensors, checkpoints[-1])
    check_stream_order(order, sources, checkpoints)
    return StreamPlan(
        order,
        streams.open_reader,
        streams.total_bytes,
        streams.file_count,
        streams.connections,
        streams.max_in_flight,
        streams.snapshot,
    )


def note_dropped(resolved: HubResolution, display: Display) -> None:
    """Say on the console which revisions the integrity policy left out (``hubmerge.json`` records them too)."""
    for d in resolved.provenance["integrity"]["dropped"]:
        display.note(f"dropped {d['revision']}: {d['reason']}")


def check_online(doc: RecipeDocument, client: HubClient) -> None:
    """A streamed merge or sweep reads the Hub: with ``HF_HUB_OFFLINE`` set, say so before anything else."""
    if client.offline:
        raise RecipeError(
            f"{doc.where}: field 'sources.fetch': stream reads the weights from the Hub, and HF_HUB_OFFLINE is set; "
            "use fetch: cache (or --cache) to merge from the HF cache",
            field="sources.fetch",
        )


def plan_streamed(
    doc: RecipeDocument,
    resolved: HubResolution,
    client: HubClient,
    *,
    device: str = "cpu",
    force: bool = False,
    weights: list[float] | None = None,
    display: Display = QUIET,
) -> MergePlan:
    """The plan of a ``fetch: stream`` merge: tensor tables from remote headers, small files through the cache.

    Nothing but the newest revision's config and tokenizer (and each revision's weight index) is downloaded.
    """
    hub = doc.recipe.sources
    assert isinstance(hub, HubSources)
    check_online(doc, client)
    sources, checkpoints, streams = open_stream(hub.repo, resolved.kept, client, connections=hub.connections)
    doc.check_output([s.path for s in sources])
    plan = build_plan(doc, sources, device=device, force=force, weights=weights, checkpoints=checkpoints)
    plan.stream = stream_plan(plan.tensors, (sources, checkpoints, streams))
    plan.extra_provenance.update(resolved.provenance)
    display.note(
        f"{hub.repo}: streaming {len(sources)} revisions ({format_size(streams.total_bytes)}) by range requests over "
        f"{streams.connections} connections; nothing but config and tokenizer goes to the HF cache"
    )
    return plan


@dataclass
class HubDryRun:
    """What a Hub recipe's merge would fetch, decided from listings and headers only (no weights downloaded)."""

    repo: str
    selected: list[Revision]
    kept: list[Revision]
    dropped: list[dict[str, str]]
    download_bytes: int
    files: int
    headers_checked: int

    def to_dict(self) -> dict[str, object]:
        return {
            "repo": self.repo,
            "selected": [r.name for r in self.selected],
            "kept": [r.name for r in self.kept],
            "dropped": self.dropped,
            "download_bytes": self.download_bytes,
            "files": self.files,
            "headers_checked": self.headers_checked,
        }


def hub_dry_run(doc: RecipeDocument, client: HubClient | None = None) -> HubDryRun:
    """A Hub recipe's dry run: the selection, the integrity verdict, the download size and the header check."""
    hub = doc.recipe.sources
    if not isinstance(hub, HubSources):
        raise RecipeError(f"{doc.where}: field 'sources': a dry run of Hub sources needs a Hub repo", field="sources")
    client = client or HubClient()
    selected, everything = resolve_selection(hub.repo, hub.selector, client)
    report = check(hub.repo, selected, client, all_revisions=everything)
    kept, dropped = apply_policy(selected, report, hub.on_anomaly)
    kept_weights(doc, selected, kept)
    pull_plan = plan_pull(hub.repo, kept, client)
    agreed = check_remote_headers(pull_plan, client)
    return HubDryRun(hub.repo, selected, kept, dropped, pull_plan.total_bytes, len(pull_plan.downloads()), agreed)


def evaluate_merge(
    plan: MergePlan,
    output: Path,
    cfg: EvaluateConfig,
    client: HubClient | None = None,
    *,
    display: Display = QUIET,
) -> EvalResult:
    """A recipe's ``evaluate:`` block: the merged model, each source checkpoint, and the sources' ensemble."""
    # Imported here, not at the top: planning and dry runs (`hubmerge merge --dry-run`) should not pay for them.
    from hubmerge.evaluation.runner import (
        EvalPlan,
        ensembles,
        load_tasks,
        plan_eval,
        run_eval,
        source_targets,
        target_from_folder,
    )
    from hubmerge.results.store import ResultsStore

    tasks = load_tasks(cfg.task_list, data=cfg.data, limit=cfg.limit, lm_eval_include=cfg.include_list)
    store = ResultsStore(cfg.results)
    sources = source_targets(plan.sources)
    merged = target_from_folder(output, label=f"merged: {plan.name}")
    eval_plan = plan_eval([*sources, merged], tasks, store)
    result = run_eval(eval_plan, store, client=client, batch_size=cfg.batch_size, display=display)
    if len(sources) > 1:
        result.ensembles = ensembles(EvalPlan(sources, tasks, {}, ensemble=len(sources)), store)
    return result


def finish_merge(
    doc: RecipeDocument,
    plan: MergePlan,
    result: MergeResult,
    client: HubClient | None = None,
    *,
    display: Display = QUIET,
) -> MergeOutcome:
    """What the recipe asks for after the merge: evaluate (``evaluate:``, then the card), push (``output.push``)."""
    from hubmerge.workflows.card import push_merge, write_card_from_store

    outcome = MergeOutcome(plan, result)
    recipe = doc.recipe
    if recipe.evaluate is not None:
        outcome.evaluation = evaluate_merge(plan, result.output, recipe.evaluate, client, display=display)
        outcome.card = write_card_from_store(
            result.output, recipe.evaluate.results, recipe_text=doc.text, client=client
        )
    cfg = recipe.output.push
    if cfg is not None:
        outcome.pushed = push_merge(
            result.output,
            cfg.repo,
            client or HubClient(),
            branch=cfg.branch,
            private=cfg.private,
            create_pr=cfg.create_pr,
            message=cfg.message,
        )
    return outcome


def merge_recipe(
    recipe: RecipeDocument | str | Path,
    client: HubClient | None = None,
    *,
    force: bool = False,
    display: Display = QUIET,
    device: str = "cpu",
    threads: int = 1,
    stream: bool | None = None,
    ray: RayOptions | None = None,
) -> MergeOutcome:
    """``hubmerge merge RECIPE``: plan (check and pull Hub sources, or open them to stream), merge into
    ``output.path``, then evaluate, write the card and push as the recipe says. ``recipe`` is a parsed document or
    a file to read once; ``stream`` overrides the recipe's ``sources.fetch``; ``ray`` (``--ray``) writes the
    output's shards from Ray tasks, bit-identical to a one-machine merge."""
    doc = recipe if isinstance(recipe, RecipeDocument) else load_recipe(recipe)
    client = client or HubClient()
    if ray is not None:
        import_ray()  # without the extra, say so before pulling anything
    plan = plan_merge(doc, client, device=device, force=force, display=display, stream=stream)
    result = run_merge(plan, force=force, display=display, threads=threads, ray=ray)
    return finish_merge(doc, plan, result, client, display=display)


def run_merge(
    plan: MergePlan,
    *,
    force: bool = False,
    display: Display = QUIET,
    threads: int = 1,
    ray: RayOptions | None = None,
) -> MergeResult:
    """Carry out a merge's plan on this machine, or with one Ray task per output shard when ``ray`` is given."""
    if ray is not None:
        return execute_on_ray(plan, ray, force=force, display=display, threads=threads)
    return execute(plan, force=force, display=display, threads=threads)
