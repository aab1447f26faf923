"""The DuckDB results store: keys, round trips, skip and resume, ensembles from stored scores, exports, schema."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("duckdb")

from hubmerge.errors import OutputError, SourceError, StoreError  # noqa: E402
from hubmerge.results import scores as ens  # noqa: E402
from hubmerge.results import store as store_mod  # noqa: E402
from hubmerge.results.keys import model_key, weight_hashes_of_folder
from hubmerge.results.store import LOGLIK_COLUMNS, ResultsStore, loglik_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H = [hashlib.sha256(bytes([i])).hexdigest() for i in range(8)]  # stand-ins for weight file digests


def make_task(name: str, kind: str, choices: list[list[str]], gold: list[int], texts: list[str] | None = None):
    """A duck-typed tasks.TaskData: the fields the store reads (spec.name/kind, examples, data_hash, source)."""
    examples = []
    for doc_id, (ch, g) in enumerate(zip(choices, gold, strict=True)):
        n_req = 0 if kind == "perplexity" else len(ch)
        requests = tuple(
            SimpleNamespace(doc_id=doc_id, choice=c, context="Q:", continuation=" " + ch[c]) for c in range(n_req)
        )
        text = texts[doc_id] if texts else None
        examples.append(SimpleNamespace(doc_id=doc_id, gold=g, choices=tuple(ch), requests=requests, text=text))
    digest = hashlib.sha256(json.dumps([name, choices, gold, texts]).encode()).hexdigest()
    return SimpleNamespace(spec=SimpleNamespace(name=name, kind=kind), examples=examples, data_hash=digest, source="t")


MC_CHOICES = [["a", "bbbb"], ["x", "yy", "zzz"], ["p", "q", "r", "s"], ["one", "two"]]
MC_GOLD = [1, 2, 1, 0]
# two members' log-likelihoods, padded with NaN past each example's last choice
LL_A = ens.pad([[-1.0, -2.0], [-3.0, -2.5, -4.0], [-2.0, -1.0, -1.0, -4.0], [-0.2, -1.6]])
LL_B = ens.pad([[-2.5, -3.0], [-5.0, -4.0, -3.0], [-3.0, -0.5, -2.0, -2.0], [-1.2, -0.6]])


def rows_for(mkey: str, tkey: str, ll: np.ndarray, docs: list[int] | None = None) -> list[tuple]:
    out = []
    for d in docs if docs is not None else range(len(ll)):
        for c, v in enumerate(ll[d]):
            if not np.isnan(v):
                out.append((mkey, tkey, d, c, float(v), c == 0, 3))
    return out


@pytest.fixture
def mc(tmp_path):
    store = ResultsStore(tmp_path / "results")
    task = make_task("toy_mc", "multiple_choice", MC_CHOICES, MC_GOLD)
    tkey = store.register_task(task)
    ka = store.register_model(H[:2], name="toy@step1", repo="org/toy", revision="step1", step=1)
    kb = store.register_model(H[2:4], name="toy@step2", repo="org/toy", revision="step2", step=2)
    return store, tkey, ka, kb


def test_model_key_is_content_and_order_independent():
    assert model_key([H[0], H[1]]) == model_key([H[1], H[0].upper()])
    assert model_key([H[0]]) != model_key([H[1]])
    assert len(model_key(H[:3])) == 64
    with pytest.raises(StoreError, match="not a sha256"):
        model_key(["abc"])
    with pytest.raises(StoreError, match="at least one"):
        model_key([])


def test_round_trip_scores_predictions_and_choice_matrix(mc):
    store, tkey, ka, kb = mc
    assert store.add_logliks(rows_for(ka, tkey, LL_A)) == 11
    chars = ens.pad([[len(c) for c in ch] for ch in MC_CHOICES], fill=0)
    m = store.choice_matrix(ka, tkey)
    assert m.doc_ids.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(m.ll, LL_A)
    np.testing.assert_array_equal(m.chars, chars)
    assert m.gold.tolist() == MC_GOLD
    # by hand: acc picks [0, 1, 1, 0] -> correct on 1..3 = 3/4; acc_norm picks [1, 1, 1, 0] -> 3/4... check 1:
    # ex0 norm [-1, -0.5] -> 1 (gold 1); ex1 [-3, -1.25, -1.33] -> 1 (gold 2); ex2 [-2, -1, -1, -4] -> 1; ex3 -> 0
    (score,) = store.scores(task="toy_mc")
    assert (score.model_key, score.model, score.step, score.kind) == (ka, "toy@step1", 1, "multiple_choice")
    assert (score.n, score.n_examples, score.acc, score.acc_norm) == (4, 4, 0.5, 0.75)
    assert ens.mc_accuracy(LL_A, chars, np.array(MC_GOLD)) == {"acc": 0.5, "acc_norm": 0.75}
    assert store.scores(models=[kb]) == []
    assert [t["name"] for t in store.tasks()] == ["toy_mc"]


def columns_of(rows: list[tuple]) -> dict[str, np.ndarray]:
    return {k: np.asarray([r[i] for r in rows]) for i, k in enumerate(LOGLIK_COLUMNS) if i >= 2}


def test_many_pairs_at_once_equal_one_pair_at_a_time(mc, tmp_path):
    """``add_pair_logliks``: fresh pairs in one INSERT, a pair with stored rows merged; same store as add_logliks."""
    store, tkey, ka, kb = mc
    store.add_logliks(rows_for(kb, tkey, LL_B, docs=[0]))  # kb holds a row already: its pair takes the merge path
    n = store.add_pair_logliks(
        [(ka, tkey, columns_of(rows_for(ka, tkey, LL_A))), (kb, tkey, columns_of(rows_for(kb, tkey, LL_B)))]
    )
    assert n == 22
    one = ResultsStore(tmp_path / "one")
    one.register_task(make_task("toy_mc", "multiple_choice", MC_CHOICES, MC_GOLD))
    one.register_model(H[:2], name="toy@step1", repo="org/toy", revision="step1", step=1)
    one.register_model(H[2:4], name="toy@step2", repo="org/toy", revision="step2", step=2)
    one.add_logliks(rows_for(ka, tkey, LL_A))
    one.add_logliks(rows_for(kb, tkey, LL_B))
    assert store.scores() == one.scores()
    for key in (ka, kb):
        np.testing.assert_array_equal(store.choice_matrix(key, tkey).ll, one.choice_matrix(key, tkey).ll)
        assert store.done_docs(key, tkey) == {0, 1, 2, 3}
    with pytest.raises(StoreError, match="given twice"):
        store.add_pair_logliks([(ka, tkey, columns_of(rows_for(ka, tkey, LL_A)))] * 2)
    bad = columns_of(rows_for(ka, tkey, LL_A))
    bad["logprob"][3] = np.nan
    with pytest.raises(ens.ScoresError, match="NaN log-likelihood for toy_mc.* example 1 choice 1"):
        store.add_pair_logliks([(kb, tkey, columns_of(rows_for(kb, tkey, LL_B))), (ka, tkey, bad)])
    assert store.scores() == one.scores()  # the failing call stored nothing


def test_same_weights_under_two_names_is_one_model_scored_once(mc):
    store, tkey, ka, _ = mc
    store.add_logliks(rows_for(ka, tkey, LL_A))
    again = store.register_model(list(reversed(H[:2])), name="out/toy-copy", path="/models/copy")
    assert again == ka
    assert store.done_docs(again, tkey) == {0, 1, 2, 3}  # nothing left to score under the new name
    (entry,) = [m for m in store.models() if m["model_key"] == ka]
    assert entry["names"] == ["out/toy-copy", "toy@step1"] and entry["label"] == "toy@step1"
    assert [s.model_key for s in store.scores(models=["out/toy-copy"])] == [ka]


def test_done_docs_counts_only_examples_with_every_choice(mc):
    store, tkey, ka, _ = mc
    rows = rows_for(ka, tkey, LL_A)
    store.add_logliks(rows[:4])  # ex0 both choices, ex1 two of three
    assert store.done_docs(ka, tkey) == {0}
    assert store.scores(task=tkey)[0].n == 1
    store.add_logliks(rows[4:])  # the rest completes ex1 and adds ex2, ex3
    assert store.done_docs(ka, tkey) == {0, 1, 2, 3}
    assert store.scores(task=tkey)[0].n == 4
    store.add_logliks(rows[:2])  # re-sent rows replace, never duplicate
    np.testing.assert_array_equal(store.choice_matrix(ka, tkey).ll, LL_A)


def test_a_failing_batch_leaves_the_store_as_it_was(mc):
    store, tkey, ka, _ = mc
    rows = rows_for(ka, tkey, LL_A)
    store.add_logliks(rows[:2])
    bad = [*rows[2:], (ka, tkey, 3, 1, float("nan"), False, 2)]
    with pytest.raises(ens.ScoresError, match="NaN log-likelihood for toy_mc.* example 3 choice 1"):
        store.add_logliks(bad)
    with pytest.raises(StoreError, match="example 9 choice 0 is not part of the task"):
        store.add_logliks([(ka, tkey, 9, 0, -1.0, False, 1)])
    with pytest.raises(StoreError, match="example 0 choice 2"):
        store.add_logliks([(ka, tkey, 0, 2, -1.0, False, 1)])
    assert store.done_docs(ka, tkey) == {0}


def test_resume_after_the_writer_is_killed_mid_batch(mc, tmp_path):
    store, tkey, ka, _ = mc
    rows = rows_for(ka, tkey, LL_A)
    script = textwrap.dedent(f"""
        import os
        from hubmerge.results import store as s
        st = s.ResultsStore({str(store.path)!r})
        rows = {rows!r}
        real = s.ResultsStore._write_logliks
        calls = []
        def write(self, *a):
            calls.append(1)
            real(self, *a)
            if len(calls) == 2:
                os._exit(9)  # killed after the second batch's rows are written, before its commit
        s.ResultsStore._write_logliks = write
        with st:
            st.add_logliks(rows[:5])
            st.add_logliks(rows[5:])
    """)
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 9
    assert store.done_docs(ka, tkey) == {0, 1}  # the committed batch survived, the killed one left nothing
    done = store.done_docs(ka, tkey)
    store.add_logliks([r for r in rows if r[2] not in done])  # the next run scores only the rest
    np.testing.assert_array_equal(store.choice_matrix(ka, tkey).ll, LL_A)
    assert store.scores(task="toy_mc")[0].acc == 0.5


def test_ensembles_from_stored_scores_equal_the_hand_computation(mc):
    store, tkey, ka, kb = mc
    store.add_logliks(rows_for(ka, tkey, LL_A))
    store.add_logliks(loglik_rows(kb, tkey, *_as_scoring_output(LL_B)))
    got = store.ensemble([ka, kb], tkey)
    chars = ens.pad([[len(c) for c in ch] for ch in MC_CHOICES], fill=0)

    # probability averaging by hand
    def softmax(v):
        v = np.exp(v[~np.isnan(v)] - np.nanmax(v))
        return v / v.sum()

    hand = [int(np.argmax((softmax(LL_A[i]) + softmax(LL_B[i])) / 2)) for i in range(4)]
    assert got["pred_probability"].tolist() == hand == [0, 1, 1, 0]
    # majority of two: ties go to the newer member (B): B's own predictions
    pred_b, pred_b_norm = ens.predictions(LL_B, chars)
    assert got["pred_majority"].tolist() == pred_b.tolist() == [0, 2, 1, 1]
    assert got["pred_majority_norm"].tolist() == pred_b_norm.tolist()
    assert got["probability"] == 0.5 and got["majority"] == 0.5
    assert got["members_acc"] == [0.5, ens.accuracy(pred_b, np.array(MC_GOLD))]
    assert got["n"] == 4 and got["doc_ids"].tolist() == [0, 1, 2, 3] and got["gold"].tolist() == MC_GOLD
    # an ensemble only covers examples every member has
    kc = store.register_model(H[4:5], name="toy@step3", step=3)
    store.add_logliks(rows_for(kc, tkey, LL_B, docs=[1, 3]))
    assert store.ensemble([ka, kb, kc], tkey)["doc_ids"].tolist() == [1, 3]
    with pytest.raises(StoreError, match="no model 'nope'"):
        store.ensemble([ka, "nope"], tkey)


def _as_scoring_output(ll):
    reqs, res = [], []
    for d in range(len(ll)):
        for c, v in enumerate(ll[d]):
            if not np.isnan(v):
                reqs.append(SimpleNamespace(doc_id=d, choice=c))
                res.append(SimpleNamespace(logprob=float(v), is_greedy=False, n_tokens=2))
    return reqs, res


def test_minimal_pairs_cloze_and_perplexity_tasks(tmp_path):
    store = ResultsStore(tmp_path / "r.duckdb")
    k = store.register_model(H[:1], name="m")
    pairs = store.register_task(make_task("blimp_x", "minimal_pairs", [["good s", "bad s"]] * 3, [0, 0, 0]))
    store.add_logliks([(k, pairs, d, c, v, False, 2) for d, (g, b) in enumerate([(-1, -2), (-3, -2), (-4, -4)])
                       for c, v in ((0, g), (1, b))])  # fmt: skip
    cloze = store.register_task(make_task("lambada_x", "cloze", [["Paris"], ["cat"]], [0, 0]))
    store.add_logliks([(k, cloze, 0, 0, -1.0, True, 1), (k, cloze, 1, 0, -3.0, False, 1)])
    texts = ["The cat sat.", "Un été à Paris"]
    ppl = store.register_task(make_task("wiki_x", "perplexity", [[], []], [-1, -1], texts=texts))
    store.add_logliks(loglik_rows(k, ppl, [(0, 0), (1, 0)], [(-20.0, 5), (-30.0, 7)]))
    by_task = {s.task: s for s in store.scores()}
    assert by_task["blimp_x"].acc == pytest.approx(2 / 3)  # the tie counts as correct, as in lm-eval
    assert by_task["lambada_x"].acc == 0.5 and by_task["lambada_x"].perplexity == pytest.approx(np.exp(2.0))
    want = ens.perplexities([-20.0, -30.0], [ens.count_words(t) for t in texts], [ens.count_bytes(t) for t in texts])
    w = by_task["wiki_x"]
    assert (w.n, w.acc) == (2, None)
    assert (w.word_perplexity, w.byte_perplexity, w.bits_per_byte) == pytest.approx(tuple(want.values()))
    assert store.done_docs(k, ppl) == {0, 1}
    with pytest.raises(StoreError, match="ensembles need a multiple-choice"):
        store.ensemble([k], cloze)


def test_exports_read_back(mc, tmp_path):
    import duckdb

    store, tkey, ka, kb = mc
    store.add_logliks(rows_for(ka, tkey, LL_A))
    store.add_logliks(rows_for(kb, tkey, LL_B))
    out = tmp_path / "out"
    out.mkdir()
    with open(store.export(out / "p.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and rows[0]["model"] == "toy@step1" and rows[0]["task"] == "toy_mc"
    assert [r["correct"] for r in rows[:4]] == ["false", "false", "true", "true"]
    parquet = store.export(out / "l.parquet", table="logliks", models=[kb])
    back = duckdb.connect().execute(f"SELECT doc_id, choice, logprob FROM '{parquet}' ORDER BY 1, 2").fetchall()
    assert back == [(d, c, LL_B[d, c]) for d in range(4) for c in range(4) if not np.isnan(LL_B[d, c])]
    scores = json.loads(store.export(out / "s.json", table="scores").read_text())
    assert [(s["model"], s["acc"], s["n"]) for s in scores] == [("toy@step1", 0.5, 4), ("toy@step2", 0.5, 4)]
    lines = store.export(out / "p.jsonl", task="toy_mc").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[-1])["model_key"] == kb
    assert sorted(p.name for p in out.iterdir()) == ["l.parquet", "p.csv", "p.jsonl", "s.json"]  # no partials
    with pytest.raises(OutputError, match="unknown export format"):
        store.export(out / "x.xlsx")
    with pytest.raises(OutputError, match="no such folder"):
        store.export(tmp_path / "missing" / "x.csv")


def test_schema_versions(tmp_path, monkeypatch):
    import duckdb

    path = tmp_path / "results.duckdb"
    ResultsStore(path).register_model(H[:1], name="m")
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match="newer hubmerge .*schema 99"):
        ResultsStore(path).models()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match=f"older than {store_mod.READABLE_FROM}; run any writing command"):
        ResultsStore(path, read_only=True).models()
    with pytest.raises(StoreError, match="no upgrade from results schema 0"):
        ResultsStore(path).models()
    monkeypatch.setitem(store_mod._MIGRATIONS, 0, lambda con: con.execute("ALTER TABLE models ADD COLUMN note VARCHAR"))
    assert [m["label"] for m in ResultsStore(path).models()] == ["m"]  # upgraded in place, data kept
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT value FROM meta").fetchall() == [(str(store_mod.SCHEMA_VERSION),)]
    con.close()
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).execute("CREATE TABLE t (a INTEGER)").close()
    with pytest.raises(StoreError, match="not a hubmerge results store"):
        ResultsStore(other).models()
    with pytest.raises(StoreError, match="no results store at"):
        ResultsStore(tmp_path / "nowhere", read_only=True)


V1_SCHEMA = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE models (
    model_id INTEGER PRIMARY KEY, model_key VARCHAR UNIQUE NOT NULL, label VARCHAR, repo VARCHAR,
    revision VARCHAR, "commit" VARCHAR, path VARCHAR, weight_hashes VARCHAR[], step BIGINT);
CREATE TABLE model_names (name VARCHAR NOT NULL, model_key VARCHAR NOT NULL, PRIMARY KEY (name, model_key));
CREATE TABLE tasks (
    task_id INTEGER PRIMARY KEY, task_key VARCHAR UNIQUE NOT NULL, name VARCHAR NOT NULL, kind VARCHAR NOT NULL,
    data_hash VARCHAR NOT NULL, source VARCHAR, n_examples INTEGER);
CREATE TABLE docs (task_id INTEGER, doc_id INTEGER, gold INTEGER, n_choices INTEGER, words INTEGER, bytes BIGINT);
CREATE TABLE choices (task_id INTEGER, doc_id INTEGER, choice INTEGER, chars INTEGER);
CREATE TABLE logliks (
    model_id INTEGER, task_id INTEGER, doc_id INTEGER, choice INTEGER, logprob DOUBLE, is_greedy BOOLEAN,
    n_tokens INTEGER);
CREATE TABLE predictions (
    model_id INTEGER, task_id INTEGER, doc_id INTEGER, gold INTEGER, pred INTEGER, pred_norm INTEGER,
    correct BOOLEAN, correct_norm BOOLEAN);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO tasks VALUES (1, 't@0123456789abcdef', 't', 'multiple_choice', '0123456789abcdef', 'x', 1);
INSERT INTO docs VALUES (1, 0, 1, 2, 0, 0);
INSERT INTO choices VALUES (1, 0, 0, 3), (1, 0, 1, 4);
"""


def test_a_version_1_store_is_upgraded_in_place(tmp_path):
    """Stores written before imports existed gain the imports and task_groups tables and a doc_hash column."""
    import duckdb

    path = tmp_path / "results.duckdb"
    con = duckdb.connect(str(path))
    con.execute(V1_SCHEMA)
    con.close()
    with pytest.raises(StoreError, match="schema 1 is older than 2"):
        ResultsStore(path, read_only=True).tasks()
    store = ResultsStore(path)
    assert [t["task_key"] for t in store.tasks()] == ["t@0123456789abcdef"]
    key = store.register_model(H[:1], name="m")
    store.add_logliks(loglik_rows(key, "t@0123456789abcdef", [(0, 0), (0, 1)], [(-1.0, 1), (-2.0, 1)]))
    assert store.scores("t")[0].acc == 0.0  # gold is choice 1; choice 0 is likelier
    store.add_task_group("g", ["t"])
    assert store.task_groups() == {"g": ["t"]} and store.doc_hashes("t@0123456789abcdef") == {}


def _defined(name: str, metrics: tuple[str, ...] | None):
    """A multiple-choice task whose definition lists ``metrics`` (None: a definition that does not say)."""
    task = make_task(name, "multiple_choice", MC_CHOICES, MC_GOLD)
    if metrics is not None:
        task.spec.metric_names = metrics
    return task


def test_scores_report_exactly_the_metrics_a_task_defines(tmp_path):
    """lm-eval's winogrande/default.yaml lists acc only; arc_easy lists acc and acc_norm. The store computes
    acc_norm for both, and shows it only where it is defined: in scores(), ``results --json`` and the export."""
    from typer.testing import CliRunner

    from hubmerge.cli import app

    store = ResultsStore(tmp_path / "results")
    wino = store.register_task(_defined("wino_like", ("acc",)))
    arc = store.register_task(_defined("arc_like", ("acc", "acc_norm")))
    unknown = store.register_task(_defined("unsaid", None))
    key = store.register_model(H[:1], name="m")
    for tkey in (wino, arc, unknown):
        store.add_logliks(rows_for(key, tkey, LL_A))
    by_task = {s.task: s for s in store.scores()}
    assert (by_task["wino_like"].acc, by_task["wino_like"].acc_norm, by_task["wino_like"].metrics) == (
        0.5,
        None,
        ("acc",),
    )
    assert (by_task["arc_like"].acc, by_task["arc_like"].acc_norm) == (0.5, 0.75)
    assert (by_task["unsaid"].acc_norm, by_task["unsaid"].metrics) == (0.75, None)  # unknown: what is computed
    assert {t["name"]: t["metrics"] for t in store.tasks()}["wino_like"] == ["acc"]

    res = CliRunner().invoke(app, ["results", "--results", str(tmp_path / "results"), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["task"]: r for r in json.loads(res.stdout)}
    assert "acc_norm" not in rows["wino_like"] and rows["wino_like"]["acc"] == 0.5
    assert "perplexity" not in rows["wino_like"] and "acc_mutual_info" not in rows["arc_like"]
    assert rows["arc_like"]["acc_norm"] == 0.75 and rows["unsaid"]["acc_norm"] == 0.75
    table = CliRunner().invoke(app, ["results", "--results", str(tmp_path / "results"), "--tasks", "wino_like"])
    assert table.exit_code == 0 and "acc_norm" not in table.stdout and "0.5000" in table.stdout

    out = store.export(tmp_path / "scores.csv", table="scores")
    exported = {r["task"]: r for r in csv.DictReader(out.open())}
    assert exported["wino_like"]["acc_norm"] == "" and float(exported["arc_like"]["acc_norm"]) == 0.75

    store.register_task(_defined("wino_like", ("acc", "acc_norm")))  # the definition changed: the latest wins
    assert {s.task: s for s in store.scores()}["wino_like"].acc_norm == 0.75
    store.register_task(_defined("wino_like", None))  # a registration that does not say keeps what is recorded
    assert {s.task: s for s in store.scores()}["wino_like"].metrics == ("acc", "acc_norm")


def test_a_version_2_store_reads_as_is_and_upgrades_with_unknown_metrics(mc):
    """A store from before tasks recorded their metrics: ``hubmerge results`` (read-only) reads it unupgraded, a
    writer upgrades it; its tasks' metrics are NULL, "unknown", and every computed metric is kept."""
    import duckdb

    store, tkey, ka, _ = mc
    store.add_logliks(rows_for(ka, tkey, LL_A))
    con = duckdb.connect(str(store.path))
    con.execute("ALTER TABLE tasks DROP COLUMN metrics")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    (old,) = ResultsStore(store.path, read_only=True).scores()
    assert (old.acc, old.acc_norm, old.metrics) == (0.5, 0.75, None)
    assert ResultsStore(store.path, read_only=True).tasks()[0]["metrics"] is None
    upgraded = ResultsStore(store.path)
    (score,) = upgraded.scores()
    assert (score.acc_norm, score.metrics) == (0.75, None)
    con = duckdb.connect(str(store.path), read_only=True)
    assert con.execute("SELECT value FROM meta").fetchall() == [(str(store_mod.SCHEMA_VERSION),)]
    assert con.execute("SELECT metrics FROM tasks").fetchall() == [(None,)]
    con.close()
    upgraded.register_task(_defined("toy_mc", ("acc",)))  # registered again by a run that knows its definition
    assert upgraded.scores()[0].acc_norm is None


def test_readers_wait_for_a_writer_between_batches(mc):
    store, tkey, ka, _ = mc
    store.add_logliks(rows_for(ka, tkey, LL_A))
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(store.path)!r}); print(1, flush=True); "
         "time.sleep(2)"],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"1"
        with pytest.raises(StoreError, match=r"in use by another process \(PID \d+\)"):
            ResultsStore(store.path, read_only=True, wait=0.2).scores()
        began = time.monotonic()
        reader = ResultsStore(store.path, read_only=True, wait=30)
        assert reader.scores()[0].acc == 0.5  # got in once the holder let go
        assert time.monotonic() - began > 0.5
        with pytest.raises(StoreError, match="read-only"):
            reader.register_model(H[:1], name="x")
    finally:
        holder.wait(timeout=30)


def write_safetensors(path: Path, payload: bytes) -> None:
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + payload)


def test_weight_hashes_of_a_folder(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    write_safetensors(single / "model.safetensors", b"abcd")
    want = hashlib.sha256((single / "model.safetensors").read_bytes()).hexdigest()
    assert weight_hashes_of_folder(single) == [want]
    cache = json.loads((Path(os.environ["HUBMERGE_CACHE"]) / "hashes.json").read_text())
    assert list(cache.values()) == [want]
    # same path, size and mtime: the remembered digest is used, the file is not re-read
    f = single / "model.safetensors"
    st = f.stat()
    write_safetensors(f, b"wxyz")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weight_hashes_of_folder(single) == [want]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for i in (1, 2):
        write_safetensors(sharded / f"model-0000{i}-of-00002.safetensors", bytes([i]) * 8)
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    recorded = {"model-00001-of-00002.safetensors": H[5], "config.json": H[6]}
    (sharded / "hubmerge.json").write_text(json.dumps({"files": recorded}))  # a merge output records its hashes
    second = hashlib.sha256((sharded / "model-00002-of-00002.safetensors").read_bytes()).hexdigest()
    assert weight_hashes_of_folder(sharded) == [H[5], second]

    # a Hugging Face cache snapshot: weight files link to blobs named by their sha256
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    write_safetensors(blobs / H[7], b"zz")
    (snap / "model.safetensors").symlink_to(blobs / H[7])
    assert weight_hashes_of_folder(snap) == [H[7]]

    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no weights found"):
        weight_hashes_of_folder(tmp_path / "empty")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SourceError, match="lists model-00002-of-00002.safetensors, which is missing"):
        weight_hashes_of_folder(sharded)
