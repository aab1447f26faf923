"""``hubmerge eval``: score checkpoints, merges and ensembles on downstream tasks, keeping every score.

An evaluation is planned first: which models (local folders, or Hub revisions identified by their
weight files' sha256 before anything is downloaded), which tasks, and what the results store already
holds. Only missing (model, task, example) scores are computed, one model at a time, and written to
the store batch by batch, so a rerun skips finished work and an interrupted run resumes. Ensembles are
computed from stored log-likelihoods, with no model run. ``--ray`` fans (revision, task) pairs out over
a Ray cluster; the driver alone writes the store.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubmerge.errors import RecipeError, SourceError
from hubmerge.evaluation.tasks.registry import (
    custom_task,
    expand_tasks,
    get_task_spec,
    known_tasks_hint,
    load_task,
)
from hubmerge.evaluation.tasks.specs import TaskData
from hubmerge.hub.client import HubClient
from hubmerge.hub.pull import plan_pull, pull
from hubmerge.hub.revisions import Selector, parse_revision, resolve_selection
from hubmerge.io.checkpoint import SourceRef
from hubmerge.io.cluster import RAY_RETRIES, cluster_gpus, ray_session, results_as_done
from hubmerge.io.progress import QUIET, Display
from hubmerge.results.keys import model_key, task_key, weight_hashes_of_folder
from hubmerge.results.scores import windows
from hubmerge.results.store import ResultsStore, loglik_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Requests scored between two store commits: the most work an interruption can lose.
COMMIT_EVERY = 512


@dataclass
class EvalTarget:
    """One model to evaluate: a local folder, or a Hub revision not necessarily downloaded yet."""

    label: str
    weight_hashes: list[str]
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    step: int | None = None

    @property
    def key(self) -> str:
        return model_key(self.weight_hashes)

    def describe(self) -> str:
        return f"{self.repo}:{self.revision}" if self.repo else str(self.path)


def target_from_folder(path: str | Path, label: str | None = None) -> EvalTarget:
    """A local model folder (a merge's hubmerge.json already carries its hashes)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: not a model folder (no config.json); give a folder or a Hub repo id", path=path)
    return EvalTarget(label or path.name, weight_hashes_of_folder(path), path=path.resolve())


def targets_from_hub(repo: str, selector: Selector, client: HubClient) -> list[EvalTarget]:
    """Selected revisions, identified by the LFS sha256 of their weight files; nothing is downloaded."""
    revisions, _ = resolve_selection(repo, selector, client)
    listing = plan_pull(repo, revisions, client)
    targets = []
    for rev, files in zip(revisions, listing.files, strict=True):
        hashes = [files.files[w].sha256 or f"git:{files.files[w].blob_id}" for w in files.weights]
        targets.append(
            EvalTarget(rev.name, hashes, repo=repo, revision=rev.name, commit=rev.commit or files.commit, step=rev.step)
        )
    return targets


def source_targets(sources: Sequence[SourceRef]) -> list[EvalTarget]:
    """Evaluation targets for merge sources; Hub snapshots lacking config/tokenizer are completed on use."""
    targets = []
    for s in sources:
        step = parse_revision(s.revision or s.label).step
        complete = (s.path / "config.json").is_file()
        targets.append(
            EvalTarget(
                s.label,
                weight_hashes_of_folder(s.path),
                path=s.path if complete or not s.repo else None,
                repo=s.repo,
                revision=s.revision,
                commit=s.commit,
                step=step,
            )
        )
    return targets


@dataclass
class EvalPlan:
    targets: list[EvalTarget]
    tasks: list[TaskData]
    todo: dict[tuple[str, str], list[int]]  # (model key, task key) -> doc ids still to score
    ensemble: int | None = None

    def unique_targets(self) -> list[EvalTarget]:
        """The first target of each content key: duplicated revisions are scored once."""
        seen: dict[str, EvalTarget] = {}
        for t in self.targets:
            seen.setdefault(t.key, t)
        return list(seen.values())

    def requests_todo(self) -> int:
        by_task = {
            _task_key(t): {
                ex.doc_id: max(1, len(ex.requests)) + len(ex.unconditional) * t.mutual_info for ex in t.examples
            }
            for t in self.tasks
        }
        return sum(sum(by_task[tk][d] for d in docs) for (_, tk), docs in self.todo.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": [{"label": t.label, "model_key": t.key, "source": t.describe()} for t in self.targets],
            "tasks": [
                {"name": t.spec.name, "kind": t.spec.kind, "examples": len(t.examples), "source": t.source}
                for t in self.tasks
            ],
            "examples_to_score": sum(len(v) for v in self.todo.values()),
            "requests_to_score": self.requests_todo(),
            "ensemble": self.ensemble,
        }


def _task_key(task: TaskData) -> str:
    return task_key(task.spec.name, task.data_hash)


def load_tasks(
    names: str | Sequence[str],
    *,
    data: str | Path | Mapping[str, str] | None = None,
    limit: int | Mapping[str, int] | None = None,
    lm_eval_include: Sequence[str | Path] = (),
    kind: str | None = None,
) -> list[TaskData]:
    """Load tasks by name, groups expanded to their paradigms; ``lm_eval:NAME`` is lm-evaluation-harness's task.

    ``kind`` (``multiple_choice``, ``minimal_pairs``, ``cloze``, ``perplexity``) makes each name a task of that kind
    reading ``data``, whatever the file is called (a built-in name must be of that kind).

    ``data`` is one file or folder for every task, or a mapping from the names given to their data; ``limit`` is
    one N for every task, or a mapping from the names given to N (a group's N applies to each of its paradigms).
    ``lm_eval_include`` adds folders of lm-eval task YAMLs (lm-eval's ``--include_path``).
    """
    from hubmerge.evaluation.tasks.lm_eval_tasks import is_lm_eval, load_lm_eval_tasks

    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not items:
        raise RecipeError(f"no task named in {names!r}; {known_tasks_hint()}")
    out: dict[str, TaskData] = {}
    for name in items:
        n = limit.get(name) if isinstance(limit, Mapping) else limit
        if is_lm_eval(name):
            if data is not None and (not isinstance(data, Mapping) or name in data):
                raise RecipeError(
                    f"{name}: lm-eval tasks read their data as their YAML says (dataset_path, data_files); "
                    "--data applies to hubmerge's own tasks"
                )
            for t in load_lm_eval_tasks([name], lm_eval_include, n):
                out.setdefault(t.name, t)
            continue
        where = data.get(name) if isinstance(data, Mapping) else data
        if kind is not None and not name.endswith((".yaml", ".yml")):
            if where is None:
                raise RecipeError(f"--tasks {name} --kind {kind}: give the task's data with --data FILE")
            spec = custom_task(name, kind)
            if not spec.is_group:
                out.setdefault(spec.name, load_task(spec, data=where, limit=n))
                continue
        for t in expand_tasks(name, data=where):
            if t not in out:
                out[t] = load_task(t, data=where, limit=n)
    return list(out.values())


def task_groups(names: Sequence[str], tasks: Sequence[TaskData]) -> dict[str, list[str]]:
    """Group name -> its member task names with 2+ loaded members: each group (``blimp``) among ``names``, and the
    lm-eval groups of ``lm_eval:`` tasks."""
    loaded = {t.spec.name for t in tasks}
    groups: dict[str, list[str]] = {}
    for name in names:
        if name.endswith((".yaml", ".yml")) or name.startswith("lm_eval:"):
            continue
        try:
            spec = get_task_spec(name)
        except RecipeError:  # a task of the user's own (--kind): no group
            continue
        if spec.is_group:
            groups[name] = [t for t in loaded if t.startswith(f"{name}_")]
    for t in tasks:
        for g in t.groups:
            groups.setdefault(g, []).append(t.spec.name)
    return {g: sorted(set(m)) for g, m in groups.items() if len(set(m)) >= 2}


def plan_eval(
    targets: list[EvalTarget], tasks: list[TaskData], store: ResultsStore, ensemble: int | None = None
) -> EvalPlan:
    """What is left to score, given what the store holds (the same weights under any name count as done)."""
    longest = max((len(t) for t in trajectories(targets)), default=0)
    if ensemble is not None and not 1 <= ensemble <= longest:
        raise RecipeError(
            f"--ensemble {ensemble}: needs between 1 and {longest} models of one trajectory (ensembles are formed "
            "within one Hub repo's revisions, or within the local folders given, never across them)"
        )
    todo: dict[tuple[str, str], list[int]] = {}
    with store:  # one connection for every (model, task) lookup
        for target in EvalPlan(targets, tasks, {}).unique_targets():
            for task in tasks:
                done = store.done_docs(target.key, _task_key(task))
                if task.mutual_info:  # acc_mutual_info needs the unconditional log-likelihoods too
                    done &= store.done_docs(target.key, _task_key(task), unconditional=True)
                missing = [ex.doc_id for ex in task.examples if ex.doc_id not in done]
                if missing:
                    todo[(target.key, _task_key(task))] = missing
    return EvalPlan(targets, tasks, todo, ensemble)


def materialise(target: EvalTarget, client: HubClient, display: Display) -> Path:
    """A local folder for the target: Hub revisions are pulled (weights, config and tokenizer)."""
    if target.path is not None:
        return target.path
    rev = parse_revision(target.revision or "", target.commit)
    (ref,) = pull(target.repo or "", [rev], client, display=display)
    target.path = ref.path
    return ref.path


def score_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskData,
    doc_ids: Sequence[int],
    *,
    batch_size: int | None,
    device: str,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Score the given examples of one task; returns column batches for the store, COMMIT_EVERY requests each.

    Yields nothing to the store itself, so the same function serves the local loop and Ray workers.
    """
    from hubmerge.evaluation.scoring import rolling_loglikelihood, score_requests

    wanted = set(doc_ids)
    examples = [ex for ex in task.examples if ex.doc_id in wanted]
    batches = []
    if task.spec.kind == "perplexity":
        for i in range(0, len(examples), 16):
            part = examples[i : i + 16]
            res = rolling_loglikelihood(model, tokenizer, [ex.text or "" for ex in part], device=device)
            batches.append({"keys": [(ex.doc_id, 0) for ex in part], "results": res})
            if progress:
                progress(len(part))
        return batches
    requests = [(r, False) for ex in examples for r in ex.requests]
    if task.mutual_info:  # each choice after an empty context: acc_mutual_info's denominators
        requests += [(r, True) for ex in examples for r in ex.unconditional]
    for i in range(0, len(requests), COMMIT_EVERY):
        part = requests[i : i + COMMIT_EVERY]
        res = score_requests(
            model, tokenizer, [r for r, _ in part], batch_size=batch_size, device=device, progress=progress
        )
        for flag in (False, True):
            keys = [(r.doc_id, r.choice) for r, unc in part if unc is flag]
            if keys:
                batches.append(
                    {"keys": keys, "results": [x for x, (_, unc) in zip(res, part, strict=True) if unc is flag]}
                    | ({"unconditional": True} if flag else {})
                )
    return batches


def store_batch(store: ResultsStore, model: str, task: str, batch: Mapping[str, Any]) -> None:
    """One batch of :func:`score_task` into the store: log-likelihoods, or unconditional ones."""
    rows = loglik_rows(model, task, batch["keys"], batch["results"])
    if batch.get("unconditional"):
        store.add_unconditional(rows)
    else:
        store.add_logliks(rows)


@dataclass
class EvalResult:
    plan: EvalPlan
    scored: int = 0  # requests scored in this run
    scores: list[Any] = field(default_factory=list)  # store.Score rows of the plan's models and tasks
    ensembles: list[dict[str, Any]] = field(default_factory=list)


def run_eval(
    plan: EvalPlan,
    store: ResultsStore,
    *,
    client: HubClient | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    display: Display = QUIET,
    ray_address: str | None = None,
    use_ray: bool = False,
    ray_resources: Mapping[str, float] | None = None,
) -> EvalResult:
    """Score what the plan says is missing, one model at a time, committing every COMMIT_EVERY requests.

    ``client`` reaches the Hub for targets that are Hub revisions not yet downloaded. ``ray_resources``: what
    each (model, task) Ray task asks for (``num_cpus``, ``num_gpus``; default one GPU when scoring on cuda).
    """
    client = client or HubClient()
    result = EvalResult(plan)
    for task in plan.tasks:
        store.register_task(task)
    for group, members in task_groups([], plan.tasks).items():
        store.add_task_group(group, members)  # lm-eval's groups, which `hubmerge stability` pools
    for target in plan.targets:
        store.register_checkpoint(target)
    if use_ray or ray_address:
        result.scored = _run_ray(
            plan,
            store,
            client,
            batch_size=batch_size,
            device=device,
            address=ray_address,
            display=display,
            resources=ray_resources or {},
        )
    else:
        from hubmerge.evaluation.scoring import load_model

        total = plan.requests_todo()
        with display.count("scoring requests", total) as bar:
            for target in plan.unique_targets():
                pending = [
                    (t, plan.todo[(target.key, _task_key(t))])
                    for t in plan.tasks
                    if (target.key, _task_key(t)) in plan.todo
                ]
                if not pending:
                    continue
                path = materialise(target, client, display)
                model, tokenizer = load_model(path, device=device)
                for task, docs in pending:
                    bar.update(status=f"{target.label} / {task.spec.name}")
                    for batch in score_task(
                        model, tokenizer, task, docs, batch_size=batch_size, device=device, progress=bar.advance
                    ):
                        store_batch(store, target.key, _task_key(task), batch)
                        result.scored += len(batch["keys"])
                del model, tokenizer
                gc.collect()
    keys = [t.key for t in plan.targets]
    result.scores = store.scores([_task_key(t) for t in plan.tasks], models=keys)
    if plan.ensemble:
        result.ensembles = ensembles(plan, store)
    return result


def trajectories(targets: Sequence[EvalTarget]) -> list[list[EvalTarget]]:
    """The targets split into trajectories, each in the order given: one per Hub repo, and one of every local
    folder together (the checkpoints a user lists by hand)."""
    groups: dict[str | None, list[EvalTarget]] = {}
    for t in targets:
        groups.setdefault(t.repo, []).append(t)
    return list(groups.values())


def ensembles(plan: EvalPlan, store: ResultsStore) -> list[dict[str, Any]]:
    """Each window of ``plan.ensemble`` consecutive models of one trajectory, on each multiple-choice or
    minimal-pairs task; a trajectory shorter than the window gives none."""
    out = []
    k = plan.ensemble or 0
    for task in plan.tasks:
        if task.spec.kind not in ("multiple_choice", "minimal_pairs"):
            continue
        for members in (w for group in trajectories(plan.targets) if len(group) >= k for w in windows(group, k)):
            e = store.ensemble([m.key for m in members], _task_key(task))
            e["label"] = f"ensemble {members[0].label}..{members[-1].label}" if k > 1 else members[0].label
            e["member_labels"] = [m.label for m in members]
            out.append(e)
    return out


def _run_ray(
    plan: EvalPlan,
    store: ResultsStore,
    client: HubClient,
    *,
    batch_size: int | None,
    device: str,
    address: str | None,
    display: Display,
    resources: Mapping[str, float],
) -> int:
    """One Ray task per (model, task) with work left; each returns its scores, the driver stores them as they
    come. A task that fails for good (twice) stops the others and fails the run with one line naming the model and
    task; what was stored stays, and a rerun scores only the rest."""
    with ray_session(address) as ray:
        gpus = 1 if cluster_gpus(ray) >= 1 and device.startswith("cuda") else 0
        remote = ray.remote(**{"num_gpus": gpus, **resources}, max_retries=RAY_RETRIES)(ray_score)
        futures = {}
        for target in plan.unique_targets():
            for task in plan.tasks:
                docs = plan.todo.get((target.key, _task_key(task)))
                if docs:
                    ref = remote.remote(target, task, docs, batch_size, device, client)
                    futures[ref] = (target, task)
        names = {ref: f"scoring {target.label} on {task.spec.name}" for ref, (target, task) in futures.items()}
        scored = 0
        with (
            display.count("Ray tasks (model, task)", len(futures)) as bar,
            contextlib.closing(
                results_as_done(ray, names, None, "the scores of the tasks done are stored; a rerun scores the rest")
            ) as results,
        ):
            for ref, batches in results:
                target, task = futures[ref]
                for batch in batches:
                    store_batch(store, target.key, _task_key(task), batch)
                    scored += len(batch["keys"])
                bar.advance(1)
    return scored


def ray_score(
    target: EvalTarget,
    task: TaskData,
    docs: list[int],
    batch_size: int | None,
    device: str,
    client: HubClient,
) -> list[dict[str, Any]]:
    """A Ray worker: get the model (pulling it into the worker's own HF cache if needed) and score one task."""
    from hubmerge.evaluation.scoring import load_model

    path = materialise(target, client, QUIET)
    model, tokenizer = load_model(path, device=device)
    return score_task(model, tokenizer, task, docs, batch_size=batch_size, device=device)
