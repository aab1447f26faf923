"""``hubmerge eval``: score checkpoints, merges and ensembles on downstream tasks, keeping every score.

An evaluation is planned first: which models (local folders, or Hub revisions identified by their
weight files' sha256 before anything is downloaded), which tasks, and what the results store already
holds. Only missing (model, task, example) scores are computed, one model at a time, and written to
the store batch by batch, so a rerun skips finished work and an interrupted run resumes. Ensembles are
computed from stored log-likelihoods, with no model run. ``--ray`` fans (revision, task) pairs out over
a Ray cluster; the driver alone writes the store.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HubmergeError
from .tasks import TaskData, expand_tasks, load_task

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
        from .store import model_key

        return model_key(self.weight_hashes)

    def describe(self) -> str:
        return f"{self.repo}:{self.revision}" if self.repo else str(self.path)


def target_from_folder(path: str | Path, label: str | None = None) -> EvalTarget:
    """A local model folder (a merge's hubmerge.json already carries its hashes)."""
    from .store import weight_hashes_of_folder

    path = Path(path)
    if not (path / "config.json").is_file():
        raise HubmergeError(f"{path}: not a model folder (no config.json); give a folder or a Hub repo id")
    return EvalTarget(label or path.name, weight_hashes_of_folder(path), path=path.resolve())


def targets_from_hub(
    repo: str, selector: Any, *, endpoint: str | None = None, token: str | None = None
) -> list[EvalTarget]:
    """Selected revisions, identified by the LFS sha256 of their weight files; nothing is downloaded."""
    from .pull import plan_pull, resolve_selection

    revisions, _ = resolve_selection(repo, selector, endpoint=endpoint, token=token)
    listing = plan_pull(repo, revisions, endpoint=endpoint, token=token)
    targets = []
    for rev, files in zip(revisions, listing.files, strict=True):
        hashes = [files.files[w].sha256 or f"git:{files.files[w].blob_id}" for w in files.weights]
        targets.append(
            EvalTarget(rev.name, hashes, repo=repo, revision=rev.name, commit=rev.commit or files.commit, step=rev.step)
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
        by_task = {_task_key(t): {ex.doc_id: max(1, len(ex.requests)) for ex in t.examples} for t in self.tasks}
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
    from .store import task_key

    return task_key(task.spec.name, task.data_hash)


def load_tasks(
    names: str | Sequence[str], *, data: str | Path | None = None, limit: int | None = None
) -> list[TaskData]:
    return [load_task(name, data=data, limit=limit) for name in expand_tasks(names, data=data)]


def plan_eval(targets: list[EvalTarget], tasks: list[TaskData], store: Any, ensemble: int | None = None) -> EvalPlan:
    """What is left to score, given what the store holds (the same weights under any name count as done)."""
    if ensemble is not None and not 1 <= ensemble <= len(targets):
        raise HubmergeError(f"--ensemble {ensemble}: needs between 1 and {len(targets)} models (one per revision)")
    todo: dict[tuple[str, str], list[int]] = {}
    with store:  # one connection for every (model, task) lookup
        for target in EvalPlan(targets, tasks, {}).unique_targets():
            for task in tasks:
                done = store.done_docs(target.key, _task_key(task))
                missing = [ex.doc_id for ex in task.examples if ex.doc_id not in done]
                if missing:
                    todo[(target.key, _task_key(task))] = missing
    return EvalPlan(targets, tasks, todo, ensemble)


def _materialise(target: EvalTarget, *, endpoint: str | None, token: str | None, quiet: bool) -> Path:
    """A local folder for the target: Hub revisions are pulled (weights, config and tokenizer)."""
    if target.path is not None:
        return target.path
    from .pull import pull
    from .revisions import parse_revision

    rev = parse_revision(target.revision or "", target.commit)
    (ref,) = pull(target.repo or "", [rev], endpoint=endpoint, token=token, quiet=quiet)
    target.path = ref.path
    return ref.path


def score_task(
    model: Any,
    tokenizer: Any,
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
    from .scoring import rolling_loglikelihood, score_requests

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
    requests = [r for ex in examples for r in ex.requests]
    for i in range(0, len(requests), COMMIT_EVERY):
        part = requests[i : i + COMMIT_EVERY]
        res = score_requests(model, tokenizer, part, batch_size=batch_size, device=device, progress=progress)
        batches.append({"keys": [(r.doc_id, r.choice) for r in part], "results": res})
    return batches


@dataclass
class EvalResult:
    plan: EvalPlan
    scored: int = 0  # requests scored in this run
    scores: list[Any] = field(default_factory=list)  # store.Score rows of the plan's models and tasks
    ensembles: list[dict[str, Any]] = field(default_factory=list)


def run_eval(
    plan: EvalPlan,
    store: Any,
    *,
    batch_size: int | None = None,
    device: str = "cpu",
    endpoint: str | None = None,
    token: str | None = None,
    quiet: bool = False,
    ray_address: str | None = None,
    use_ray: bool = False,
) -> EvalResult:
    """Score what the plan says is missing, one model at a time, committing every COMMIT_EVERY requests."""
    from .progress import count_progress
    from .store import loglik_rows

    result = EvalResult(plan)
    for task in plan.tasks:
        store.register_task(task)
    for target in plan.targets:
        store.register_model(
            target.weight_hashes,
            name=target.label,
            repo=target.repo,
            revision=target.revision,
            commit=target.commit,
            path=target.path,
            step=target.step,
        )
    if use_ray or ray_address:
        result.scored = _run_ray(
            plan,
            store,
            batch_size=batch_size,
            device=device,
            endpoint=endpoint,
            token=token,
            address=ray_address,
            quiet=quiet,
        )
    else:
        total = plan.requests_todo()
        with count_progress("scoring requests", total, quiet=quiet) as bar:
            for target in plan.unique_targets():
                pending = [
                    (t, plan.todo[(target.key, _task_key(t))])
                    for t in plan.tasks
                    if (target.key, _task_key(t)) in plan.todo
                ]
                if not pending:
                    continue
                from .scoring import load_model

                path = _materialise(target, endpoint=endpoint, token=token, quiet=quiet)
                model, tokenizer = load_model(path, device=device)
                for task, docs in pending:
                    bar.update(status=f"{target.label} / {task.spec.name}")
                    for batch in score_task(
                        model, tokenizer, task, docs, batch_size=batch_size, device=device, progress=bar.advance
                    ):
                        store.add_logliks(loglik_rows(target.key, _task_key(task), batch["keys"], batch["results"]))
                        result.scored += len(batch["keys"])
                del model, tokenizer
                gc.collect()
    keys = [t.key for t in plan.targets]
    result.scores = store.scores([_task_key(t) for t in plan.tasks], models=keys)
    if plan.ensemble:
        result.ensembles = ensembles(plan, store)
    return result


def ensembles(plan: EvalPlan, store: Any) -> list[dict[str, Any]]:
    """Each window of ``plan.ensemble`` consecutive models, on each multiple-choice or minimal-pairs task."""
    from .ensemble import windows

    out = []
    k = plan.ensemble or 0
    for task in plan.tasks:
        if task.spec.kind not in ("multiple_choice", "minimal_pairs"):
            continue
        for members in windows(plan.targets, k):
            e = store.ensemble([m.key for m in members], _task_key(task))
            e["label"] = f"ensemble {members[0].label}..{members[-1].label}" if k > 1 else members[0].label
            e["member_labels"] = [m.label for m in members]
            out.append(e)
    return out


def _run_ray(
    plan: EvalPlan,
    store: Any,
    *,
    batch_size: int | None,
    device: str,
    endpoint: str | None,
    token: str | None,
    address: str | None,
    quiet: bool,
) -> int:
    """One Ray task per (model, task) with work left; each returns its scores, the driver writes them."""
    try:
        import ray
    except ImportError as e:
        raise HubmergeError("--ray needs Ray: pip install 'hubmerge[ray]'") from e
    from .progress import count_progress
    from .store import loglik_rows

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and device.startswith("cuda") else 0
        remote = ray.remote(num_gpus=gpus, max_retries=2)(_ray_score)
        futures = {}
        for target in plan.unique_targets():
            for task in plan.tasks:
                docs = plan.todo.get((target.key, _task_key(task)))
                if docs:
                    ref = remote.remote(target, task, docs, batch_size, device, endpoint, token)
                    futures[ref] = (target, task)
        scored = 0
        with count_progress("Ray tasks (model, task)", len(futures), quiet=quiet) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                target, task = futures[done[0]]
                for batch in ray.get(done[0]):
                    store.add_logliks(loglik_rows(target.key, _task_key(task), batch["keys"], batch["results"]))
                    scored += len(batch["keys"])
                bar.advance(1)
        return scored
    finally:
        if started:
            ray.shutdown()


def _ray_score(
    target: EvalTarget,
    task: TaskData,
    docs: list[int],
    batch_size: int | None,
    device: str,
    endpoint: str | None,
    token: str | None,
) -> list[dict[str, Any]]:
    """A Ray worker: get the model (pulling it into the worker's own HF cache if needed) and score one task."""
    from .scoring import load_model

    path = _materialise(target, endpoint=endpoint, token=token, quiet=True)
    model, tokenizer = load_model(path, device=device)
    return score_task(model, tokenizer, task, docs, batch_size=batch_size, device=device)


def evaluate_merge(
    merge_plan: Any,
    output: Path,
    cfg: Any,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    quiet: bool = False,
) -> EvalResult:
    """A recipe's ``evaluate:`` block: the merged model, each source checkpoint, and the sources' ensemble."""
    from .store import ResultsStore
    from .sweep import load_recipe_tasks, source_targets

    tasks = load_recipe_tasks(cfg)
    store = ResultsStore(cfg.results)
    sources = source_targets(merge_plan.sources)
    merged = target_from_folder(output, label=f"merged: {merge_plan.name}")
    plan = plan_eval([*sources, merged], tasks, store)
    result = run_eval(plan, store, batch_size=cfg.batch_size, endpoint=endpoint, token=token, quiet=quiet)
    if len(sources) > 1:
        result.ensembles = ensembles(EvalPlan(sources, tasks, {}, ensemble=len(sources)), store)
    return result


def render_results(result: EvalResult, console: Any) -> None:
    """Per task: each model's acc / acc_norm (or perplexities), then the ensembles."""
    from rich.table import Table

    by_task: dict[str, list[Any]] = {}
    for s in result.scores:
        by_task.setdefault(s.task_key, []).append(s)
    labels = {t.key: t.label for t in result.plan.targets}
    for task in result.plan.tasks:
        rows = by_task.get(_task_key(task), [])
        lm = task.spec.kind in ("perplexity", "cloze")
        pairs = task.spec.kind == "minimal_pairs"  # lm-eval reports acc only: the choices are whole sentences
        table = Table(title=f"{task.spec.name} ({task.spec.kind}, {len(task.examples)} examples)", title_justify="left")
        cols = (
            ["model", "n", "acc", "perplexity", "bits/byte"] if lm else ["model", "n", "acc", "acc_norm"][: 4 - pairs]
        )
        for c in cols:
            table.add_column(c, justify="left" if c == "model" else "right")
        order = {t.key: i for i, t in enumerate(result.plan.targets)}
        for s in sorted(rows, key=lambda s: order.get(s.model_key, 1 << 30)):
            name = labels.get(s.model_key, s.model)
            if lm:
                ppl = s.perplexity if s.perplexity is not None else s.word_perplexity
                table.add_row(name, str(s.n), _fmt(s.acc), _fmt(ppl, 2), _fmt(s.bits_per_byte))
            else:
                table.add_row(name, str(s.n), _fmt(s.acc), *([] if pairs else [_fmt(s.acc_norm)]))
        for e in result.ensembles:
            if e["task_key"] == _task_key(task):
                for how, key in (("prob. avg.", "probability"), ("majority", "majority")):
                    norm = [] if pairs else [_fmt(e[f"{key}_norm"])]
                    table.add_row(f"{e['label']} ({how})", str(e["n"]), _fmt(e[key]), *norm)
        console.print(table)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
