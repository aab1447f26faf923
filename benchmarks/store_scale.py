"""How the results store behaves at scale, DuckDB (the store itself) against SQLite on the same rows.

Fills a store with synthetic log-likelihoods (default 200 models x 10 tasks x 2,500 examples x 4 choices = 20M
rows, one ``add_logliks`` batch per (model, task), predictions derived as in real runs), then times the queries
``hubmerge results`` and ``--ensemble`` need. The SQLite side is the straightforward equivalent through the
standard library: the same integer schema, clustered primary keys (``WITHOUT ROWID``) and a covering index for
per-task scores, WAL journal, one transaction per batch, the same numpy code after each query.

    python benchmarks/store_scale.py                     # full size (several minutes, ~1 GB of disk)
    python benchmarks/store_scale.py --models 20         # a quick look
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from hubmerge.results import scores as ens
from hubmerge.results.store import ResultsStore, TaskArrays


def synthetic_task(t: int, n_examples: int, n_choices: int) -> SimpleNamespace:
    examples = [
        SimpleNamespace(
            doc_id=d,
            gold=(d * 7 + t) % n_choices,
            choices=tuple("w" * (1 + (d + c) % 13) for c in range(n_choices)),
            requests=tuple(SimpleNamespace(doc_id=d, choice=c) for c in range(n_choices)),
            text=None,
        )
        for d in range(n_examples)
    ]
    spec = SimpleNamespace(name=f"task_{t}", kind="multiple_choice")
    return SimpleNamespace(spec=spec, examples=examples, data_hash=hashlib.sha256(b"%d" % t).hexdigest(), source="x")


def batch_columns(rng: np.random.Generator, n_examples: int, n_choices: int) -> dict[str, np.ndarray]:
    n = n_examples * n_choices
    return {
        "doc_id": np.repeat(np.arange(n_examples, dtype=np.int32), n_choices),
        "choice": np.tile(np.arange(n_choices, dtype=np.int32), n_examples),
        "logprob": -rng.gamma(2.0, 5.0, n),
        "is_greedy": rng.random(n) < 0.1,
        "n_tokens": rng.integers(1, 12, n, dtype=np.int32),
    }


def weights_of(m: int) -> list[str]:
    return [hashlib.sha256(b"model %d" % m).hexdigest()]


def fill_duckdb(path: Path, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    store = ResultsStore(path)
    out: dict[str, float] = {}
    began = time.perf_counter()
    with store:
        tasks = [store.register_task(synthetic_task(t, args.examples, args.choices)) for t in range(args.tasks)]
        models = [store.register_model(weights_of(m), name=f"m{m}", step=m) for m in range(args.models)]
        for mk in models:
            for tk in tasks:
                store.add_logliks({"model_key": mk, "task_key": tk, **batch_columns(rng, args.examples, args.choices)})
    out["insert"] = time.perf_counter() - began
    # the concurrency-friendly mode a run uses: open, write one batch, close (lets readers in between batches)
    extra = store.register_model(weights_of(10**6), name="extra")
    began = time.perf_counter()
    for tk in tasks[:5]:
        store.add_logliks({"model_key": extra, "task_key": tk, **batch_columns(rng, args.examples, args.choices)})
    out["batch_reopen"] = (time.perf_counter() - began) / 5
    out["size"] = path.stat().st_size
    reader = ResultsStore(path, read_only=True)
    began = time.perf_counter()
    scores = reader.scores(task="task_0")
    out["scores"] = time.perf_counter() - began
    assert len(scores) == args.models + 1
    began = time.perf_counter()
    assert len(reader.scores()) == args.models * args.tasks + min(5, args.tasks)
    out["scores_all"] = time.perf_counter() - began
    began = time.perf_counter()
    result = reader.ensemble(models[-10:], tasks[0])
    out["ensemble"] = time.perf_counter() - began
    assert result["n"] == args.examples
    began = time.perf_counter()
    reader.done_docs(models[0], tasks[0])
    out["done_docs"] = time.perf_counter() - began
    began = time.perf_counter()
    reader.export(path.parent / "duck_task0.csv", table="logliks", task="task_0")
    out["export_csv"] = time.perf_counter() - began
    began = time.perf_counter()
    reader.export(path.parent / "duck_all.parquet", table="logliks")
    out["export_parquet_all"] = time.perf_counter() - began
    return out


SQLITE_SCHEMA = """
CREATE TABLE logliks (model_id INTEGER, task_id INTEGER, doc_id INTEGER, choice INTEGER, logprob REAL,
    is_greedy INTEGER, n_tokens INTEGER, PRIMARY KEY (model_id, task_id, doc_id, choice)) WITHOUT ROWID;
CREATE TABLE predictions (model_id INTEGER, task_id INTEGER, doc_id INTEGER, gold INTEGER, pred INTEGER,
    pred_norm INTEGER, correct INTEGER, correct_norm INTEGER, PRIMARY KEY (model_id, task_id, doc_id)) WITHOUT ROWID;
CREATE INDEX predictions_by_task ON predictions (task_id, model_id, correct, correct_norm);
"""


def fill_sqlite(path: Path, args: argparse.Namespace, task: TaskArrays) -> dict[str, float]:
    rng = np.random.default_rng(0)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.executescript(SQLITE_SCHEMA)
    out: dict[str, float] = {}
    began = time.perf_counter()
    for m in range(1, args.models + 1):
        for t in range(1, args.tasks + 1):
            b = batch_columns(rng, args.examples, args.choices)
            pos, ll = task.assemble(b["doc_id"].astype(np.int64), b["choice"], b["logprob"])
            pred, pred_norm = ens.predictions(ll, task.chars[pos])
            gold = task.gold[pos]
            with con:  # one transaction per batch, like the store
                con.executemany(
                    "INSERT OR REPLACE INTO logliks VALUES (?, ?, ?, ?, ?, ?, ?)",
                    zip(
                        [m] * len(b["doc_id"]),
                        [t] * len(b["doc_id"]),
                        b["doc_id"].tolist(),
                        b["choice"].tolist(),
                        b["logprob"].tolist(),
                        b["is_greedy"].tolist(),
                        b["n_tokens"].tolist(),
                        strict=True,
                    ),
                )
                con.executemany(
                    "INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    zip(
                        [m] * len(pos),
                        [t] * len(pos),
                        task.doc_ids[pos].tolist(),
                        gold.tolist(),
                        pred.tolist(),
                        pred_norm.tolist(),
                        (pred == gold).tolist(),
                        (pred_norm == gold).tolist(),
                        strict=True,
                    ),
                )
    out["insert"] = time.perf_counter() - began
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    out["size"] = path.stat().st_size
    began = time.perf_counter()
    rows = con.execute(
        "SELECT model_id, count(*), avg(correct), avg(correct_norm) FROM predictions WHERE task_id = 1 "
        "GROUP BY model_id"
    ).fetchall()
    out["scores"] = time.perf_counter() - began
    assert len(rows) == args.models
    began = time.perf_counter()
    rows = con.execute(
        "SELECT model_id, task_id, count(*), avg(correct), avg(correct_norm) FROM predictions "
        "GROUP BY model_id, task_id"
    ).fetchall()
    out["scores_all"] = time.perf_counter() - began
    assert len(rows) == args.models * args.tasks
    began = time.perf_counter()
    members = list(range(args.models - 9, args.models + 1))
    got = con.execute(
        f"SELECT model_id, doc_id, choice, logprob FROM logliks WHERE task_id = 1 AND model_id IN "
        f"({', '.join(map(str, members))})"
    ).fetchall()
    arr = np.array(got, dtype=np.float64)
    lls = []
    for mid in members:
        sel = arr[:, 0] == mid
        pos, ll = task.assemble(arr[sel, 1].astype(np.int64), arr[sel, 2].astype(np.int64), arr[sel, 3])
        lls.append(ll)
    chars = task.chars[pos]
    ens.ensemble_probability(lls)
    ens.ensemble_majority([ens.predictions(ll, chars)[0] for ll in lls])
    out["ensemble"] = time.perf_counter() - began
    began = time.perf_counter()
    con.execute("SELECT doc_id, count(*) FROM logliks WHERE model_id = 1 AND task_id = 1 GROUP BY doc_id").fetchall()
    out["done_docs"] = time.perf_counter() - began
    began = time.perf_counter()
    with open(path.parent / "lite_task0.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "model", "doc_id", "choice", "logprob", "is_greedy", "n_tokens"])
        cur = con.execute(
            "SELECT 'task_0', 'm' || model_id, doc_id, choice, logprob, is_greedy, n_tokens FROM logliks "
            "WHERE task_id = 1 ORDER BY model_id, doc_id, choice"
        )
        while chunk := cur.fetchmany(100_000):
            w.writerows(chunk)
    out["export_csv"] = time.perf_counter() - began
    con.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=200)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--examples", type=int, default=2500)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--dir", type=Path, default=None, help="where to put the databases (default: a temporary folder)")
    p.add_argument("--no-sqlite", action="store_true")
    args = p.parse_args()
    if args.models < 10:
        p.error("--models must be at least 10 (the ensemble query uses 10 members)")
    work = Path(tempfile.mkdtemp(prefix="store-scale-", dir=args.dir))
    rows = args.models * args.tasks * args.examples * args.choices
    print(f"{rows:,} loglik rows: {args.models} models x {args.tasks} tasks x {args.examples} x {args.choices}")
    try:
        duck = fill_duckdb(work / "results.duckdb", args)
        print("duckdb:", {k: round(v, 3) for k, v in duck.items()}, flush=True)
        lite = None
        if not args.no_sqlite:
            with ResultsStore(work / "results.duckdb", read_only=True) as reader, reader._db() as con:
                task = reader._task(con, 1)
            lite = fill_sqlite(work / "results.sqlite", args, task)
            print("sqlite:", {k: round(v, 3) for k, v in lite.items()}, flush=True)
        rows_out = [
            ("insert all rows + predictions (s)", "insert"),
            ("one batch, open/write/close (s)", "batch_reopen"),
            ("file size (MB)", "size"),
            ("scores() for one task (s)", "scores"),
            ("scores() for every (model, task) (s)", "scores_all"),
            ("ensemble of 10 models (s)", "ensemble"),
            ("done_docs(model, task) (s)", "done_docs"),
            (f"export one task's {rows // args.tasks:,} logliks, CSV (s)", "export_csv"),
            (f"export all {rows:,} logliks, Parquet (s)", "export_parquet_all"),
        ]
        print(f"\n| {'':48} | {'DuckDB':>10} | {'SQLite':>10} |\n|{'-' * 50}|{'-' * 12}|{'-' * 12}|")
        for label, key in rows_out:
            cells = []
            for res in (duck, lite):
                v = None if res is None else res.get(key)
                cells.append("-" if v is None else f"{v / 1e6:.0f}" if key == "size" else f"{v:.3f}")
            print(f"| {label:48} | {cells[0]:>10} | {cells[1]:>10} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
