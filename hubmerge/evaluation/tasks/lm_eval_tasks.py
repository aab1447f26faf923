"""Any lm-evaluation-harness log-likelihood task (``lm_eval:NAME``), its requests built by lm-eval itself.

lm-eval's ``TaskManager`` loads the task (its YAML, its dataset through ``datasets``, its prompts, few-shot
sampling with simple_evaluate's default seed, its target delimiter), and ``build_all_requests`` makes the very
``Instance`` objects ``lm_eval`` would send to a model: prompts are identical by construction. hubmerge only
scores them, stores every per-example log-likelihood, and aggregates as lm-eval does (``acc``, ``acc_norm``,
``acc_mutual_info``; word/byte perplexity and bits per byte for ``loglikelihood_rolling``).

A task's store key is made from its lm-eval config (:func:`hubmerge.results.lm_eval_samples.task_identity`), the
same key ``hubmerge results import`` gives lm-eval's own samples of that task: rows lm-eval scored and rows
hubmerge scored are one task. Each example keeps lm-eval's ``doc_hash``, so a task whose data changed under the
same config is caught by the store rather than mixed in.

lm-eval is an optional extra (``pip install 'hubmerge[lm-eval]'``); nothing here imports it until a task is asked
for.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from hubmerge.errors import MissingExtraError, RecipeError, TaskDataError
from hubmerge.evaluation.tasks.specs import Example, Request, TaskData, TaskSpec
from hubmerge.results.lm_eval import group_leaves
from hubmerge.results.lm_eval_samples import KINDS, task_identity

PREFIX = "lm_eval:"
# Metrics hubmerge computes from stored log-likelihoods, per lm-eval output type.
COMPUTED = {
    "multiple_choice": ("acc", "acc_norm", "acc_mutual_info"),
    "loglikelihood": ("acc", "perplexity"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
INSTALL = "pip install 'hubmerge[lm-eval]'"


def is_lm_eval(name: str) -> bool:
    return str(name).startswith(PREFIX)


def _lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise MissingExtraError(f"lm_eval: tasks need lm-evaluation-harness, an optional extra: {INSTALL}") from None
    return lm_eval


@contextlib.contextmanager
def _hushed() -> Iterator[None]:
    """lm-eval logs a warning per metric default and draws a bar per task; keep them off our display, then
    put its loggers back as they were."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _check_include(include: Sequence[str | Path]) -> tuple[str, ...]:
    """Task folders must exist and hold task YAML; say which one does not."""
    out = []
    for item in include:
        path = Path(item).expanduser()
        if not path.is_dir():
            raise TaskDataError(f"--lm-eval-include {path}: no such folder", path=path)
        if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
            raise TaskDataError(f"--lm-eval-include {path}: no task YAML files (*.yaml) in this folder", path=path)
        out.append(str(path.resolve()))
    return tuple(out)


@lru_cache(maxsize=4)
def _manager(include: tuple[str, ...]) -> Any:
    """lm-eval's task index (it reads every built-in YAML once: seconds), kept for the process."""
    lm_eval = _lm_eval()
    with _hushed():
        return lm_eval.tasks.TaskManager(include_path=list(include) or None)


def _nested_leaves(loaded: Mapping[Any, Any], out: dict[str, list[str]]) -> list[Any]:
    """Leaf task objects of the nested task dict of lm-eval before 0.4.10, recording each group's leaves."""
    leaves: list[Any] = []
    for key, value in loaded.items():
        if isinstance(value, Mapping):
            name = str(getattr(key, "group_name", None) or getattr(key, "group", None) or key)
            found = _nested_leaves(value, out)
            out.setdefault(name, []).extend(t.config.task for t in found)
            leaves += found
        else:
            leaves.append(value)
    return leaves


def _load(names: list[str], manager: Any) -> tuple[list[Any], dict[str, list[str]]]:
    """Leaf task objects and each group's leaf names, through ``TaskManager.load`` where lm-eval has it."""
    if hasattr(manager, "load"):
        loaded = manager.load(names)
        group_map = {str(g): [str(m) for m in ms] for g, ms in loaded.get("group_map", {}).items()}
        return list(loaded["tasks"].values()), {g: group_leaves(g, group_map) for g in group_map}
    groups: dict[str, list[str]] = {}
    return _nested_leaves(_lm_eval().tasks.get_task_dict(names, manager), groups), groups


def _tasks_of(names: Sequence[str], manager: Any) -> tuple[list[Any], dict[str, list[str]]]:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        import difflib

        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, sorted(known), n=3)
            hints.append(f"{PREFIX}{n}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise RecipeError(
            f"unknown lm-eval task {'; '.join(hints)}; `lm_eval ls tasks` lists them, and --lm-eval-include DIR "
            "adds a folder of your own task YAMLs"
        )
    try:
        with _hushed():
            leaves, groups = _load(list(names), manager)
    except Exception as err:  # lm-eval and datasets raise many types while loading a task
        reason = (str(err).splitlines() or [""])[0]
        raise TaskDataError(
            f"lm-eval could not load {', '.join(PREFIX + n for n in names)} ({type(err).__name__}: {reason}); offline, "
            "a task needs its dataset in the datasets cache, or `dataset_path: json` with local data_files"
        ) from None
    unique = list({t.config.task: t for t in leaves}.values())
    return unique, {g: list(dict.fromkeys(ms)) for g, ms in groups.items() if len(set(ms)) >= 2}


def _doc_hash(doc: Any) -> str:
    """lm-eval's ``doc_hash`` of a document, as its samples files record it."""
    from lm_eval.utils import handle_non_serializable, hash_string

    return hash_string(json.dumps(doc, indent=2, default=handle_non_serializable, ensure_ascii=False))


def _gold(task: Any, doc: Any, choices: list[str], where: str) -> int:
    """The gold choice as lm-eval's ``process_results`` resolves it."""
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    if isinstance(gold, list):
        raise TaskDataError(
            f"{where}: several gold answers (multiple_target); the results store keeps one gold answer per example"
        )
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -1
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise TaskDataError(f"{where}: gold answer {gold!r} is not one of its {len(choices)} choices")
    return gold


def _examples(task: Any, instances: Sequence[Any]) -> tuple[list[Example], list[str]]:
    """lm-eval's instances, grouped per document, as hubmerge examples (requests in lm-eval's order), and each
    document's lm-eval ``doc_hash``."""
    name = str(task.config.task)
    mutual_info = "acc_mutual_info" in metric_names(task)
    by_doc: dict[int, list[Any]] = {}
    for inst in instances:
        by_doc.setdefault(int(inst.doc_id), []).append(inst)
    output_type = task.config.output_type
    examples, hashes = [], []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        doc = insts[0].doc
        where = f"{PREFIX}{name} doc {doc_id}"
        if output_type == "loglikelihood_rolling":
            text = str(insts[0].args[0])
            examples.append(Example(doc_id, -1, (), (), text=text, counts=_counts(task, doc, where)))
        elif output_type == "loglikelihood":
            ctx, cont = insts[0].args[:2]
            examples.append(Example(doc_id, 0, (cont,), (Request(doc_id, 0, ctx, cont),)))
        else:
            choices = [str(c) for c in task.doc_to_choice(doc)]
            n = len(choices)
            args = [i.args[:2] for i in insts]
            if len(args) != (2 * n if mutual_info else n):
                raise TaskDataError(f"{where}: lm-eval built {len(args)} requests for {n} choices")
            requests = tuple(Request(doc_id, c, ctx, cont) for c, (ctx, cont) in enumerate(args[:n]))
            unconditional = tuple(Request(doc_id, c, ctx, cont) for c, (ctx, cont) in enumerate(args[n:]))
            gold = _gold(task, doc, choices, where)
            examples.append(Example(doc_id, gold, tuple(choices), requests, unconditional=unconditional))
        hashes.append(_doc_hash(doc))
    return examples, hashes


def _counts(task: Any, doc: Any, where: str) -> tuple[int, int]:
    """(words, bytes) of a rolling task's document as the task's own ``process_results`` weighs its perplexities
    (wikitext counts the page before detokenising): asked of lm-eval with a log-likelihood of 0."""
    out = task.process_results(doc, [0.0])
    try:
        words = out["word_perplexity"][1] if "word_perplexity" in out else None
        n_bytes = next(out[m][1] for m in ("byte_perplexity", "bits_per_byte") if m in out)
    except (StopIteration, TypeError, IndexError, KeyError):
        raise TaskDataError(
            f"{where}: the task's process_results gives no (log-likelihood, bytes) pair for byte_perplexity or "
            "bits_per_byte; hubmerge cannot weigh its perplexity as lm-eval does"
        ) from None
    if words is None:
        from hubmerge.results.scores import count_words

        words = count_words(str(task.doc_to_target(doc)))
    return int(words), int(n_bytes)


def metric_names(task: Any) -> list[str]:
    """The metrics a loaded lm-eval task computes (its ``metric_list``, or its output type's defaults)."""
    return [str(m) for m in getattr(task, "_metric_fn_list", {})]


def prepare(task: Any, seed: int | None = None) -> None:
    """Settings simple_evaluate applies before building requests: 0-shot where the task names no count, and the
    few-shot sampler's seed. A generation task is refused here, with its output type."""
    output_type = task.config.output_type
    if output_type not in KINDS:
        raise RecipeError(
            f"{PREFIX}{task.config.task} is a {output_type} task: hubmerge scores log-likelihood tasks only "
            "(multiple_choice, loglikelihood, loglikelihood_rolling); run it with lm_eval itself"
        )
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=default_seed() if seed is None else seed)


def build_requests(task: Any, limit: int | None) -> list[Any]:
    """lm-eval's own ``build_all_requests``: the instances ``lm_eval`` would send to a model."""
    with _hushed():
        try:
            task.build_all_requests(limit=limit, rank=0, world_size=1)
        except Exception as err:  # lm-eval and datasets raise many types
            reason = (str(err).splitlines() or [""])[0]
            what = f"{PREFIX}{task.config.task}"
            raise TaskDataError(f"{what}: lm-eval could not build its requests ({reason})") from None
    return list(task.instances)


def default_seed() -> int:
    """simple_evaluate's default few-shot seed."""
    defaults = getattr(_lm_eval(), "defaults", None)
    return int(getattr(defaults, "DEFAULT_OTHER_SEED", 1234))


def to_task_data(task: Any, instances: Sequence[Any], identity: str | None = None) -> TaskData:
    """A TaskData of the given instances of a loaded lm-eval task; its key is made from the task's config unless
    ``identity`` says otherwise."""
    name = str(task.config.task)
    output_type = task.config.output_type
    examples, hashes = _examples(task, instances)
    config = task.dump_config()
    kind = KINDS[output_type]
    computed = COMPUTED[output_type]
    metrics = metric_names(task)
    keep = [m for m in metrics if m in computed] or list(computed[:2])
    notices = [
        f"{PREFIX}{name}: lm-eval's metric {m} is not computed by hubmerge eval (it computes "
        f"{', '.join(computed)}); lm-eval's own runner with HubmergeLM computes every metric"
        for m in metrics
        if m not in computed
    ]
    if config.get("process_results") and output_type != "loglikelihood_rolling":
        notices.append(
            f"{PREFIX}{name}: the task scores with its own process_results; hubmerge's {', '.join(keep)} come from "
            "the stored log-likelihoods as lm-eval's default does, and may differ from that code's numbers"
        )
    spec = TaskSpec(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        description=f"lm-evaluation-harness task {name} (output type {output_type}), requests built by lm-eval",
        lm_eval_task=name,
        metrics=keep if kind != "cloze" else None,
        target_delimiter=str(config.get("target_delimiter", " ")),
    )
    version = getattr(_lm_eval(), "__version__", "?")
    dataset = str(config.get("dataset_path") or "?")
    dataset += f"/{config['dataset_name']}" if config.get("dataset_name") else ""
    source = f"lm-eval {version} task {name} ({dataset})"
    total = len(task.eval_docs) if hasattr(task, "eval_docs") else len(examples)
    key = identity or task_identity({"task": name, **config})
    return TaskData(spec, examples, key, source, total, doc_hashes=tuple(hashes), notes=tuple(notices))


def load_task_object(name: str, include: Sequence[str | Path] = ()) -> Any:
    """One loaded lm-eval leaf task by name, or None when lm-eval does not know it."""
    manager = _manager(_check_include(include))
    if name not in set(manager.all_tasks):
        return None
    leaves, _ = _tasks_of([name], manager)
    return next((t for t in leaves if t.config.task == name), None)


def load_lm_eval_tasks(
    names: Sequence[str],
    include: Sequence[str | Path] = (),
    limit: int | Mapping[str, int] | None = None,
) -> list[TaskData]:
    """Tasks named ``lm_eval:NAME`` (groups expanded to their leaf tasks, which remember their groups), requests
    built by lm-eval. ``limit`` is one N for every task (lm-eval's ``--limit``), or a mapping from the names given
    to N."""
    _lm_eval()  # one line saying what to install, before anything else is tried
    bare = [str(n).removeprefix(PREFIX) for n in names]
    if any(not n for n in bare):
        raise RecipeError(f"{PREFIX} needs a task name after it, e.g. {PREFIX}arc_easy")
    manager = _manager(_check_include(include))
    seed = default_seed()
    tasks: dict[str, TaskData] = {}
    for given, name in zip(names, bare, strict=True):
        n = limit.get(given, limit.get(name)) if isinstance(limit, Mapping) else limit
        leaves, groups = _tasks_of([name], manager)
        for task in leaves:
            leaf = str(task.config.task)
            member_of = tuple(g for g, members in groups.items() if leaf in members)
            if leaf in tasks:
                old = tasks[leaf]
                tasks[leaf] = replace(old, groups=tuple(dict.fromkeys((*old.groups, *member_of))))
                continue
            prepare(task, seed)
            tasks[leaf] = replace(to_task_data(task, build_requests(task, n)), groups=member_of)
    return list(tasks.values())
