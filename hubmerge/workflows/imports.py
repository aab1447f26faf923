"""``hubmerge results import``: lm-evaluation-harness runs into the results store, with no model re-run.

Every ``--log_samples`` line becomes the rows ``hubmerge eval`` stores: per-choice log-likelihoods (the store
derives predictions from them, as for its own scores), the task's examples with their gold answers and choice
lengths, and a record of where the rows came from (lm-eval version, file, date). Everything downstream then works
on them unchanged: ``hubmerge results``, ``hubmerge stability --results``, ensembles, plots, the card.

Which checkpoint a run scored comes from the results file (``--repo``/``--revision`` override). Its store key is
its weights' sha256 where hubmerge can learn them without downloading (a local folder, or the Hub's LFS listing),
so imported rows and ``hubmerge eval`` rows of the same weights are one model; where it cannot (no network, a
folder from another machine) the key is made from the name, and a notice says so.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from hubmerge.errors import DocumentClashError, HubError, ResultFileError, SourceError, StoreError
from hubmerge.hub.client import HubClient, is_unreachable, revision_files
from hubmerge.hub.revisions import parse_revision
from hubmerge.io.progress import QUIET, Display
from hubmerge.results import scores as ens
from hubmerge.results.keys import model_key, task_key, weight_hashes_of_folder
from hubmerge.results.lm_eval_samples import (
    LmEvalRun,
    RunTask,
    SamplesReader,
    TaskSamples,
    find_runs,
    gold_indices,
    padded,
)
from hubmerge.results.store import ResultsStore


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint a run scored, and the store key it gets."""

    label: str
    repo: str | None
    revision: str | None
    commit: str | None
    path: str | None
    weight_hashes: tuple[str, ...]  # the weight files' sha256, or one digest of the name (keyed_by "name")
    keyed_by: str  # "weights" | "name"

    @property
    def key(self) -> str:
        return model_key(self.weight_hashes)

    @property
    def step(self) -> int | None:
        return parse_revision(self.revision).step if self.revision else None


@dataclass
class ImportReport:
    """What an import did, pair by pair, and what it noticed."""

    runs: int = 0
    imported: list[tuple[str, str, int]] = field(default_factory=list)  # (checkpoint, task, examples)
    unchanged: list[tuple[str, str]] = field(default_factory=list)  # the same file was imported before
    replaced: list[tuple[str, str]] = field(default_factory=list)  # a newer run replaced stored rows
    aggregate_only: list[tuple[str, str]] = field(default_factory=list)  # (file, task): no samples
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "runs": self.runs,
            "imported": [{"checkpoint": c, "task": t, "examples": n} for c, t, n in self.imported],
            "unchanged": [{"checkpoint": c, "task": t} for c, t in self.unchanged],
            "replaced": [{"checkpoint": c, "task": t} for c, t in self.replaced],
            "aggregate_only": [{"file": f, "task": t} for f, t in self.aggregate_only],
            "notices": self.notices,
        }


def _name_digest(identity: str) -> str:
    """A stand-in for weight hashes when they cannot be learnt: a digest of the checkpoint's name."""
    return hashlib.sha256(f"hubmerge-name-key\n{identity}".encode()).hexdigest()


class _Identifier:
    """Store keys of checkpoints, looked up once each."""

    def __init__(self, client: HubClient, repo: str | None, revision: str | None, report: ImportReport) -> None:
        self.client, self.repo, self.revision, self.report = client, repo, revision, report
        self.cache: dict[tuple[str | None, str | None, str | None, str | None], Checkpoint] = {}
        self.warned = False
        self.unreachable = False  # set once a lookup could not reach the Hub: later revisions skip it

    def __call__(self, run: LmEvalRun) -> Checkpoint:
        repo = self.repo or run.repo
        path = None if self.repo else (run.pretrained if run.is_local else None)
        revision = self.revision or run.revision
        commit = None if self.revision else run.commit
        if revision is None and not (path and Path(path).expanduser().is_dir()):
            raise ResultFileError(
                f"{run.path}: names no revision (model_args has no revision=, config no model_revision, the model "
                "path no stepN); pass --revision REV (and --repo R) to say which checkpoint it scored",
                path=run.path,
            )
        ident = (repo, path, revision, commit)
        if ident not in self.cache:
            self.cache[ident] = self._identify(repo, path, revision, commit)
        return self.cache[ident]

    def _identify(self, repo: str | None, path: str | None, revision: str | None, commit: str | None) -> Checkpoint:
        label = revision or Path(path or "model").name
        folder = Path(path).expanduser() if path else None
        if folder is not None and folder.is_dir():
            try:
                hashes = tuple(weight_hashes_of_folder(folder))
                return Checkpoint(label, None, revision, None, str(folder.resolve()), hashes, "weights")
            except (SourceError, StoreError):
                pass
        if repo is not None and revision is not None and not self.client.offline and not self.unreachable:
            try:
                files = revision_files(self.client, repo, revision, commit)
                hashes = tuple(str(files.files[w].sha256) for w in files.weights if files.files[w].sha256)
                if hashes and len(hashes) == len(files.weights):
                    return Checkpoint(label, repo, revision, commit or files.commit, None, hashes, "weights")
            except (HubError, StoreError) as e:
                # Not reached at all (no network, offline): asking again for each of a hundred revisions only waits.
                self.unreachable = isinstance(e, HubError) and is_unreachable(e)
        if not self.warned:
            self.report.notices.append(
                f"some checkpoints' weights could not be looked up (no such folder here, or the Hub was not "
                f"reachable): their rows are keyed by name (e.g. {repo or path}@{revision}), so `hubmerge eval` of the "
                "same weights will score them again rather than reuse them"
            )
            self.warned = True
        identity = f"{repo or path}@{commit or revision}"
        return Checkpoint(label, repo, revision, commit, path, (_name_digest(identity),), "name")


def _task_rows(task: RunTask, samples: TaskSamples) -> dict[str, np.ndarray]:
    """The store's view of one task from its samples: examples, gold answers, choice lengths, counts."""
    kind = task.kind
    n = samples.n
    if kind == "multiple_choice":
        gold, _ = gold_indices(samples)
        chars = samples.cont_len - len(task.target_delimiter)
    elif kind == "cloze":
        gold, chars = np.zeros(len(n), dtype=np.int64), samples.cont_len
    else:
        gold, chars = np.full(len(n), -1, dtype=np.int64), samples.cont_len
    words, n_bytes = samples.words.copy(), samples.n_bytes.copy()
    if kind == "perplexity":
        for i, text in enumerate(samples.target):
            if words[i] < 0:
                words[i] = ens.count_words(text or "")
            if n_bytes[i] < 0:
                n_bytes[i] = ens.count_bytes(text or "")
    else:
        words[:], n_bytes[:] = 0, 0
    return {"gold": gold, "chars": chars, "words": words, "n_bytes": n_bytes}


def _register(store: ResultsStore, pair: _Pair, samples: TaskSamples, rows: dict[str, np.ndarray]) -> None:
    """The task's documents into the store; one stored earlier as another document is named by file and line."""
    task = pair.task
    try:
        store.register_task_arrays(
            task.name,
            str(task.kind),
            task.identity,
            f"lm-eval {pair.run.lm_eval_version or '?'}: {pair.file.name}",
            doc_ids=samples.doc_id,
            gold=rows["gold"],
            n_choices=samples.n,
            chars=rows["chars"],
            words=rows["words"],
            n_bytes=rows["n_bytes"],
            doc_hashes=samples.doc_hash,
            metrics=task.metrics or None,  # what the lm-eval file reports for the task; none listed: unknown
        )
    except DocumentClashError as e:
        line = int(samples.line[np.flatnonzero(samples.doc_id == e.doc_id)[0]])
        raise ResultFileError(
            f"{pair.file}:{line}: doc_id {e.doc_id} of task {task.name} is another document than the one stored "
            f"from an earlier file (doc_hash {e.new[:12]} vs {e.stored[:12]}): the runs did not evaluate the same "
            "data; import them into separate results folders",
            path=pair.file,
        ) from None


def _newest(runs: Sequence[LmEvalRun], identify: _Identifier, report: ImportReport) -> dict:
    """(checkpoint, task) -> the newest run that has it; older duplicates are noted."""
    chosen: dict[tuple[str, str], tuple[Checkpoint, LmEvalRun]] = {}
    for run in sorted(runs, key=lambda r: r.date):
        ckpt = identify(run)
        for name in run.tasks:
            previous = chosen.get((ckpt.key, name))
            if previous is not None:
                report.notices.append(
                    f"{ckpt.label} / {name}: {run.path.name} is newer than {previous[1].path.name}; "
                    "the newer is imported"
                )
            chosen[(ckpt.key, name)] = (ckpt, run)
    return chosen


@dataclass
class _Pair:
    """One (checkpoint, task) to import from one samples file."""

    ckpt: Checkpoint
    run: LmEvalRun
    task: RunTask
    file: Path
    tkey: str
    replaces: bool  # the store holds an older import of the pair


def _plan_pair(
    records: dict[tuple[str, str], dict], ckpt: Checkpoint, run: LmEvalRun, task: RunTask, filter_name: str,
    report: ImportReport,
) -> _Pair | None:  # fmt: skip
    """What to do with one (checkpoint, task): None where there is nothing to import (said in the report)."""
    samples_file = run.samples.get(task.name)
    if task.kind is None:
        report.notices.append(
            f"{task.name}: {task.output_type or 'no output type'} tasks keep no log-likelihoods; aggregate scores only"
        )
        return None
    if samples_file is None:
        report.aggregate_only.append((str(run.path), task.name))
        return None
    tkey = task_key(task.name, task.identity)
    record = records.get((ckpt.key, tkey))
    if record is not None and record["file"] == str(samples_file) and record["filter"] == filter_name:
        report.unchanged.append((ckpt.label, task.name))
        return None
    if record is not None and str(record["date"]) > run.date:
        report.notices.append(
            f"{ckpt.label} / {task.name}: the store holds a newer import ({Path(record['file']).name}); "
            f"{samples_file.name} is left out"
        )
        return None
    return _Pair(ckpt, run, task, samples_file, tkey, record is not None)


class _Writer:
    """Buffers the rows of many pairs and writes them with a few statements (see ``add_pair_logliks``)."""

    FLUSH_ROWS = 1 << 20

    def __init__(self, store: ResultsStore, filter_name: str) -> None:
        self.store, self.filter_name = store, filter_name
        self.logliks: list[tuple[str, str, dict[str, np.ndarray]]] = []
        self.records: list[dict[str, object]] = []
        self.rows = 0

    def add(self, pair: _Pair, samples: TaskSamples) -> None:
        n = samples.n
        doc_id = np.repeat(samples.doc_id, n)
        choice = np.arange(len(samples.logprob)) - np.repeat(np.cumsum(n) - n, n)
        zeros = np.zeros(len(choice), dtype=np.int32)
        if pair.replaces:
            self.store.remove_scores(pair.ckpt.key, pair.tkey)
        self.logliks.append(
            (
                pair.ckpt.key,
                pair.tkey,
                {"doc_id": doc_id, "choice": choice, "logprob": samples.logprob, "is_greedy": samples.is_greedy,
                 "n_tokens": zeros},
            )
        )  # fmt: skip
        if samples.uncond_logprob is not None:
            self.store.add_unconditional(
                {"model_key": pair.ckpt.key, "task_key": pair.tkey, "doc_id": doc_id, "choice": choice,
                 "logprob": samples.uncond_logprob, "is_greedy": np.zeros(len(choice), dtype=bool), "n_tokens": zeros}
            )  # fmt: skip
        self.records.append(
            {"model_key": pair.ckpt.key, "task_key": pair.tkey, "tool": "lm-eval",
             "tool_version": pair.run.lm_eval_version, "file": str(pair.file), "date": pair.run.date,
             "filter": self.filter_name, "rows": len(samples.logprob), "keyed_by": pair.ckpt.keyed_by}
        )  # fmt: skip
        self.rows += len(choice)
        if self.rows >= self.FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        self.store.add_pair_logliks(self.logliks)
        self.store.record_imports(self.records)
        self.logliks, self.records, self.rows = [], [], 0


class _Reader:
    """Reads samples files ahead of the writer, one per core: DuckDB parses outside the GIL."""

    def __init__(self, pool: ThreadPoolExecutor, files: SamplesReader, filter_name: str, ahead: int) -> None:
        self.pool, self.files, self.filter_name, self.ahead = pool, files, filter_name, ahead

    def samples(self, pairs: Sequence[_Pair], like: TaskSamples | None) -> Iterator[tuple[_Pair, TaskSamples]]:
        pending: deque[tuple[_Pair, Future[TaskSamples]]] = deque()
        todo = iter(pairs)
        try:
            while True:
                while len(pending) < self.ahead and (pair := next(todo, None)) is not None:
                    job = self.pool.submit(self.files.read, pair.file, pair.task, self.filter_name, like)
                    pending.append((pair, job))
                if not pending:
                    return
                pair, future = pending.popleft()
                yield pair, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _ingest_task(
    store: ResultsStore, pairs: Sequence[_Pair], reader: _Reader, writer: _Writer, report: ImportReport, bar: Any
) -> None:
    """Every pair of one task: the first file is read in full and registers the documents; files of the same
    documents then need only their scores parsed, read ahead in parallel."""
    first, *rest = pairs
    reference = reader.files.read(first.file, first.task, writer.filter_name)
    ref_rows: dict[str, np.ndarray] = {}
    for pair, samples in chain([(first, reference)], reader.samples(rest, reference)):  # read while writing
        task = pair.task
        bar.update(status=f"{pair.ckpt.label} / {task.name}")
        if task.n_samples is not None and len(samples.n) != task.n_samples:
            raise ResultFileError(
                f"{pair.file}: {len(samples.n)} documents under filter {writer.filter_name!r}, but "
                f"{pair.run.path.name} says lm-eval scored {task.n_samples}; is the samples file truncated?",
                path=pair.file,
            )
        same_docs = samples is not reference and samples.target is reference.target  # only its scores were read
        rows = ref_rows if same_docs else _task_rows(task, samples)
        if not same_docs:
            _register(store, pair, samples, rows)
        if samples is reference:
            ref_rows = rows
        if pair.replaces:
            report.replaced.append((pair.ckpt.label, task.name))
        writer.add(pair, samples)
        _compare_accuracy(task, samples, rows["gold"], report)
        report.imported.append((pair.ckpt.label, task.name, len(samples.n)))
        bar.advance(1)


def _compare_accuracy(task: RunTask, samples: TaskSamples, gold: np.ndarray, report: ImportReport) -> None:
    """lm-eval's per-doc ``acc`` must agree with the log-likelihoods it logged; say so where it does not."""
    if task.kind != "multiple_choice":
        return
    acc = samples.acc
    has = ~np.isnan(acc)
    if not has.any():
        return
    pred = np.argmax(padded(samples.logprob, samples.n, -np.inf), axis=1)
    differ = int(((pred == gold).astype(float)[has] != acc[has]).sum())
    if differ:
        report.notices.append(
            f"{samples.file}: lm-eval's per-doc acc differs from its logged log-likelihoods in {differ} of "
            f"{int(has.sum())} docs; the store keeps the log-likelihoods"
        )


def import_lm_eval(
    paths: Iterable[str | Path],
    results: str | Path | None = None,
    client: HubClient | None = None,
    *,
    repo: str | None = None,
    revision: str | None = None,
    filter_name: str = "none",
    display: Display = QUIET,
) -> ImportReport:
    """Import every lm-eval run under ``paths`` into the results store; each PATH is one transaction."""
    report = ImportReport()
    store = ResultsStore(results)
    identify = _Identifier(client or HubClient(), repo, revision, report)
    workers = max(1, min(4, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="hubmerge-import") as pool,
        SamplesReader(threads=1) as files,
    ):
        reader = _Reader(pool, files, filter_name, ahead=2 * workers)
        for path in paths:
            runs = find_runs([path])
            report.runs += len(runs)
            chosen = _newest(runs, identify, report)
            with store.transaction(), display.count(f"importing {Path(path).name}", len(chosen)) as bar:
                registered: set[str] = set()
                for ckpt, _ in chosen.values():
                    if ckpt.key not in registered:
                        store.register_checkpoint(ckpt)
                        registered.add(ckpt.key)
                records = store.import_records()
                by_task: dict[str, list[_Pair]] = {}
                for (_, name), (ckpt, run) in chosen.items():
                    pair = _plan_pair(records, ckpt, run, run.tasks[name], filter_name, report)
                    if pair is None:
                        bar.advance(1)
                    else:
                        by_task.setdefault(pair.tkey, []).append(pair)
                writer = _Writer(store, filter_name)
                for pairs in by_task.values():
                    _ingest_task(store, pairs, reader, writer, report, bar)
                writer.flush()
                for run in runs:
                    for group, members in run.groups.items():
                        store.add_task_group(group, members)
    return report
