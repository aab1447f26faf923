"""lm-evaluation-harness runs as lm-eval wrote them: a results file and, with ``--log_samples``, its samples files.

Layouts read (0.4.0 to 0.4.13):

- ``<out>/<model_name_sanitized>/results_<date>.json`` with ``samples_<task>_<date>.jsonl`` beside it, the same
  ``<date>``; several revisions of one repo share one folder and differ only by date;
- 0.4.0-0.4.2 wrote each task's samples as ``<model_args>_<task>.jsonl`` holding one indented JSON list.

A samples line carries ``doc_id``, ``target``, ``arguments`` (the requests' context and continuation), ``resps`` /
``filtered_resps`` (per request the log-likelihood and the is-greedy flag, as strings), ``filter``, ``doc_hash`` and
the per-doc metric values. One line exists per (doc, filter). Lines are parsed by DuckDB's JSON reader, which
reads only the fields asked for and runs on every core: an archive of a million lines reads faster than a Python
``json.loads`` loop over the same lines. Which checkpoint a run scored is read from ``config.model_args``
(``pretrained=``, ``revision=``), then ``model_revision`` / ``model_sha``, then a ``stepN`` part of a local path.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hubmerge.errors import ResultFileError
from hubmerge.results.lm_eval import group_leaves, model_args

# lm-eval output types hubmerge keeps per example, and the store kind each becomes.
KINDS = {"multiple_choice": "multiple_choice", "loglikelihood": "cloze", "loglikelihood_rolling": "perplexity"}
# The task config fields that decide what was asked: the same values give the same store task key, whichever
# model, revision or run evaluated it (``metadata`` holds the model's path, so it is left out).
IDENTITY_FIELDS = (
    "task",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "process_docs",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "description",
    "num_fewshot",
    "output_type",
)
_DATE = re.compile(r"^results_(?P<date>.+)\.json$")
_STEP_PART = re.compile(r"step[-_]?(\d+)", re.IGNORECASE)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def task_identity(config: Mapping[str, Any]) -> str:
    """sha256 over the fields of an lm-eval task config that decide its requests, and its version."""
    defining = {k: config.get(k) for k in IDENTITY_FIELDS if config.get(k) is not None}
    version = (config.get("metadata") or {}).get("version") if isinstance(config.get("metadata"), Mapping) else None
    text = json.dumps({"config": defining, "version": version}, sort_keys=True, default=str)
    return hashlib.sha256(b"lm-eval-task-v1\n" + text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunTask:
    """One task of a run, as its results file describes it."""

    name: str
    output_type: str | None  # multiple_choice, loglikelihood, loglikelihood_rolling, generate_until; None (0.3)
    target_delimiter: str
    identity: str
    metrics: tuple[str, ...] = ()
    n_samples: int | None = None  # lm-eval's n-samples "effective"

    @property
    def kind(self) -> str | None:
        """The store kind of the task, or None when its per-example results cannot be kept (generation)."""
        return KINDS.get(self.output_type or "")


@dataclass(frozen=True)
class LmEvalRun:
    """One results file: which checkpoint it scored, its tasks and groups, and its samples files."""

    path: Path
    date: str
    lm_eval_version: str | None
    pretrained: str | None
    revision: str | None
    commit: str | None
    tasks: dict[str, RunTask]
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its leaf tasks
    samples: dict[str, Path] = field(default_factory=dict)  # task -> samples file

    @property
    def is_local(self) -> bool:
        """Whether ``pretrained`` names a folder (that exists here, or does not look like a Hub repo id)."""
        if self.pretrained is None:
            return False
        return Path(self.pretrained).expanduser().exists() or not _HUB_ID.match(self.pretrained)

    @property
    def repo(self) -> str | None:
        return None if self.is_local else self.pretrained


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ResultFileError(f"{path}: cannot read ({e.strerror or e})", path=path) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultFileError(f"{path}: not a JSON file ({e}); is it truncated?", path=path) from e


def _identify(path: Path, data: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(pretrained, revision, commit) of the checkpoint a results file scored."""
    config = data.get("config") if isinstance(data.get("config"), Mapping) else {}
    args = model_args(config)
    name = data.get("model_name") if isinstance(data.get("model_name"), str) else None
    pretrained = args.get("pretrained") or name
    revision = args.get("revision") or None
    commit = str(config.get("model_sha") or "") or None
    local = pretrained is not None and (Path(pretrained).expanduser().exists() or not _HUB_ID.match(pretrained))
    recorded = config.get("model_revision")
    if revision is None and isinstance(recorded, str) and recorded and not (local and recorded == "main"):
        revision = recorded  # the HF backend records "main" for a local folder: that says nothing
    if revision is None and local and pretrained:
        parts = [p for p in Path(pretrained).parts if _STEP_PART.search(p)]
        if parts:
            revision = f"step{int(_STEP_PART.search(parts[-1]).group(1))}"  # type: ignore[union-attr]
    return pretrained, revision, commit


def read_run(path: str | Path) -> LmEvalRun:
    """A results file and the samples files that belong to it."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("results"), Mapping):
        raise ResultFileError(f"{path}: no 'results' object; is this an lm-evaluation-harness results file?", path=path)
    subtasks = data.get("group_subtasks") if isinstance(data.get("group_subtasks"), Mapping) else {}
    subtasks = {str(g): [str(t) for t in ts] for g, ts in subtasks.items() if isinstance(ts, list) and ts}
    groups = {g: leaves for g in subtasks if (leaves := group_leaves(g, subtasks))}
    configs = data.get("configs") if isinstance(data.get("configs"), Mapping) else {}
    n_samples = data.get("n-samples") if isinstance(data.get("n-samples"), Mapping) else {}
    tasks = {}
    for name in data["results"]:
        if name in subtasks:
            continue
        config = configs.get(name) if isinstance(configs.get(name), Mapping) else {}
        metrics = tuple(
            str(m.get("metric")) for m in config.get("metric_list") or [] if isinstance(m, Mapping) and m.get("metric")
        ) or _reported_metrics(data["results"][name])
        effective = (n_samples.get(name) or {}).get("effective") if isinstance(n_samples.get(name), Mapping) else None
        tasks[str(name)] = RunTask(
            str(name),
            config.get("output_type"),
            str(config.get("target_delimiter", " ")),
            task_identity({"task": name, **config}),
            metrics,
            int(effective) if isinstance(effective, int) else None,
        )
    match = _DATE.match(path.name)
    date = match.group("date") if match else str(data.get("date") or "")
    pretrained, revision, commit = _identify(path, data)
    version = data.get("lm_eval_version") if isinstance(data.get("lm_eval_version"), str) else None
    return LmEvalRun(
        path, date, version, pretrained, revision, commit, tasks, groups, _samples_of(path, date, list(tasks))
    )


def _reported_metrics(raw: Any) -> tuple[str, ...]:
    """The metrics a task's ``results`` entry reports (``acc,none`` -> ``acc``; stderrs and labels left out): what
    the task defines where the file keeps no config of it."""
    if not isinstance(raw, Mapping):
        return ()
    names = (str(k).split(",", 1)[0] for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool))
    return tuple(dict.fromkeys(n for n in names if not n.endswith("_stderr")))


def _samples_of(results: Path, date: str, tasks: list[str]) -> dict[str, Path]:
    """Each task's samples file beside a results file: ``samples_<task>_<date>.jsonl``, else (0.4.0-0.4.2)
    the one ``*_<task>.jsonl`` there."""
    found = {}
    for task in tasks:
        dated = results.parent / f"samples_{task}_{date}.jsonl"
        if dated.is_file():
            found[task] = dated
            continue
        old = [p for p in results.parent.glob(f"*_{task}.jsonl") if not p.name.startswith("samples_")]
        if len(old) == 1:
            found[task] = old[0]
    return found


def find_runs(paths: Iterable[str | Path]) -> list[LmEvalRun]:
    """Every lm-eval results file under the given folders (searched recursively) or given directly."""
    runs = []
    for item in paths:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(p.rglob("results*.json"))
            if not files:
                raise ResultFileError(f"{p}: no lm-eval results files (results_<date>.json) in this folder", path=p)
            runs += [read_run(f) for f in files]
        elif p.is_file():
            runs.append(read_run(p))
        else:
            raise ResultFileError(f"{p}: no such file or folder", path=p)
    return runs


@dataclass
class TaskSamples:
    """One task's samples under one filter, as arrays in file order (choices flattened, ``n`` per doc)."""

    file: Path
    line: np.ndarray  # [docs] line (or list position) in the file, 1-based
    doc_id: np.ndarray  # [docs]
    n: np.ndarray  # [docs] requests per doc
    logprob: np.ndarray  # [sum n]
    is_greedy: np.ndarray  # [sum n]
    cont_len: np.ndarray  # [sum n] continuation length in characters
    target: list[str | None]
    target_pos: np.ndarray  # [docs] 1-based position of the target among the choices (as text), 0 where absent
    doc_hash: list[str | None]
    acc: np.ndarray  # [docs] lm-eval's per-doc acc, NaN where absent
    acc_norm: np.ndarray
    words: np.ndarray  # [docs] rolling tasks: lm-eval's word and byte counts (-1 where absent)
    n_bytes: np.ndarray
    uncond_logprob: np.ndarray | None = None  # [sum n] acc_mutual_info tasks: each choice after an empty context

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n)])


_COLUMNS = {
    "doc_id": "BIGINT",
    "filter": "VARCHAR",
    "target": "JSON",
    "doc_hash": "VARCHAR",
    "filtered_resps": "JSON",
    "arguments": "JSON",
    "acc": "JSON",
    "acc_norm": "JSON",
    "word_perplexity": "JSON",
    "byte_perplexity": "JSON",
}


def _responses(resps: str) -> tuple[str, str]:
    """SQL for the per-request log-likelihoods and greedy flags of ``[["-91.9", "False"], ...]`` (one per request);
    a log-likelihood that is not a number becomes NULL, for the caller to name."""
    return (
        f"list_transform({resps}, lambda x: TRY_CAST(x[1] AS DOUBLE))",
        f"list_transform({resps}, lambda x: x[2] = 'True')",
    )


def _table(rolling: bool, delimiter: str) -> str:
    """One parse of the file into a temporary table: a row per line, lists per request."""
    if rolling:  # filtered_resps: ["-177.5"]
        resps = "TRY_CAST(filtered_resps AS VARCHAR[])"
        ll = f"list_transform({resps}, lambda x: TRY_CAST(x AS DOUBLE))"
        greedy = f"list_transform({resps}, lambda x: false)"
    else:
        ll, greedy = _responses("TRY_CAST(filtered_resps AS VARCHAR[][])")
    # arguments: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...} (files), or [[ctx, cont], ...] (in memory)
    conts = (
        "CASE WHEN json_type(arguments) = 'OBJECT' THEN list_transform(map_values(TRY_CAST(arguments AS "
        "MAP(VARCHAR, STRUCT(arg_0 VARCHAR, arg_1 VARCHAR)))), lambda a: coalesce(a.arg_1, a.arg_0)) "
        "ELSE list_transform(TRY_CAST(arguments AS VARCHAR[][]), lambda a: a[len(a)]) END"
    )
    skip = len(delimiter) + 1  # a choice is its continuation without the target delimiter
    return f"""
        CREATE OR REPLACE TEMP TABLE s AS
        SELECT line, doc_id, filter, target_type, target, doc_hash, ll, greedy,
               list_transform(conts, lambda c: length(c)) AS cont_len,
               list_position(list_transform(conts, lambda c: substr(c, {skip})), target) AS target_pos,
               acc, acc_norm, words, n_bytes
        FROM (
        SELECT line, doc_id, filter, json_type(target) AS target_type, json_extract_string(target, '$') AS target,
               doc_hash, {ll} AS ll, {greedy} AS greedy, {conts} AS conts,
               TRY_CAST(json_extract_string(acc, '$') AS DOUBLE) AS acc,
               TRY_CAST(json_extract_string(acc_norm, '$') AS DOUBLE) AS acc_norm,
               TRY_CAST(json_extract_string(word_perplexity, '$[1]') AS BIGINT) AS words,
               TRY_CAST(json_extract_string(byte_perplexity, '$[1]') AS BIGINT) AS n_bytes
        FROM (SELECT row_number() OVER () AS line, * FROM read_json(?, format = ?, columns = {_COLUMNS!r})))
    """


_DOCS = """
    SELECT line, doc_id, target_type, target, target_pos, doc_hash, acc, acc_norm, words, n_bytes,
           coalesce(len(ll), 0) AS n_ll, coalesce(list_count(ll), 0) AS n_numbers, coalesce(len(cont_len), 0) AS n_cont,
           coalesce(list_count(cont_len), 0) AS n_cont_ok
    FROM s WHERE filter = ? ORDER BY line
"""
_REQUESTS = """
    SELECT line, unnest(generate_series(1, len(ll))) AS pos, unnest(ll) AS ll, unnest(greedy) AS greedy,
           unnest(cont_len) AS cont_len
    FROM s WHERE filter = ? AND len(ll) > 0 ORDER BY line, pos
"""


def _format_of(path: Path) -> str:
    """``newline_delimited`` (0.4.3 on) or ``array`` (0.4.0-0.4.2 wrote one indented JSON list)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "array" if head.startswith(b"[") else "newline_delimited"


def read_samples(path: Path, task: RunTask, filter_name: str = "none", like: TaskSamples | None = None) -> TaskSamples:
    """The samples of ``task`` under ``filter_name`` from one file; a bad line is an error naming file and line.

    ``like``: the samples of another revision on the same task (see :meth:`SamplesReader.read`).
    """
    with SamplesReader() as reader:
        return reader.read(path, task, filter_name, like)


class SamplesReader:
    """Reads samples files through one in-memory DuckDB database, with a cursor per thread.

    Opening a database costs more than parsing a 2,000-line file, so an import of many files keeps one open;
    ``threads=1`` where the caller reads several files at once, one per core.
    """

    def __init__(self, threads: int | None = None) -> None:
        import duckdb

        self._db = duckdb.connect(config={"threads": threads} if threads else {})
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cursors: list[Any] = []

    def __enter__(self) -> SamplesReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for cursor in self._cursors:
                cursor.close()
            self._cursors.clear()
        self._db.close()

    def _cursor(self) -> Any:
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._local.cursor = self._db.cursor()
            with self._lock:
                self._cursors.append(cursor)
        return cursor

    def read(
        self, path: Path, task: RunTask, filter_name: str = "none", like: TaskSamples | None = None
    ) -> TaskSamples:
        """The samples of ``task`` under ``filter_name`` from one file; a bad line is an error naming file and line.

        ``like``: the samples of another revision on the same task. Where this file holds the very same documents
        (the same doc ids with the same lm-eval ``doc_hash``, in the same order, one filter), only its scores are
        parsed and the documents' targets and choice lengths are taken from ``like``: a few times faster, and what
        an import of a hundred revisions does for all but the first. Anything irregular reads the whole file, which
        names the offending line.
        """
        import duckdb

        con = self._cursor()
        if like is not None:
            fast = _read_scores(con, path, task, filter_name, like)
            if fast is not None:
                return fast
        try:
            rolling = task.output_type == "loglikelihood_rolling"
            con.execute(_table(rolling, task.target_delimiter), [str(path), _format_of(path)])
            filters = [r[0] for r in con.execute("SELECT DISTINCT filter FROM s").fetchall()]
            if not filters:
                raise ResultFileError(f"{path}: no samples in this file", path=path)
            if filter_name not in filters:
                have = ", ".join(sorted(str(f) for f in filters))
                raise ResultFileError(
                    f"{path}: no samples under filter {filter_name!r}; the file has {have} (pass --filter NAME)",
                    path=path,
                )
            docs = con.execute(_DOCS, [filter_name]).fetchnumpy()
            flat = con.execute(_REQUESTS, [filter_name]).fetchnumpy()
        except duckdb.Error as e:
            raise _unreadable(path, str(e)) from None
        finally:
            con.execute("DROP TABLE IF EXISTS s")
        return _to_arrays(path, task, docs, flat)


_SCORES_ONLY = {
    "doc_id": "BIGINT",
    "filter": "VARCHAR",
    "doc_hash": "VARCHAR",
    "filtered_resps": "VARCHAR[][]",
    "acc": "DOUBLE",
    "acc_norm": "DOUBLE",
}
_SCORES = """
    SELECT doc_id, filter, doc_hash, {} AS ll, {} AS greedy, acc, acc_norm
    FROM read_json(?, format = 'newline_delimited', columns = {!r})
""".format(*_responses("filtered_resps"), _SCORES_ONLY)  # filtered_resps parsed as VARCHAR[][] by the reader


def _read_scores(con: Any, path: Path, task: RunTask, filter_name: str, like: TaskSamples) -> TaskSamples | None:
    """Only the scores of a file whose documents are ``like``'s; None where anything differs or looks wrong."""
    import duckdb

    if task.output_type == "loglikelihood_rolling" or any(h is None for h in like.doc_hash):
        return None
    if _format_of(path) != "newline_delimited":
        return None
    try:
        table = con.sql(_SCORES, params=[str(path)]).to_arrow_table()
    except duckdb.Error:
        return None  # the full reader says what is wrong, and where
    if table.num_rows != len(like.doc_id) or any(table.column(c).null_count for c in ("doc_id", "ll", "greedy")):
        return None
    if set(table.column("filter").unique().to_pylist()) != {filter_name}:
        return None
    doc_id = table.column("doc_id").to_numpy()
    if not np.array_equal(doc_id, like.doc_id) or table.column("doc_hash").to_pylist() != like.doc_hash:
        return None
    ll_list = table.column("ll").combine_chunks()
    greedy_list = table.column("greedy").combine_chunks()
    n_ll = ll_list.value_lengths().to_numpy(zero_copy_only=False)
    if ll_list.values.null_count or greedy_list.values.null_count:
        return None
    ll = ll_list.values.to_numpy(zero_copy_only=False).astype(np.float64)
    greedy = greedy_list.values.to_numpy(zero_copy_only=False).astype(bool)
    if not np.isfinite(ll).all():
        return None
    uncond = None
    if like.uncond_logprob is not None:
        if not np.array_equal(n_ll, 2 * like.n):
            return None
        keep = _conditional(n_ll, like.n)
        ll, greedy, uncond = ll[keep], greedy[keep], ll[~keep]
    elif not np.array_equal(n_ll, like.n):
        return None

    def column(name: str) -> np.ndarray:
        col = table.column(name)
        return (
            col.to_numpy(zero_copy_only=False).astype(np.float64)
            if col.null_count == 0
            else np.asarray([np.nan if v is None else v for v in col.to_pylist()], dtype=np.float64)
        )

    return replace(
        like,
        file=path,
        line=np.arange(1, table.num_rows + 1),  # one line per sample: a single filter, newline-delimited
        logprob=ll,
        is_greedy=greedy,
        acc=column("acc"),
        acc_norm=column("acc_norm"),
        uncond_logprob=uncond,
    )


_MALFORMED = re.compile(r"Malformed JSON in file .*?, at byte \d+ in line (?P<line>\d+): (?P<why>.*)")


def _unreadable(path: Path, message: str) -> ResultFileError:
    """DuckDB's reading error as one line naming the file and line."""
    first = message.splitlines()[0]
    bad = _MALFORMED.search(first)
    if bad is None:
        return ResultFileError(f"{path}: not a readable lm-eval samples file ({first})", path=path)
    why = bad.group("why").rstrip(". ")
    hint = "; is the file truncated?" if "end of data" in why else ""
    return _fail(path, bad.group("line"), f"not a JSON line ({why}){hint}")


def _fail(path: Path, line: Any, message: str) -> ResultFileError:
    return ResultFileError(f"{path}:{int(line)}: {message}", path=path)


def _column(rows: Mapping[str, Any], key: str, fill: Any, dtype: Any) -> np.ndarray:
    """A fetched column as a plain array, NULLs (masked) replaced by ``fill``."""
    col = rows[key]
    if isinstance(col, np.ma.MaskedArray):
        col = col.filled(fill)
    return np.asarray(col, dtype=dtype)


def _to_arrays(path: Path, task: RunTask, docs: Mapping[str, Any], flat: Mapping[str, Any]) -> TaskSamples:
    line = _column(docs, "line", 0, np.int64)
    doc_ids = docs["doc_id"]
    if isinstance(doc_ids, np.ma.MaskedArray) and doc_ids.mask.any():
        raise _fail(path, line[np.argmax(doc_ids.mask)], "no doc_id")
    n_ll, n_numbers = _column(docs, "n_ll", 0, np.int64), _column(docs, "n_numbers", 0, np.int64)
    n_cont, n_cont_ok = _column(docs, "n_cont", 0, np.int64), _column(docs, "n_cont_ok", 0, np.int64)
    for bad, message in (
        (n_ll == 0, "no log-likelihoods in filtered_resps (a generation task keeps no log-likelihoods)"),
        (n_numbers != n_ll, "a log-likelihood in filtered_resps is not a number"),
        ((n_cont != n_ll) | (n_cont_ok != n_cont), "the requests in arguments do not match the responses"),
    ):
        if bad.any():
            raise _fail(path, line[np.argmax(bad)], message)
    types = list(docs["target_type"])
    if "ARRAY" in types:
        raise _fail(
            path,
            line[types.index("ARRAY")],
            f"task {task.name} has several gold answers per document (multiple_target); the results store keeps "
            "one gold answer per example",
        )
    ll = _column(flat, "ll", np.nan, np.float64)
    if not np.isfinite(ll).all():
        first = int(np.argmax(~np.isfinite(ll)))
        raise _fail(path, _column(flat, "line", 0, np.int64)[first], f"a log-likelihood is {ll[first]}, not a number")
    greedy = _column(flat, "greedy", False, bool)
    cont = _column(flat, "cont_len", 0, np.int64)
    n = n_ll
    uncond = None
    if "acc_mutual_info" in task.metrics and (n_ll % 2 == 0).all():
        # acc_mutual_info appends an unconditional ("", continuation) request per choice, after the conditional ones
        n = n_ll // 2
        keep = _conditional(n_ll, n)
        uncond = ll[~keep]
        ll, greedy, cont = ll[keep], greedy[keep], cont[keep]

    def text(key: str) -> list[str | None]:
        col = docs[key]
        return [None if v is None or v is np.ma.masked else str(v) for v in col]

    return TaskSamples(
        file=path,
        line=line,
        doc_id=np.asarray(doc_ids, dtype=np.int64),
        n=n,
        logprob=ll,
        is_greedy=greedy,
        cont_len=cont,
        target=text("target"),
        target_pos=_column(docs, "target_pos", 0, np.int64),
        doc_hash=text("doc_hash"),
        acc=_column(docs, "acc", np.nan, np.float64),
        acc_norm=_column(docs, "acc_norm", np.nan, np.float64),
        words=_column(docs, "words", -1, np.int64),
        n_bytes=_column(docs, "n_bytes", -1, np.int64),
        uncond_logprob=uncond,
    )


def _conditional(n_ll: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Which of a doc's ``n_ll`` requests are conditional: ``acc_mutual_info`` sends each doc's ``n`` choices after
    its context, then the same ``n`` after an empty one."""
    within = np.arange(int(n_ll.sum())) - np.repeat(np.cumsum(n_ll) - n_ll, n_ll)  # each request's place in its doc
    return within < np.repeat(n, n_ll)


def padded(values: np.ndarray, n: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Flat per-request values as a ``[docs, max n]`` matrix, padded with ``fill``."""
    width = int(n.max(initial=1))
    out = np.full((len(n), width), fill, dtype=np.float64)
    rows = np.repeat(np.arange(len(n)), n)
    cols = np.arange(len(values)) - np.repeat(np.cumsum(n) - n, n)
    out[rows, cols] = values
    return out


def gold_indices(samples: TaskSamples) -> tuple[np.ndarray, int]:
    """Each doc's gold choice, as lm-eval's ``process_results`` resolves ``target``, and how many were ambiguous.

    lm-eval writes ``target`` as a string. An integer target is the choice's index; a text target is the choice
    whose text it is. A target that could be both (a choice reads "2") is settled by the per-doc ``acc`` the
    file holds (``acc`` is 1 exactly when the likeliest choice is gold); still ambiguous, the index wins, as for
    lm-eval's templated targets, and the count is returned.
    """
    ll = padded(samples.logprob, samples.n, -np.inf)
    pred = np.argmax(ll, axis=1)
    gold = np.full(len(samples.n), -1, dtype=np.int64)
    ambiguous = 0
    for i, target in enumerate(samples.target):
        as_index = int(target) if target is not None and target.isdigit() and int(target) < samples.n[i] else -1
        as_text = int(samples.target_pos[i]) - 1
        if as_index >= 0 and as_text >= 0 and as_index != as_text:
            acc = samples.acc[i]
            fits = [g for g in (as_index, as_text) if not np.isnan(acc) and (pred[i] == g) == (acc == 1.0)]
            ambiguous += len(fits) != 1
            gold[i] = fits[0] if len(fits) == 1 else as_index
        else:
            gold[i] = as_index if as_index >= 0 else as_text
        if gold[i] < 0:
            raise ResultFileError(
                f"{samples.file}:{int(samples.line[i])}: target {target!r} is neither a choice index nor one of the "
                f"{int(samples.n[i])} choices",
                path=samples.file,
            )
    return gold, ambiguous
