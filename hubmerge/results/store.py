"""The results store: every (model, task, example, choice) log-likelihood and every prediction, in one DuckDB file.

Keys (:mod:`hubmerge.results.keys`). A model is its content: the sha256 of its weight files' sha256s, so one
revision reached under two names is one model and is scored once; names map to keys in ``model_names``. A task is
its name and the hash of its examples, so edited data is never mixed with old scores. The big tables refer to
models and tasks by small integer ids: rows stay ~20 bytes before compression.

Writes. :meth:`ResultsStore.add_logliks` commits each batch in one transaction, together with the predictions
of every example the batch completes, so a run killed at any moment loses at most its current batch, and
:meth:`ResultsStore.done_docs` tells the next run what to skip. Predictions are derived here, with
:mod:`hubmerge.results.scores`, not by callers, so a stored prediction always agrees with the stored
log-likelihoods.

Why DuckDB rather than SQLite: ``benchmarks/store_scale.py`` on 20M log-likelihood rows (200 models x 10 tasks x
2,500 examples x 4 choices, synthetic; SQLite through the stdlib with the same integer schema, clustered primary
keys, a covering index for per-task scores and WAL; a shared 2-core machine, two runs):

    ======================================  ===========  ===========
    seconds unless noted                    DuckDB       SQLite
    ======================================  ===========  ===========
    insert 20M rows + predictions           68 - 87      75 - 82
    file size                               202 MB       738 MB
    scores() for one task                   0.06         0.06
    scores() for every (model, task)        0.10         0.74
    ensemble of 10 models, one task         0.09         0.10 - 0.19
    done_docs(model, task)                  0.03         0.002
    export one task (2M rows), CSV          1.4 - 2.5    6.0 - 7.5
    export all 20M rows, Parquet            11           (no writer)
    ======================================  ===========  ===========

(DuckDB figures include opening the file, as ``hubmerge results`` does.) Writing is a draw and point lookups are
fast enough either way; what decides is that the columnar file is 3.6x smaller (~10 bytes a loglik row), whole-store
aggregates and exports are 4-8x faster, and Parquet export is native. The price is concurrency: DuckDB lets one
process at a time hold the file, readers included, where SQLite's WAL lets readers in beside a writer. The store
therefore opens the file for each operation and closes it after (~80 ms a batch at 20M rows, against ~40 ms with the
file held; ``with store:`` holds it for a block), so ``hubmerge results`` can read between a running evaluation's
batches, and an operation that finds the file held waits for it (``wait`` seconds) instead of failing. Exactly one
process writes: the evaluation driver (Ray workers send their scores to it). No secondary indexes: rows arrive
grouped by (model, task), so DuckDB's per-row-group min/max statistics skip everything else.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from hubmerge.errors import DocumentClashError, OutputError, ScoresError, StoreError
from hubmerge.io.env import results_dir
from hubmerge.results import scores as ens
from hubmerge.results.keys import model_key, task_key

if TYPE_CHECKING:
    from duckdb import DuckDBPyConnection

SCHEMA_VERSION = 3
# Read-only opens (``hubmerge results``) accept stores this old unupgraded: version 2 lacks only ``tasks.metrics``,
# which reads as NULL ("unknown"), so a store nobody has written to since the upgrade still shows its scores.
READABLE_FROM = 2
RESULTS_FILE = "results.duckdb"
KINDS = ("multiple_choice", "minimal_pairs", "cloze", "perplexity")
LOGLIK_COLUMNS = ("model_key", "task_key", "doc_id", "choice", "logprob", "is_greedy", "n_tokens")
EXPORT_TABLES = ("scores", "predictions", "logliks")
EXPORT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "jsonl"}

_SCHEMA = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE models (
    model_id INTEGER PRIMARY KEY, model_key VARCHAR UNIQUE NOT NULL, label VARCHAR, repo VARCHAR,
    revision VARCHAR, "commit" VARCHAR, path VARCHAR, weight_hashes VARCHAR[], step BIGINT);
CREATE TABLE model_names (name VARCHAR NOT NULL, model_key VARCHAR NOT NULL, PRIMARY KEY (name, model_key));
CREATE TABLE tasks (
    task_id INTEGER PRIMARY KEY, task_key VARCHAR UNIQUE NOT NULL, name VARCHAR NOT NULL, kind VARCHAR NOT NULL,
    data_hash VARCHAR NOT NULL, source VARCHAR, n_examples INTEGER, metrics VARCHAR[]);
CREATE TABLE docs (
    task_id INTEGER, doc_id INTEGER, gold INTEGER, n_choices INTEGER, words INTEGER, bytes BIGINT, doc_hash VARCHAR);
CREATE TABLE choices (task_id INTEGER, doc_id INTEGER, choice INTEGER, chars INTEGER);
CREATE TABLE logliks (
    model_id INTEGER, task_id INTEGER, doc_id INTEGER, choice INTEGER, logprob DOUBLE, is_greedy BOOLEAN,
    n_tokens INTEGER);
CREATE TABLE predictions (
    model_id INTEGER, task_id INTEGER, doc_id INTEGER, gold INTEGER, pred INTEGER, pred_norm INTEGER,
    correct BOOLEAN, correct_norm BOOLEAN);
CREATE TABLE imports (
    model_id INTEGER, task_id INTEGER, tool VARCHAR, tool_version VARCHAR, file VARCHAR, date VARCHAR, filter VARCHAR,
    rows BIGINT, keyed_by VARCHAR, PRIMARY KEY (model_id, task_id));
CREATE TABLE task_groups (group_name VARCHAR NOT NULL, task_name VARCHAR NOT NULL, PRIMARY KEY (group_name, task_name));
CREATE TABLE unconditional (model_id INTEGER, task_id INTEGER, doc_id INTEGER, choice INTEGER, logprob DOUBLE);
"""


def _v1_to_v2(con: DuckDBPyConnection) -> None:
    """Version 2 records where imported rows came from, lm-eval's task groups, each document's hash, and the
    unconditional log-likelihoods ``acc_mutual_info`` divides by."""
    con.execute("ALTER TABLE docs ADD COLUMN IF NOT EXISTS doc_hash VARCHAR")
    con.execute(
        "CREATE TABLE IF NOT EXISTS imports (model_id INTEGER, task_id INTEGER, tool VARCHAR, tool_version VARCHAR, "
        "file VARCHAR, date VARCHAR, filter VARCHAR, rows BIGINT, keyed_by VARCHAR, PRIMARY KEY (model_id, task_id))"
    )
    con.execute(
        "CREATE TABLE IF NOT EXISTS task_groups (group_name VARCHAR NOT NULL, task_name VARCHAR NOT NULL, "
        "PRIMARY KEY (group_name, task_name))"
    )
    con.execute(
        "CREATE TABLE IF NOT EXISTS unconditional (model_id INTEGER, task_id INTEGER, doc_id INTEGER, choice INTEGER, "
        "logprob DOUBLE)"
    )


def _v2_to_v3(con: DuckDBPyConnection) -> None:
    """Version 3 records the metrics each task defines (``tasks.metrics``), so ``scores()`` reports exactly those
    (WinoGrande: ``acc`` only). Tasks stored before stay NULL, "unknown": every metric computed is kept until the
    task is registered again."""
    con.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS metrics VARCHAR[]")


# Upgrades of older stores: _MIGRATIONS[v] turns schema version v into v + 1 inside the open transaction.
_MIGRATIONS: dict[int, Any] = {1: _v1_to_v2, 2: _v2_to_v3}


def default_results_dir() -> Path:
    """``$HUBMERGE_RESULTS`` or ``./hubmerge-results``."""
    return results_dir()


def store_path(where: str | Path | None = None) -> Path:
    """The database file for a results folder (``<dir>/results.duckdb``) or an explicit ``.duckdb`` file."""
    where = Path(where) if where is not None else default_results_dir()
    return where if where.suffix == ".duckdb" else where / RESULTS_FILE


# ---------------------------------------------------------------------------------------------------- rows


class LoglikRow(NamedTuple):
    model_key: str
    task_key: str
    doc_id: int
    choice: int
    logprob: float
    is_greedy: bool
    n_tokens: int


def loglik_rows(model_key: str, task_key: str, requests: Sequence[Any], results: Sequence[Any]) -> dict[str, Any]:
    """Columns for :meth:`ResultsStore.add_logliks` from scoring's output.

    ``requests`` are ``tasks.Request`` objects (or ``(doc_id, choice)`` pairs); ``results`` are
    ``scoring.LogLikelihood`` objects, or ``(logprob, n_tokens)`` pairs from rolling log-likelihoods.
    """
    if len(requests) != len(results):
        raise StoreError(f"{len(requests)} requests but {len(results)} results for {task_key}")
    keys = [(r.doc_id, r.choice) if hasattr(r, "doc_id") else tuple(r) for r in requests]
    if results and hasattr(results[0], "logprob"):
        vals = [(r.logprob, bool(r.is_greedy), r.n_tokens) for r in results]
    else:
        vals = [(float(lp), False, int(n)) for lp, n in results]
    return {
        "model_key": model_key,
        "task_key": task_key,
        "doc_id": np.array([k[0] for k in keys], dtype=np.int32),
        "choice": np.array([k[1] for k in keys], dtype=np.int32),
        "logprob": np.array([v[0] for v in vals], dtype=np.float64),
        "is_greedy": np.array([v[1] for v in vals], dtype=bool),
        "n_tokens": np.array([v[2] for v in vals], dtype=np.int32),
    }


def _columns(rows: Mapping[str, Any] | Iterable[Sequence[Any]]) -> dict[str, np.ndarray]:
    if isinstance(rows, Mapping):
        missing = [c for c in LOGLIK_COLUMNS if c not in rows]
        if missing:
            raise StoreError(f"log-likelihood rows lack column(s) {', '.join(missing)}")
        cols = dict(rows)
    else:
        rows = list(rows)
        if not rows:
            return {}
        if any(len(r) != len(LOGLIK_COLUMNS) for r in rows):
            raise StoreError(f"a log-likelihood row must have the fields {', '.join(LOGLIK_COLUMNS)}")
        cols = dict(zip(LOGLIK_COLUMNS, zip(*rows, strict=True), strict=True))
    n = len(cols["doc_id"])
    out = {
        "doc_id": np.asarray(cols["doc_id"], dtype=np.int32),
        "choice": np.asarray(cols["choice"], dtype=np.int32),
        "logprob": np.asarray(cols["logprob"], dtype=np.float64),
        "is_greedy": np.asarray(cols["is_greedy"], dtype=bool),
        "n_tokens": np.asarray(cols["n_tokens"], dtype=np.int32),
    }
    for k in ("model_key", "task_key"):
        v = cols[k]
        out[k] = np.full(n, v, dtype=object) if isinstance(v, str) else np.asarray(v, dtype=object)
    if any(len(v) != n for v in out.values()):
        raise StoreError("log-likelihood columns have different lengths")
    return out


# ---------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Score:
    """One (model, task) line of ``hubmerge results``; metrics that do not apply to the task's kind are None."""

    model_key: str
    model: str
    step: int | None
    task: str
    task_key: str
    kind: str
    n: int
    n_examples: int
    acc: float | None = None
    acc_norm: float | None = None
    acc_mutual_info: float | None = None  # multiple choice with unconditional log-likelihoods stored
    perplexity: float | None = None
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    bits_per_byte: float | None = None
    # The metrics the task defines (its YAML's, or those the lm-eval file reports); None: unknown (a task stored
    # before stores recorded them), and every metric computed is shown. Metrics outside it are None above.
    metrics: tuple[str, ...] | None = None


# The metric fields of a Score, in the order tables show them.
SCORE_METRICS = (
    "acc",
    "acc_norm",
    "acc_mutual_info",
    "perplexity",
    "word_perplexity",
    "byte_perplexity",
    "bits_per_byte",
)

_SCORE_TYPES = {
    "model_key": "VARCHAR",
    "model": "VARCHAR",
    "step": "BIGINT",
    "task": "VARCHAR",
    "task_key": "VARCHAR",
    "kind": "VARCHAR",
    "n": "BIGINT",
    "n_examples": "BIGINT",
    "acc": "DOUBLE",
    "acc_norm": "DOUBLE",
    "acc_mutual_info": "DOUBLE",
    "perplexity": "DOUBLE",
    "word_perplexity": "DOUBLE",
    "byte_perplexity": "DOUBLE",
    "bits_per_byte": "DOUBLE",
}


class ChoiceMatrix(NamedTuple):
    doc_ids: np.ndarray  # [n] examples every choice of which is stored
    ll: np.ndarray  # [n, c] log-likelihoods, NaN past an example's last choice
    chars: np.ndarray  # [n, c] choice lengths in characters
    gold: np.ndarray  # [n]


@dataclass
class TaskArrays:
    """A task's examples as arrays, for turning loglik rows into matrices without a join."""

    task_id: int
    key: str
    name: str
    kind: str
    doc_ids: np.ndarray  # sorted
    gold: np.ndarray
    n_choices: np.ndarray
    chars: np.ndarray  # [n_docs, max_choices]

    def positions(self, doc_ids: np.ndarray, choices: np.ndarray) -> np.ndarray:
        if len(self.doc_ids) == 0:
            raise StoreError(f"{self.key}: the task has no registered examples")
        pos = np.searchsorted(self.doc_ids, doc_ids)
        pos_ok = np.minimum(pos, len(self.doc_ids) - 1)
        bad = (pos >= len(self.doc_ids)) | (self.doc_ids[pos_ok] != doc_ids)
        bad |= (choices < 0) | (choices >= self.n_choices[pos_ok])
        if bad.any():
            i = int(np.argmax(bad))
            raise StoreError(
                f"{self.key}: example {int(doc_ids[i])} choice {int(choices[i])} is not part of the task as "
                "registered; register the task data the requests were built from"
            )
        return pos

    def assemble(self, doc_ids: np.ndarray, choices: np.ndarray, *values: np.ndarray) -> tuple[np.ndarray, ...]:
        """(doc positions, matrices...) for the examples whose every choice is present, in doc order."""
        pos = self.positions(doc_ids, choices)
        width = self.chars.shape[1]
        count = np.bincount(pos, minlength=len(self.doc_ids))
        complete = np.flatnonzero(count == self.n_choices)
        mats = []
        for v in values:
            m = np.full((len(self.doc_ids), width), np.nan if v.dtype.kind == "f" else 0, dtype=v.dtype)
            m[pos, choices] = v
            mats.append(m[complete])
        return (complete, *mats)


_ROW_DTYPES = {"doc_id": np.int32, "choice": np.int32, "logprob": np.float64, "is_greedy": bool, "n_tokens": np.int32}
_ROW_COLUMNS = tuple(_ROW_DTYPES)
_IMPORT_TEXT = ("tool", "tool_version", "file", "date", "filter", "keyed_by")


def _refuse_nan(cols: Mapping[str, np.ndarray], pair: bool = False) -> None:
    """``pair``: the key columns hold one value, the pair's."""
    nan = np.isnan(cols["logprob"])
    if nan.any():
        i = int(np.argmax(nan))
        k = 0 if pair else i
        raise ScoresError(
            f"NaN log-likelihood for {cols['task_key'][k]} example {cols['doc_id'][i]} choice {cols['choice'][i]} "
            f"(model {str(cols['model_key'][k])[:12]}); nothing stored from this batch. Scoring overflowed: "
            "evaluate in float32"
        )


class Checkpointed(Protocol):
    """What the store records of a checkpoint."""

    @property
    def label(self) -> str: ...
    @property
    def weight_hashes(self) -> Sequence[str]: ...
    @property
    def repo(self) -> str | None: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def commit(self) -> str | None: ...
    @property
    def path(self) -> str | Path | None: ...
    @property
    def step(self) -> int | None: ...


def _ids_sql(column: str, ids: Iterable[int] | None) -> str:
    """A filter on our own integer ids (never user text), inlined so DuckDB can skip row groups by min/max."""
    if ids is None:
        return "TRUE"
    ids = sorted({int(i) for i in ids})
    return f"{column} IN ({', '.join(map(str, ids))})" if ids else "FALSE"


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


class ResultsStore:
    """The DuckDB results store of one results folder. See the module docstring for the design.

    ``ResultsStore(path)`` opens (creating if needed) ``path`` when it ends in ``.duckdb``, else
    ``path/results.duckdb``; ``None`` means :func:`default_results_dir`. Use ``with store:`` to keep the file
    open across many calls; otherwise each call opens and closes it.
    """

    def __init__(self, path: str | Path | None = None, *, read_only: bool = False, wait: float = 60.0) -> None:
        self.path = store_path(path)
        self.read_only = read_only
        self.wait = wait
        self._con: Any = None
        self._depth = 0
        self._in_transaction = False
        self._checked = False
        self._task_metrics = True  # the tasks table has its metrics column (false: a version-2 store read as is)
        self._tasks: dict[int, TaskArrays] = {}
        if read_only and not self.path.is_file():
            raise StoreError(f"no results store at {self.path}; run `hubmerge eval` first or point at another folder")

    # -- connection -----------------------------------------------------------------------------------------

    def __enter__(self) -> ResultsStore:
        if self._depth == 0:
            self._con = self._connect()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        self._depth = 0

    def _connect(self) -> Any:
        import duckdb

        if not self.read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.path.parent}: cannot create the results folder ({e.strerror})") from e
        deadline = time.monotonic() + self.wait
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=self.read_only)
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise StoreError(f"{self.path}: cannot open the results store ({e})") from e
                if time.monotonic() >= deadline:
                    holder = re.search(r"PID \d+", str(e))
                    raise StoreError(
                        f"{self.path}: the results store is in use by another process"
                        f"{f' ({holder.group(0)})' if holder else ''} and stayed busy for {self.wait:.0f} s; "
                        "try again when it finishes, or use another results folder"
                    ) from e
                time.sleep(0.05)
            except duckdb.Error as e:
                raise StoreError(f"{self.path}: not a readable DuckDB results store ({e})") from e
        try:
            if not self._checked:
                self._check_schema(con)
                self._checked = True
        except BaseException:
            con.close()
            raise
        return con

    @contextmanager
    def _db(self) -> Iterator[Any]:
        if self._con is not None:
            yield self._con
            return
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[ResultsStore]:
        """Every write in the block commits together, or none does (an import of one folder is one transaction)."""
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only; nothing can be written")
        with self:
            if self._in_transaction:
                yield self
                return
            self._con.begin()
            self._in_transaction = True
            try:
                yield self
            except BaseException:
                self._con.rollback()
                self._tasks.clear()  # tasks registered in the rolled-back block are gone
                raise
            else:
                self._con.commit()
            finally:
                self._in_transaction = False

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only; nothing can be written")
        if self._in_transaction:  # part of the caller's transaction
            yield self._con
            return
        with self._db() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    def _check_schema(self, con: DuckDBPyConnection) -> None:
        tables = {
            r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()
        }
        if not tables:
            if self.read_only:
                raise StoreError(f"{self.path}: empty database, not a hubmerge results store")
            con.begin()
            con.execute(_SCHEMA)
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            con.commit()
            return
        if "meta" not in tables:
            raise StoreError(f"{self.path}: a DuckDB file but not a hubmerge results store (no meta table)")
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        version = int(row[0][0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer hubmerge (results schema {version}, this one reads up to "
                f"{SCHEMA_VERSION}); upgrade hubmerge, or use another results folder"
            )
        if version == SCHEMA_VERSION:
            return
        if self.read_only and version >= READABLE_FROM:
            self._task_metrics = False  # read as it is: no task's metrics are known
            return
        if self.read_only:
            raise StoreError(
                f"{self.path}: results schema {version} is older than {READABLE_FROM}; run any writing command "
                "(e.g. `hubmerge eval`) once to upgrade it"
            )
        missing = [v for v in range(version, SCHEMA_VERSION) if v not in _MIGRATIONS]
        if missing:
            raise StoreError(f"{self.path}: no upgrade from results schema {missing[0]}; use another results folder")
        con.begin()
        try:
            for v in range(version, SCHEMA_VERSION):
                _MIGRATIONS[v](con)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        except BaseException:
            con.rollback()
            raise
        con.commit()

    # -- registration ---------------------------------------------------------------------------------------

    def register_checkpoint(self, ckpt: Checkpointed) -> str:
        """:meth:`register_model` of anything that says which checkpoint it is (an eval target, an imported run)."""
        return self.register_model(
            ckpt.weight_hashes,
            name=ckpt.label,
            repo=ckpt.repo,
            revision=ckpt.revision,
            commit=ckpt.commit,
            path=ckpt.path,
            step=ckpt.step,
        )

    def register_model(
        self,
        weight_hashes: Sequence[str],
        *,
        name: str,
        repo: str | None = None,
        revision: str | None = None,
        commit: str | None = None,
        path: str | Path | None = None,
        step: int | None = None,
    ) -> str:
        """Record a model under ``name``; returns its content key. Known weights keep their first record, and learn
        what it lacked: a folder scored first, then imported from the Hub, gains its repo, revision and step."""
        key = model_key(weight_hashes)
        with self._transaction() as con:
            if con.execute("SELECT 1 FROM models WHERE model_key = ?", [key]).fetchall():
                con.execute(
                    'UPDATE models SET repo = coalesce(repo, ?), revision = coalesce(revision, ?), "commit" = '
                    'coalesce("commit", ?), path = coalesce(path, ?), step = coalesce(step, ?) WHERE model_key = ?',
                    [repo, revision, commit, None if path is None else str(path), step, key],
                )
            else:
                (new_id,) = con.execute("SELECT coalesce(max(model_id), 0) + 1 FROM models").fetchall()[0]
                con.execute(
                    "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        new_id,
                        key,
                        name,
                        repo,
                        revision,
                        commit,
                        None if path is None else str(path),
                        sorted(weight_hashes),
                        step,
                    ],
                )
            con.execute("INSERT OR IGNORE INTO model_names VALUES (?, ?)", [name, key])
        return key

    def register_task(self, task: Any) -> str:
        """Record a task's examples (an evaluation ``TaskData``); returns its key. Re-registering adds new examples.

        Typed loosely on purpose: the store sits below the evaluation engine and reads only ``spec``, ``examples``,
        ``data_hash`` and ``source``; ``spec.metric_names`` (what the definition reports) is recorded as the task's
        metrics, so ``scores()`` shows no metric the task does not define.
        """
        spec = task.spec
        n_choices, chars, words, n_bytes = [], [], [], []
        for ex in task.examples:
            n = 1 if spec.kind == "perplexity" else len(ex.requests)
            if n == 0:
                raise StoreError(f"task {spec.name}: example {ex.doc_id} has no requests to score")
            # lm-eval counts a text's words and bytes where Example.count_text says (wikitext: before detokenising)
            count = getattr(ex, "count_text", None)
            text = (count if count is not None else ex.text or "") if spec.kind == "perplexity" else ""
            n_choices.append(n)
            counted = getattr(ex, "counts", None)  # (words, bytes) a task's own code counted (lm-eval's)
            words.append(counted[0] if counted else ens.count_words(text) if text else 0)
            n_bytes.append(counted[1] if counted else ens.count_bytes(text))
            chars += [len(ex.choices[c]) if c < len(ex.choices) else 0 for c in range(n)]
        return self.register_task_arrays(
            spec.name,
            spec.kind,
            task.data_hash,
            str(getattr(task, "source", "")),
            doc_ids=[ex.doc_id for ex in task.examples],
            gold=[ex.gold for ex in task.examples],
            n_choices=n_choices,
            chars=chars,
            words=words,
            n_bytes=n_bytes,
            doc_hashes=getattr(task, "doc_hashes", None),
            metrics=getattr(spec, "metric_names", None),
        )

    def register_task_arrays(
        self,
        name: str,
        kind: str,
        data_hash: str,
        source: str,
        *,
        doc_ids: Sequence[int] | np.ndarray,
        gold: Sequence[int] | np.ndarray,
        n_choices: Sequence[int] | np.ndarray,
        chars: Sequence[int] | np.ndarray,
        words: Sequence[int] | np.ndarray,
        n_bytes: Sequence[int] | np.ndarray,
        doc_hashes: Sequence[str | None] | None = None,
        metrics: Sequence[str] | None = None,
    ) -> str:
        """Record a task from arrays (one entry per example; ``chars`` one per choice, examples in order).

        Re-registering adds new examples only; an example already stored keeps its record. ``metrics``: the metric
        names the task defines (``acc``, ``acc_norm``, ...); the latest registration that gives them wins, and
        None (unknown) keeps what is recorded.
        """
        if kind not in KINDS:
            raise StoreError(f"task {name}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        key = task_key(name, data_hash)
        new_docs: dict[str, Any] = {
            k: np.asarray(v, dtype=np.int64)
            for k, v in (
                ("doc_id", doc_ids),
                ("gold", gold),
                ("n_choices", n_choices),
                ("words", words),
                ("bytes", n_bytes),
            )
        }
        count = new_docs["n_choices"]
        if len(np.unique(new_docs["doc_id"])) != len(new_docs["doc_id"]):
            raise StoreError(f"task {name}: duplicate doc_id among its examples")
        chars_arr = np.asarray(chars, dtype=np.int64)
        if len(chars_arr) != int(count.sum()):
            raise StoreError(f"task {name}: {len(chars_arr)} choice lengths for {int(count.sum())} choices")
        new_docs["doc_hash"] = np.asarray(
            list(doc_hashes) if doc_hashes is not None else [None] * len(count), dtype=object
        )
        starts = np.repeat(np.cumsum(count) - count, count)
        new_choices = {
            "doc_id": np.repeat(new_docs["doc_id"], count),
            "choice": np.arange(len(chars_arr), dtype=np.int64) - starts,
            "chars": chars_arr,
        }
        with self._transaction() as con:
            row = con.execute("SELECT task_id FROM tasks WHERE task_key = ?", [key]).fetchall()
            names = None if metrics is None else [str(m) for m in metrics]
            if row:
                task_id = row[0][0]
                if names is not None:
                    con.execute("UPDATE tasks SET metrics = ? WHERE task_id = ?", [names, task_id])
            else:
                (task_id,) = con.execute("SELECT coalesce(max(task_id), 0) + 1 FROM tasks").fetchall()[0]
                con.execute(
                    "INSERT INTO tasks (task_id, task_key, name, kind, data_hash, source, n_examples, metrics) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                    [task_id, key, name, kind, data_hash, source, names],
                )
            con.register("new_docs", new_docs)
            con.register("new_choices", new_choices)
            try:
                clash = con.execute(
                    "SELECT n.doc_id, d.doc_hash, n.doc_hash FROM new_docs n JOIN docs d ON d.doc_id = n.doc_id "
                    "WHERE d.task_id = ? AND d.doc_hash <> n.doc_hash ORDER BY n.doc_id LIMIT 1",
                    [task_id],
                ).fetchall()
                if clash:
                    doc, stored, new = clash[0]
                    raise DocumentClashError(
                        f"task {name}: example {doc} is another document than the one stored under the same task "
                        f"(doc_hash {str(new)[:12]} vs {str(stored)[:12]}): its data changed since it was stored in "
                        f"{self.path}; use another results folder",
                        doc_id=int(doc),
                        stored=str(stored),
                        new=str(new),
                    )
                con.execute(
                    "INSERT INTO docs (task_id, doc_id, gold, n_choices, words, bytes, doc_hash) "
                    "SELECT ?, n.doc_id, n.gold, n.n_choices, n.words, n.bytes, n.doc_hash FROM new_docs n "
                    "WHERE n.doc_id NOT IN (SELECT doc_id FROM docs WHERE task_id = ?)",
                    [task_id, task_id],
                )
                con.execute(
                    "INSERT INTO choices (task_id, doc_id, choice, chars) SELECT ?, n.doc_id, n.choice, n.chars "
                    "FROM new_choices n WHERE n.doc_id NOT IN (SELECT doc_id FROM choices WHERE task_id = ?)",
                    [task_id, task_id],
                )
            finally:
                con.unregister("new_docs")
                con.unregister("new_choices")
            con.execute(
                "UPDATE tasks SET n_examples = (SELECT count(*) FROM docs WHERE task_id = ?) WHERE task_id = ?",
                [task_id, task_id],
            )
        self._tasks.pop(task_id, None)
        return key

    def doc_hashes(self, task_key: str) -> dict[int, str]:
        """The stored hash of each example of a task that has one (imports record lm-eval's ``doc_hash``)."""
        with self._db() as con:
            rows = con.execute(
                "SELECT d.doc_id, d.doc_hash FROM docs d JOIN tasks t USING (task_id) "
                "WHERE t.task_key = ? AND d.doc_hash IS NOT NULL",
                [task_key],
            ).fetchall()
        return {int(d): str(h) for d, h in rows}

    # -- imports and groups ------------------------------------------------------------------------------------

    def import_record(self, model_key: str, task_key: str) -> dict[str, Any] | None:
        """Where the stored scores of (model, task) came from, when they were imported; None otherwise."""
        return self.import_records().get((model_key, task_key))

    def imports(self) -> list[dict[str, Any]]:
        """Every import record, with model and task names."""
        with self._db() as con:
            rows = con.execute(
                "SELECT m.model_key, m.label, t.task_key, t.name, i.tool, i.tool_version, i.file, i.date, i.filter, "
                "i.rows, i.keyed_by FROM imports i JOIN models m USING (model_id) JOIN tasks t USING (task_id) "
                "ORDER BY t.name, m.step NULLS LAST, m.label"
            ).fetchall()
        cols = ("model_key", "model", "task_key", "task", "tool", "tool_version", "file", "date", "filter", "rows")
        return [dict(zip((*cols, "keyed_by"), r, strict=True)) for r in rows]

    def import_records(self) -> dict[tuple[str, str], dict[str, Any]]:
        """``{(model_key, task_key): record}`` of every import, in one query (an import checks hundreds of pairs)."""
        with self._db() as con:
            rows = con.execute(
                "SELECT m.model_key, t.task_key, i.tool, i.tool_version, i.file, i.date, i.filter, i.rows, i.keyed_by "
                "FROM imports i JOIN models m USING (model_id) JOIN tasks t USING (task_id)"
            ).fetchall()
        cols = ("tool", "tool_version", "file", "date", "filter", "rows", "keyed_by")
        return {(r[0], r[1]): dict(zip(cols, r[2:], strict=True)) for r in rows}

    def record_imports(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Remember where each (model, task)'s scores came from, replacing earlier imports of the pair, in one
        statement. Each record: ``model_key``, ``task_key``, ``tool``, ``tool_version``, ``file``, ``date``,
        ``filter``, ``rows``, ``keyed_by``."""
        if not records:
            return
        with self._transaction() as con:
            model_ids = self._ids_of(con, "models", "model", [r["model_key"] for r in records])
            task_ids = self._ids_of(con, "tasks", "task", [r["task_key"] for r in records])
            for r in records:
                if r["model_key"] not in model_ids or r["task_key"] not in task_ids:
                    raise StoreError(
                        f"model {r['model_key'][:12]} or task {r['task_key']} is not registered in {self.path}"
                    )
            new = {
                "model_id": np.asarray([model_ids[r["model_key"]] for r in records], dtype=np.int32),
                "task_id": np.asarray([task_ids[r["task_key"]] for r in records], dtype=np.int32),
                **{k: np.asarray([r[k] for r in records], dtype=object) for k in _IMPORT_TEXT},
                "rows": np.asarray([int(r["rows"]) for r in records], dtype=np.int64),
            }
            con.register("new_imports", new)
            try:
                con.execute(
                    "INSERT OR REPLACE INTO imports SELECT model_id, task_id, tool, tool_version, file, date, filter, "
                    "rows, keyed_by FROM new_imports"
                )
            finally:
                con.unregister("new_imports")

    def remove_scores(self, model_key: str, task_key: str) -> None:
        """Forget every stored log-likelihood and prediction of (model, task): a newer import replaces them."""
        with self._transaction() as con:
            pair = self._resolve_pair(con, model_key, task_key)
            if pair is None:
                return
            model_id, task = pair
            for table in ("logliks", "unconditional", "predictions", "imports"):
                con.execute(f"DELETE FROM {table} WHERE model_id = ? AND task_id = ?", [model_id, task.task_id])

    def add_task_group(self, group: str, members: Iterable[str]) -> None:
        """Record that task names ``members`` form lm-eval's group ``group`` (tables show it pooled)."""
        with self._transaction() as con:
            for member in sorted(set(members)):
                con.execute("INSERT OR IGNORE INTO task_groups VALUES (?, ?)", [group, member])

    def task_groups(self) -> dict[str, list[str]]:
        """Group name -> its member task names, as imports recorded them."""
        with self._db() as con:
            rows = con.execute("SELECT group_name, task_name FROM task_groups ORDER BY 1, 2").fetchall()
        out: dict[str, list[str]] = {}
        for group, task in rows:
            out.setdefault(group, []).append(task)
        return out

    # -- lookups --------------------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """Every stored model with its names, oldest registration first."""
        with self._db() as con:
            rows = con.execute(
                'SELECT m.model_key, m.label, m.repo, m.revision, m."commit", m.path, m.step, '
                "list(n.name ORDER BY n.name) FROM models m LEFT JOIN model_names n USING (model_key) "
                "GROUP BY ALL ORDER BY min(m.model_id)"
            ).fetchall()
        cols = ("model_key", "label", "repo", "revision", "commit", "path", "step", "names")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def tasks(self) -> list[dict[str, Any]]:
        """Every stored task (name, kind, key, data hash, source, number of examples, the metrics it defines or
        None where unknown)."""
        with self._db() as con:
            rows = con.execute(
                f"SELECT task_key, name, kind, data_hash, source, n_examples, {self._metrics_sql} FROM tasks "
                "ORDER BY name, task_id"
            ).fetchall()
        cols = ("task_key", "name", "kind", "data_hash", "source", "n_examples", "metrics")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    @property
    def _metrics_sql(self) -> str:
        """The tasks' metrics column, or NULL in a version-2 store read as it is."""
        return "metrics" if self._task_metrics else "NULL::VARCHAR[] AS metrics"

    def _model_ids(self, con: DuckDBPyConnection, refs: Iterable[str], *, one: bool = False) -> list[int]:
        """Model ids for content keys or names (a name may have been given to several contents over time)."""
        out: list[int] = []
        for ref in refs:
            rows = con.execute(
                "SELECT DISTINCT m.model_id FROM models m LEFT JOIN model_names n USING (model_key) "
                "WHERE m.model_key = ? OR n.name = ? ORDER BY 1",
                [ref, ref],
            ).fetchall()
            if not rows:
                raise StoreError(f"{self.path}: no model {ref!r} in the results store (neither a model key nor a name)")
            if one and len(rows) > 1:
                raise StoreError(f"{ref!r} names {len(rows)} different models in the store; use a model key")
            out.extend(r[0] for r in rows)
        return out

    def _task_ids(self, con: DuckDBPyConnection, refs: Iterable[str]) -> list[int]:
        out: list[int] = []
        for ref in refs:
            rows = con.execute(
                "SELECT task_id FROM tasks WHERE task_key = ? OR name = ? ORDER BY 1", [ref, ref]
            ).fetchall()
            if not rows:
                raise StoreError(f"{self.path}: no task {ref!r} in the results store")
            out.extend(r[0] for r in rows)
        return out

    def _task(self, con: DuckDBPyConnection, task_id: int) -> TaskArrays:
        if task_id not in self._tasks:
            key, name, kind = con.execute(
                "SELECT task_key, name, kind FROM tasks WHERE task_id = ?", [task_id]
            ).fetchall()[0]
            d = con.execute(
                "SELECT doc_id, gold, n_choices FROM docs WHERE task_id = ? ORDER BY doc_id", [task_id]
            ).fetchnumpy()
            c = con.execute("SELECT doc_id, choice, chars FROM choices WHERE task_id = ?", [task_id]).fetchnumpy()
            n_choices = d["n_choices"].astype(np.int64)
            doc_ids = d["doc_id"].astype(np.int64)
            chars = np.zeros((len(doc_ids), int(n_choices.max(initial=1))), dtype=np.int64)
            chars[np.searchsorted(doc_ids, c["doc_id"]), c["choice"]] = c["chars"]
            self._tasks[task_id] = TaskArrays(
                task_id, key, name, kind, doc_ids, d["gold"].astype(np.int64), n_choices, chars
            )
        return self._tasks[task_id]

    def _resolve_pair(self, con: DuckDBPyConnection, model: str, task: str) -> tuple[int, TaskArrays] | None:
        m = con.execute("SELECT model_id FROM models WHERE model_key = ?", [model]).fetchall()
        t = con.execute("SELECT task_id FROM tasks WHERE task_key = ?", [task]).fetchall()
        return (m[0][0], self._task(con, t[0][0])) if m and t else None

    # -- writing scores ---------------------------------------------------------------------------------------

    def done_docs(self, model_key: str, task_key: str, *, unconditional: bool = False) -> set[int]:
        """Examples of the task whose every choice is stored for the model: what a run can skip. ``unconditional``:
        those whose every unconditional log-likelihood is stored (``acc_mutual_info`` needs both)."""
        table = "unconditional" if unconditional else "logliks"
        with self._db() as con:
            pair = self._resolve_pair(con, model_key, task_key)
            if pair is None:
                return set()
            model_id, task = pair
            r = con.execute(
                f"SELECT doc_id, count(*) AS n FROM {table} WHERE model_id = ? AND task_id = ? GROUP BY doc_id",
                [model_id, task.task_id],
            ).fetchnumpy()
        if len(r["doc_id"]) == 0:
            return set()
        pos = np.minimum(np.searchsorted(task.doc_ids, r["doc_id"]), len(task.doc_ids) - 1)
        done = (task.doc_ids[pos] == r["doc_id"]) & (task.n_choices[pos] == r["n"])
        return set(r["doc_id"][done].tolist())

    def add_logliks(self, rows: Mapping[str, Any] | Iterable[Sequence[Any]]) -> int:
        """Store log-likelihood rows and the predictions of the examples they complete, in one transaction.

        ``rows`` is a mapping of columns (see :func:`loglik_rows`; key columns may be single strings) or an
        iterable of :class:`LoglikRow`-shaped tuples. A re-sent (doc, choice) row replaces the stored one.
        Returns the number of rows written.
        """
        cols = _columns(rows)
        if not cols or len(cols["doc_id"]) == 0:
            return 0
        _refuse_nan(cols)
        pairs = sorted(set(zip(cols["model_key"].tolist(), cols["task_key"].tolist(), strict=True)))
        batches = []
        for mkey, tkey in pairs:
            sel = (cols["model_key"] == mkey) & (cols["task_key"] == tkey)
            batches.append((mkey, tkey, {k: cols[k][sel] for k in _ROW_COLUMNS}))
        with self._transaction() as con:
            self._write_logliks(con, batches)
        return len(cols["doc_id"])

    def add_pair_logliks(self, batches: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
        """Many (model, task) pairs' rows at once, each pair as ``(model_key, task_key, columns)`` without key columns.

        An import writes a hundred revisions this way: the pairs the store holds nothing of go in with one INSERT
        of their rows and one of their predictions (computed from the rows given, with no read-back), rather than a
        DELETE, INSERT and read-back each. Returns the number of rows written.
        """
        norm = []
        for mkey, tkey, rows in batches:
            cols = {k: np.asarray(rows[k], dtype=dtype) for k, dtype in _ROW_DTYPES.items()}
            if len({len(v) for v in cols.values()}) != 1:
                raise StoreError(f"log-likelihood columns of {tkey} have different lengths")
            if len(cols["doc_id"]):
                _refuse_nan({**cols, "model_key": np.asarray([mkey]), "task_key": np.asarray([tkey])}, pair=True)
                norm.append((mkey, tkey, cols))
        if len({(m, t) for m, t, _ in norm}) != len(norm):
            raise StoreError("add_pair_logliks: a (model, task) pair is given twice; give each pair's rows once")
        if norm:
            with self._transaction() as con:
                self._write_logliks(con, norm)
        return sum(len(b["doc_id"]) for _, _, b in norm)

    def _write_logliks(self, con: DuckDBPyConnection, batches: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        model_ids = self._ids_of(con, "models", "model", [m for m, _, _ in batches])
        task_ids = self._ids_of(con, "tasks", "task", [t for _, t, _ in batches])
        resolved = []
        for mkey, tkey, batch in batches:
            if mkey not in model_ids or tkey not in task_ids:
                raise StoreError(f"add_logliks: model {mkey[:12]} or task {tkey} is not registered in {self.path}")
            task = self._task(con, task_ids[tkey])
            task.positions(batch["doc_id"], batch["choice"])
            keys = batch["doc_id"].astype(np.int64) * (1 << 20) + batch["choice"]
            if len(np.unique(keys)) != len(keys):
                raise StoreError(f"add_logliks: a (doc_id, choice) appears twice in one batch for {tkey}")
            resolved.append((model_ids[mkey], task, batch))
        held = {
            (int(m), int(t))
            for m, t in con.execute(
                "SELECT DISTINCT model_id, task_id FROM logliks WHERE "
                f"{_ids_sql('task_id', [t.task_id for _, t, _ in resolved])} AND "
                f"{_ids_sql('model_id', [m for m, _, _ in resolved])}"
            ).fetchall()
        }
        fresh = [r for r in resolved if (r[0], r[1].task_id) not in held]
        for model_id, task, batch in resolved:
            if (model_id, task.task_id) in held:
                self._merge_logliks(con, model_id, task, batch)
        if not fresh:
            return
        # Nothing of these pairs is stored: their rows are every row they have, and their predictions follow from them.
        rows = {
            "model_id": np.concatenate([np.full(len(b["doc_id"]), m, dtype=np.int32) for m, _, b in fresh]),
            "task_id": np.concatenate([np.full(len(b["doc_id"]), t.task_id, dtype=np.int32) for _, t, b in fresh]),
            **{k: np.concatenate([b[k] for _, _, b in fresh]) for k in _ROW_COLUMNS},
        }
        made = [
            p
            for m, t, b in fresh
            if (p := self._predictions(m, t, b["doc_id"], b["choice"], b["logprob"], b["is_greedy"])) is not None
        ]
        con.register("batch_rows", rows)
        try:
            con.execute(
                "INSERT INTO logliks SELECT model_id, task_id, doc_id, choice, logprob, is_greedy, n_tokens "
                "FROM batch_rows"
            )
        finally:
            con.unregister("batch_rows")
        if made:
            self._insert_predictions(con, {k: np.concatenate([p[k] for p in made]) for k in made[0]})

    def _ids_of(self, con: DuckDBPyConnection, table: str, kind: str, keys: Iterable[str]) -> dict[str, int]:
        """``{key: id}`` of the given model or task keys that are registered, in one query."""
        rows = con.execute(
            f"SELECT {kind}_key, {kind}_id FROM {table} WHERE {kind}_key IN (SELECT unnest(?::VARCHAR[]))",
            [sorted(set(keys))],
        ).fetchall()
        return {str(k): int(i) for k, i in rows}

    def _merge_logliks(self, con: DuckDBPyConnection, model_id: int, task: TaskArrays, batch: dict[str, Any]) -> None:
        """Rows of a pair the store already holds some of: replace re-sent ones, then re-derive from the store."""
        docs = {"doc_id": np.unique(batch["doc_id"])}
        con.register("batch_rows", batch)
        con.register("batch_docs", docs)
        try:
            where = (
                "model_id = ? AND task_id = ? AND doc_id BETWEEN ? AND ? AND doc_id IN (SELECT doc_id FROM batch_docs)"
            )
            args = [model_id, task.task_id, int(docs["doc_id"][0]), int(docs["doc_id"][-1])]
            con.execute(
                "DELETE FROM logliks USING batch_rows b WHERE logliks.model_id = ? AND logliks.task_id = ? AND "
                "logliks.doc_id BETWEEN ? AND ? AND logliks.doc_id = b.doc_id AND logliks.choice = b.choice",
                args,
            )
            con.execute(
                "INSERT INTO logliks SELECT ?, ?, doc_id, choice, logprob, is_greedy, n_tokens FROM batch_rows",
                [model_id, task.task_id],
            )
            self._derive(con, model_id, task, where, args)
        finally:
            con.unregister("batch_rows")
            con.unregister("batch_docs")

    def add_unconditional(self, rows: Mapping[str, Any]) -> int:
        """Store unconditional log-likelihoods (each choice scored after an empty context), the denominators of
        lm-eval's ``acc_mutual_info``; columns as :func:`loglik_rows` makes them. A re-sent row replaces the stored
        one. Returns the number of rows written."""
        cols = _columns(rows)
        if not cols or len(cols["doc_id"]) == 0:
            return 0
        nan = np.isnan(cols["logprob"])
        if nan.any():
            i = int(np.argmax(nan))
            raise ScoresError(
                f"NaN unconditional log-likelihood for {cols['task_key'][i]} example {cols['doc_id'][i]} choice "
                f"{cols['choice'][i]}; nothing stored from this batch"
            )
        pairs = sorted(set(zip(cols["model_key"].tolist(), cols["task_key"].tolist(), strict=True)))
        with self._transaction() as con:
            for mkey, tkey in pairs:
                pair = self._resolve_pair(con, mkey, tkey)
                if pair is None:
                    raise StoreError(f"add_unconditional: model {mkey[:12]} or task {tkey} is not registered")
                model_id, task = pair
                sel = (cols["model_key"] == mkey) & (cols["task_key"] == tkey)
                batch = {k: cols[k][sel] for k in ("doc_id", "choice", "logprob")}
                task.positions(batch["doc_id"], batch["choice"])
                con.register("batch_rows", batch)
                try:
                    con.execute(
                        "DELETE FROM unconditional u WHERE model_id = ? AND task_id = ? AND EXISTS (SELECT 1 FROM "
                        "batch_rows b WHERE b.doc_id = u.doc_id AND b.choice = u.choice)",
                        [model_id, task.task_id],
                    )
                    con.execute(
                        "INSERT INTO unconditional SELECT ?, ?, doc_id, choice, logprob FROM batch_rows",
                        [model_id, task.task_id],
                    )
                finally:
                    con.unregister("batch_rows")
        return int(len(cols["doc_id"]))

    def _mutual_info(self, con: DuckDBPyConnection, where: str) -> dict[tuple[int, int], tuple[int, float]]:
        """(model, task) -> (examples, acc_mutual_info) where unconditional log-likelihoods are stored: the argmax
        of log p(choice | context) - log p(choice), over examples with every choice of both, as lm-eval scores it."""
        r = con.execute(
            "SELECT l.model_id, l.task_id, l.doc_id, l.choice, l.logprob - u.logprob AS mi FROM logliks l "
            f"JOIN unconditional u USING (model_id, task_id, doc_id, choice) WHERE {where} ORDER BY 1, 2",
        ).fetchnumpy()
        out: dict[tuple[int, int], tuple[int, float]] = {}
        if len(r["doc_id"]) == 0:
            return out
        pairs = np.stack([r["model_id"], r["task_id"]], axis=1)
        for model_id, task_id in np.unique(pairs, axis=0):
            sel = (r["model_id"] == model_id) & (r["task_id"] == task_id)
            task = self._task(con, int(task_id))
            pos, mi = task.assemble(r["doc_id"][sel].astype(np.int64), r["choice"][sel], r["mi"][sel])
            if len(pos):
                pred = np.argmax(np.where(np.isnan(mi), -np.inf, mi), axis=1)  # ties: the first, as numpy's argmax
                out[(int(model_id), int(task_id))] = (len(pos), float(np.mean(pred == task.gold[pos])))
        return out

    def _derive(self, con: DuckDBPyConnection, model_id: int, task: TaskArrays, where: str, args: list[Any]) -> None:
        """(Re)compute the stored predictions of the batch's complete examples from their stored log-likelihoods."""
        if task.kind == "perplexity":
            return
        r = con.execute(f"SELECT doc_id, choice, logprob, is_greedy FROM logliks WHERE {where}", args).fetchnumpy()
        new = self._predictions(model_id, task, r["doc_id"].astype(np.int64), r["choice"], r["logprob"], r["is_greedy"])
        con.execute(f"DELETE FROM predictions WHERE {where}", args)
        if new is not None:
            self._insert_predictions(con, new)

    @staticmethod
    def _predictions(
        model_id: int, task: TaskArrays, doc_ids: np.ndarray, choices: np.ndarray, ll: np.ndarray, greedy: np.ndarray
    ) -> dict[str, np.ndarray] | None:
        """The predictions rows of the complete examples among these log-likelihoods (None for perplexity tasks)."""
        if task.kind == "perplexity":
            return None
        pos, ll_m, greedy_m = task.assemble(doc_ids.astype(np.int64), choices, ll, greedy)
        if task.kind == "cloze":
            pred = np.where(greedy_m[:, 0], 0, -1)
            pred_norm = pred
        else:
            pred, pred_norm = ens.predictions(ll_m, task.chars[pos])
        gold = task.gold[pos]
        return {
            "model_id": np.full(len(pos), model_id, dtype=np.int32),
            "task_id": np.full(len(pos), task.task_id, dtype=np.int32),
            "doc_id": task.doc_ids[pos],
            "gold": gold,
            "pred": pred,
            "pred_norm": pred_norm,
            "correct": pred == gold,
            "correct_norm": pred_norm == gold,
        }

    @staticmethod
    def _insert_predictions(con: DuckDBPyConnection, new: dict[str, np.ndarray]) -> None:
        con.register("new_predictions", new)
        try:
            con.execute(
                "INSERT INTO predictions SELECT model_id, task_id, doc_id, gold, pred, pred_norm, correct, "
                "correct_norm FROM new_predictions"
            )
        finally:
            con.unregister("new_predictions")

    def add_predictions(self, model_key: str, task_key: str) -> int:
        """Re-derive every stored prediction of (model, task) from its log-likelihoods; returns how many exist.

        :meth:`add_logliks` already does this per batch; this repairs a store after a change of definition.
        """
        with self._transaction() as con:
            pair = self._resolve_pair(con, model_key, task_key)
            if pair is None:
                raise StoreError(f"model {model_key[:12]} or task {task_key} is not registered in {self.path}")
            model_id, task = pair
            self._derive(con, model_id, task, "model_id = ? AND task_id = ?", [model_id, task.task_id])
            (n,) = con.execute(
                "SELECT count(*) FROM predictions WHERE model_id = ? AND task_id = ?", [model_id, task.task_id]
            ).fetchall()[0]
        return int(n)

    # -- reading ----------------------------------------------------------------------------------------------

    def scores(self, task: str | Sequence[str] | None = None, models: Sequence[str] | None = None) -> list[Score]:
        """acc / acc_norm (and perplexities) per (model, task) over the stored examples, by task then step.

        Only the metrics a task defines have values (``tasks.metrics``; all computed where that is unknown): the
        store computes acc_norm for every choice task, but a WinoGrande score has none, as in lm-eval.
        """
        tasks_ref = [task] if isinstance(task, str) else task
        with self._db() as con:
            task_ids = None if tasks_ref is None else self._task_ids(con, tasks_ref)
            model_ids = None if models is None else self._model_ids(con, models)
            where = f"{_ids_sql('task_id', task_ids)} AND {_ids_sql('model_id', model_ids)}"
            acc = con.execute(
                "SELECT model_id, task_id, count(*), avg(correct::DOUBLE), avg(correct_norm::DOUBLE) "
                f"FROM predictions WHERE {where} GROUP BY ALL"
            ).fetchall()
            lm_tasks = [
                r[0] for r in con.execute("SELECT task_id FROM tasks WHERE kind IN ('cloze', 'perplexity')").fetchall()
            ]
            lm_where = f"{where} AND {_ids_sql('l.task_id', lm_tasks)}"
            lm = (
                con.execute(
                    "SELECT l.model_id, l.task_id, count(*), sum(l.logprob), sum(d.words), sum(d.bytes) "
                    f"FROM logliks l JOIN docs d USING (task_id, doc_id) WHERE {lm_where} GROUP BY ALL"
                ).fetchall()
                if lm_tasks
                else []
            )
            mutual_info = self._mutual_info(con, where)
            meta_m = {
                r[0]: r[1:] for r in con.execute("SELECT model_id, model_key, label, step FROM models").fetchall()
            }
            meta_t = {
                r[0]: r[1:]
                for r in con.execute(
                    f"SELECT task_id, name, task_key, kind, n_examples, {self._metrics_sql} FROM tasks"
                ).fetchall()
            }
        found: dict[tuple[int, int], dict[str, Any]] = {}
        for model_id, task_id, n, a, an in acc:
            found[(model_id, task_id)] = {"n": n, "acc": a, "acc_norm": an}
        for pair, (_, mi) in mutual_info.items():
            if pair in found:
                found[pair]["acc_mutual_info"] = mi
        for model_id, task_id, n, total, words, nbytes in lm:
            kind = meta_t[task_id][2]
            entry = found.setdefault((model_id, task_id), {"n": n})
            if kind == "cloze":
                entry["perplexity"] = ens.cloze_perplexity(np.array([total / n]))
            else:
                entry.update(ens.perplexities(np.array([total]), np.array([words]), np.array([nbytes])))
        out = []
        for (model_id, task_id), entry in found.items():
            mkey, label, step = meta_m[model_id]
            name, tkey, kind, n_examples, defined = meta_t[task_id]
            if kind == "minimal_pairs":  # lm-eval defines acc only; a length-normalised pair score is no metric of it
                entry.pop("acc_norm", None)
            if defined is not None:  # computed is not defined: WinoGrande has acc_norm computed, lm-eval reports acc
                entry = {k: v for k, v in entry.items() if k not in SCORE_METRICS or k in defined}
            metrics = None if defined is None else tuple(defined)
            out.append(Score(mkey, label, step, name, tkey, kind, n_examples=n_examples, metrics=metrics, **entry))
        out.sort(key=lambda s: (s.task, s.task_key, s.step is None, s.step or 0, s.model))
        return out

    def choice_matrix(self, model_key: str, task_key: str) -> ChoiceMatrix:
        """One model's stored log-likelihoods of one task as matrices (complete examples only, by doc_id)."""
        with self._db() as con:
            pair = self._resolve_pair(con, model_key, task_key)
            if pair is None:
                raise StoreError(f"model {model_key[:12]} or task {task_key} is not in {self.path}")
            model_id, task = pair
            r = con.execute(
                "SELECT doc_id, choice, logprob FROM logliks WHERE model_id = ? AND task_id = ?",
                [model_id, task.task_id],
            ).fetchnumpy()
        pos, ll = task.assemble(r["doc_id"].astype(np.int64), r["choice"], r["logprob"])
        return ChoiceMatrix(task.doc_ids[pos], ll, task.chars[pos], task.gold[pos])

    def ensemble(self, model_keys: Sequence[str], task_key: str) -> dict[str, Any]:
        """Probability-averaging and majority-vote ensembles of stored models on one task; no model runs.

        ``model_keys`` are ordered oldest to newest (the newest breaks majority ties). Scored on the examples
        every member has complete. Returns accuracies (``probability``, ``majority`` and their ``_norm``
        variants built from length-normalised scores, plus each member's ``members_acc``/``members_acc_norm``)
        and the per-example ``doc_ids``, ``gold`` and ``pred_*`` arrays.
        """
        if not model_keys:
            raise StoreError("an ensemble needs at least one model")
        with self._db() as con:
            ids = self._model_ids(con, model_keys, one=True)
            t = con.execute("SELECT task_id FROM tasks WHERE task_key = ? OR name = ?", [task_key, task_key]).fetchall()
            if len(t) != 1:
                raise StoreError(f"{task_key!r} names {len(t)} tasks in {self.path}; give one task key")
            task = self._task(con, t[0][0])
            if task.kind not in ("multiple_choice", "minimal_pairs"):
                raise StoreError(
                    f"{task.name}: ensembles need a multiple-choice or minimal-pairs task, not {task.kind}"
                )
            members_sql = _ids_sql("model_id", ids)
            r = con.execute(
                f"SELECT model_id, doc_id, choice, logprob FROM logliks WHERE task_id = ? AND {members_sql}",
                [task.task_id],
            ).fetchnumpy()
        members = []
        for key, model_id in zip(model_keys, ids, strict=True):
            sel = r["model_id"] == model_id
            pos, ll = task.assemble(r["doc_id"][sel].astype(np.int64), r["choice"][sel], r["logprob"][sel])
            if len(pos) == 0:
                raise StoreError(f"{task.name}: model {key[:12]} has no complete example stored; evaluate it first")
            members.append((pos, ll))
        common = members[0][0]
        for pos, _ in members[1:]:
            common = np.intersect1d(common, pos)
        if len(common) == 0:
            raise StoreError(f"{task.name}: no example is stored for every member of the ensemble")
        lls = [ll[np.searchsorted(pos, common)] for pos, ll in members]
        chars, gold = task.chars[common], task.gold[common]
        preds = [ens.predictions(ll, chars) for ll in lls]
        out: dict[str, Any] = {
            "task": task.name,
            "task_key": task.key,
            "members": list(model_keys),
            "n": len(common),
            "doc_ids": task.doc_ids[common],
            "gold": gold,
            "pred_probability": ens.ensemble_probability(lls),
            "pred_probability_norm": ens.ensemble_probability([ens.normalised(ll, chars) for ll in lls]),
            "pred_majority": ens.ensemble_majority([p for p, _ in preds]),
            "pred_majority_norm": ens.ensemble_majority([pn for _, pn in preds]),
            "members_acc": [ens.accuracy(p, gold) for p, _ in preds],
            "members_acc_norm": [ens.accuracy(pn, gold) for _, pn in preds],
        }
        for kind in ("probability", "probability_norm", "majority", "majority_norm"):
            out[kind] = ens.accuracy(out[f"pred_{kind}"], gold)
        return out

    def export(
        self,
        path: str | Path,
        format: str | None = None,
        *,
        table: str = "predictions",
        task: str | Sequence[str] | None = None,
        models: Sequence[str] | None = None,
    ) -> Path:
        """Write ``scores``, ``predictions`` or ``logliks`` (with model and task names) as CSV, Parquet or JSON.

        ``format`` defaults to the file's suffix: ``.csv``, ``.parquet``, ``.json`` (one array) or ``.jsonl``
        (one object a line, for big tables). The file appears only when complete.
        """
        path = Path(path)
        fmt = format or EXPORT_FORMATS.get(path.suffix.lower())
        if fmt not in ("csv", "parquet", "json", "jsonl"):
            raise OutputError(f"{path}: unknown export format {fmt or path.suffix!r}; use csv, parquet, json or jsonl")
        if table not in EXPORT_TABLES:
            raise OutputError(f"cannot export {table!r}; choose one of {', '.join(EXPORT_TABLES)}")
        if not path.parent.is_dir():
            raise OutputError(f"{path.parent}: no such folder to export into")
        options = {
            "csv": "FORMAT csv, HEADER",
            "parquet": "FORMAT parquet, COMPRESSION zstd",
            "json": "FORMAT json, ARRAY true",
            "jsonl": "FORMAT json",
        }[fmt]
        tmp = path.with_name(f".{path.name}.partial")
        tasks_ref = [task] if isinstance(task, str) else task
        rows = self.scores(task, models) if table == "scores" else None
        with self._db() as con:
            if rows is not None:
                con.register(
                    "score_rows", {f: np.array([getattr(s, f) for s in rows], dtype=object) for f in _SCORE_TYPES}
                )
                query = f"SELECT {', '.join(f'{f}::{t} AS {f}' for f, t in _SCORE_TYPES.items())} FROM score_rows"
            else:
                task_ids = None if tasks_ref is None else self._task_ids(con, tasks_ref)
                model_ids = None if models is None else self._model_ids(con, models)
                extra = (
                    "x.choice, x.logprob, x.is_greedy, x.n_tokens"
                    if table == "logliks"
                    else ("x.gold, x.pred, x.pred_norm, x.correct, x.correct_norm")
                )
                order = "x.task_id, x.model_id, x.doc_id" + (", x.choice" if table == "logliks" else "")
                query = (
                    f"SELECT t.name AS task, t.task_key, m.label AS model, m.model_key, x.doc_id, {extra} "
                    f"FROM {table} x JOIN models m USING (model_id) JOIN tasks t USING (task_id) "
                    f"WHERE {_ids_sql('x.task_id', task_ids)} AND {_ids_sql('x.model_id', model_ids)} ORDER BY {order}"
                )
            try:
                con.execute(f"COPY ({query}) TO {_quote(tmp)} ({options})")
            except Exception as e:
                tmp.unlink(missing_ok=True)
                raise OutputError(f"{path}: export failed ({e})") from e
            finally:
                if rows is not None:
                    con.unregister("score_rows")
        tmp.replace(path)
        return path
