"""``hubmerge results import``: real lm-evaluation-harness output, made by lm-eval itself, into the store.

One session-wide archive (tests/lm_eval_archive.py): four tiny checkpoints on the dev Hub as ``stepN`` branches,
evaluated by lm-eval's HF backend (which loads them from the dev Hub through the real client) on local-data tasks
with ``--log_samples``. The imported flip rate, instability score, gold-probability MTV and ensembles are checked
against a plain computation from the samples files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install 'hubmerge[lm-eval]'")

from lm_eval_archive import REPO, STEPS, TASKS, plain_choices, plain_samples, runs_by_step, softmax  # noqa: E402

from hubmerge.hub.client import HubClient  # noqa: E402


@pytest.fixture
def imported(archive, lm_hub, tmp_path):
    from hubmerge.hub.client import HubClient
    from hubmerge.workflows.imports import import_lm_eval

    results = tmp_path / "results"
    client = HubClient(endpoint=lm_hub.url, token="hf_test", offline=False)
    report = import_lm_eval([archive["out"]], results, client)
    return results, report, client


def test_lm_eval_writes_what_the_tests_rely_on(archive):
    runs = runs_by_step(archive["out"])
    assert list(runs) == list(STEPS)
    data = json.loads(runs[100].read_text())
    assert data["group_subtasks"]["mini_group"] == ["mini_arc", "mini_blimp"] or set(
        data["group_subtasks"]["mini_group"]
    ) == {"mini_arc", "mini_blimp"}
    for task in TASKS:
        assert plain_samples(runs[100], task)


def test_import_keys_rows_by_the_weights_so_eval_reuses_them(imported, archive):
    from hubmerge.results.keys import model_key, weight_hashes_of_folder
    from hubmerge.results.store import ResultsStore

    results, report, _ = imported
    assert report.runs == len(STEPS) and not report.notices
    assert sorted((c, t) for c, t, _ in report.imported) == sorted((f"step{s}", t) for s in STEPS for t in TASKS)
    store = ResultsStore(results, read_only=True)
    models = {m["revision"]: m for m in store.models()}
    for step, folder in zip(STEPS, archive["folders"], strict=True):
        m = models[f"step{step}"]
        assert m["model_key"] == model_key(weight_hashes_of_folder(folder))
        assert m["repo"] == REPO and m["step"] == step and m["commit"]
    record = store.import_record(models["step100"]["model_key"], next(k for k in store_task_keys(store, "mini_arc")))
    assert record["tool"] == "lm-eval" and record["tool_version"] and record["file"].endswith(".jsonl")


def store_task_keys(store, name: str) -> list[str]:
    return [t["task_key"] for t in store.tasks() if t["name"] == name]


def test_imported_scores_equal_lm_eval_aggregates(imported, archive):
    from hubmerge.results.store import ResultsStore

    results, _, _ = imported
    store = ResultsStore(results, read_only=True)
    by_step: dict = {}
    for row in store.scores():
        by_step.setdefault(row.step, {})[row.task] = row
    for step, f in runs_by_step(archive["out"]).items():
        lm = json.loads(f.read_text())["results"]
        mine = by_step[step]
        for task in ("mini_arc", "mini_blimp"):
            assert mine[task].acc == pytest.approx(lm[task]["acc,none"], abs=1e-12)
        assert mine["mini_arc"].acc_norm == pytest.approx(lm["mini_arc"]["acc_norm,none"], abs=1e-12)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert getattr(mine["mini_ppl"], metric) == pytest.approx(lm["mini_ppl"][f"{metric},none"], rel=1e-9)
        assert mine["mini_arc_mi"].acc == pytest.approx(lm["mini_arc_mi"]["acc,none"], abs=1e-12)
        assert mine["mini_arc_mi"].acc_mutual_info == pytest.approx(
            lm["mini_arc_mi"]["acc_mutual_info,none"], abs=1e-12
        )
        assert mine["mini_arc"].acc_mutual_info is None  # the task did not ask for it: lm-eval sent no such requests
        # the store computes acc_norm from the logged log-likelihoods, but the file reports none for the task
        assert "acc_norm,none" not in lm["mini_arc_mi"] and mine["mini_arc_mi"].acc_norm is None
        assert mine["mini_arc_mi"].metrics == ("acc", "acc_mutual_info")
        assert mine["mini_cloze"].acc == pytest.approx(lm["mini_cloze"]["acc,none"], abs=1e-12)
        assert mine["mini_cloze"].perplexity == pytest.approx(lm["mini_cloze"]["perplexity,none"], rel=1e-9)


def test_stability_of_imported_rows_equals_a_plain_computation(imported, archive):
    from hubmerge.workflows.reports import stability_from_store

    results, _, _ = imported
    runs = runs_by_step(archive["out"])
    out = stability_from_store(results, repo=REPO, ensembles=[2], subtasks=True)
    raw = out.comparison.raw
    assert raw.labels == tuple(f"step{s}" for s in STEPS)
    pooled_correct = []
    for task in ("mini_arc", "mini_blimp"):
        per = [plain_choices(runs[s], task) for s in STEPS]
        pred = np.stack([ll.argmax(axis=1) for _, ll, _ in per])
        gold = per[0][2]
        correct = (pred == gold).astype(float)
        prob = np.stack([softmax(ll)[np.arange(len(gold)), gold] for _, ll, _ in per])
        ts = raw.tasks[task]
        assert ts.n_examples == len(gold)
        assert ts.flip_rate == pytest.approx(np.abs(np.diff(correct, axis=0)).mean(axis=1).mean())
        assert ts.instability_score == pytest.approx((pred[1:] != pred[:-1]).mean(axis=1).mean())
        assert ts.gold_prob_mtv == pytest.approx(np.abs(np.diff(prob, axis=0)).mean(axis=1).mean())
        assert raw.scores[task].tolist() == pytest.approx(correct.mean(axis=1).tolist())
        pooled_correct.append(correct)
        # probability-averaging ensembles of each two neighbours, from lm-eval's own log-likelihoods
        ens_pred = np.stack([(softmax(per[t][1]) + softmax(per[t + 1][1])).argmax(axis=1) for t in range(3)])
        ens_correct = (ens_pred == gold).astype(float)
        ens = out.comparison.ensembled[2].tasks[task]
        assert out.comparison.ensembled[2].scores[task].tolist() == pytest.approx(ens_correct.mean(axis=1).tolist())
        assert ens.flip_rate == pytest.approx(np.abs(np.diff(ens_correct, axis=0)).mean(axis=1).mean())
        assert ens.instability_score == pytest.approx((ens_pred[1:] != ens_pred[:-1]).mean(axis=1).mean())
    # the group pools both tasks' examples, as lm-eval's size-weighted group acc does
    pooled = np.concatenate(pooled_correct, axis=1)
    assert raw.scores["mini_group"].tolist() == pytest.approx(pooled.mean(axis=1).tolist())
    for step, f in runs.items():
        group_acc = json.loads(f.read_text())["results"]["mini_group"]["acc,none"]
        assert raw.scores["mini_group"][STEPS.index(step)] == pytest.approx(group_acc)
    assert raw.tasks["mini_group"].flip_rate == pytest.approx(np.abs(np.diff(pooled, axis=0)).mean(axis=1).mean())


def test_majority_vote_from_lm_eval_log_likelihoods(imported, archive):
    from hubmerge.results.store import ResultsStore

    results, _, _ = imported
    runs = runs_by_step(archive["out"])
    store = ResultsStore(results, read_only=True)
    keys = {m["step"]: m["model_key"] for m in store.models()}
    (tkey,) = store_task_keys(store, "mini_arc")
    members = (200, 300, 400)
    got = store.ensemble([keys[s] for s in members], tkey)
    preds = [plain_choices(runs[s], "mini_arc")[1].argmax(axis=1) for s in members]
    gold = plain_choices(runs[400], "mini_arc")[2]
    expected = []
    for votes in zip(*preds, strict=True):
        counts = np.bincount(votes)
        best = set(np.flatnonzero(counts == counts.max()))
        expected.append(next(v for v in reversed(votes) if v in best))  # ties: the newest member's vote
    assert got["pred_majority"].tolist() == expected
    assert got["majority"] == pytest.approx(np.mean(np.array(expected) == gold))


def test_groups_are_pooled_in_tables_and_subtasks_behind_a_flag(imported, tmp_path):
    from hubmerge.workflows.reports import stability_from_store

    results, _, _ = imported
    shown = stability_from_store(results, repo=REPO, out=tmp_path / "a")
    assert shown.headline == ["mini_arc_mi", "mini_group"]  # mini_arc and mini_blimp are inside mini_group
    assert "size-weighted" in shown.group_notes["mini_group"]
    rows = (tmp_path / "a" / "stability.csv").read_text()
    assert "mini_arc" in rows and "mini_blimp" in rows and "mini_group" in rows  # the CSV keeps every task
    assert stability_from_store(results, repo=REPO, subtasks=True).headline is None


def test_importing_the_same_files_again_adds_nothing(imported, archive, tmp_path):
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.imports import import_lm_eval

    results, first, client = imported
    before = ResultsStore(results, read_only=True).export(tmp_path / "before.jsonl", table="logliks")
    again = import_lm_eval([archive["out"]], results, client)
    assert not again.imported and len(again.unchanged) == len(first.imported)
    after = ResultsStore(results, read_only=True).export(tmp_path / "after.jsonl", table="logliks")
    assert Path(before).read_bytes() == Path(after).read_bytes()


def copy_run(results_file: Path, dest: Path, date: str, edit=None) -> Path:
    """A copy of one lm-eval run under another date (a re-run of the same revision), optionally edited."""
    old = results_file.stem.removeprefix("results_")
    dest.mkdir(parents=True, exist_ok=True)
    for f in results_file.parent.glob(f"*{old}*"):
        target = dest / f.name.replace(old, date)
        shutil.copy(f, target)
        if edit is not None and f.name.startswith("samples_mini_arc"):
            rows = [json.loads(line) for line in target.read_text().splitlines()]
            target.write_text("".join(json.dumps(edit(r)) + "\n" for r in rows))
    return dest / f"results_{date}.json"


def test_newest_of_two_dates_wins_with_a_notice(archive, lm_hub, tmp_path):
    from hubmerge.hub.client import HubClient
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.imports import import_lm_eval

    runs = runs_by_step(archive["out"])
    folder = tmp_path / "two-dates"

    def flip_first_doc(row):
        if row["doc_id"] == 0:  # the re-run makes the last choice the likeliest
            row["filtered_resps"][-1][0] = "1.0"
            row["resps"][-1][0][0] = "1.0"
        return row

    copy_run(runs[200], folder, "2026-01-01T00-00-00.000000")
    newer = copy_run(runs[200], folder, "2026-02-01T00-00-00.000000", flip_first_doc)
    client = HubClient(endpoint=lm_hub.url, token="hf_test", offline=False)
    report = import_lm_eval([folder], tmp_path / "r", client)
    assert any("newer" in n and "mini_arc" in n for n in report.notices)
    store = ResultsStore(tmp_path / "r", read_only=True)
    key = store.models()[0]["model_key"]
    (tkey,) = store_task_keys(store, "mini_arc")
    expected = newer.name.replace("results_", "samples_mini_arc_") + "l"
    assert Path(store.import_record(key, tkey)["file"]).name == expected
    matrix = store.choice_matrix(key, tkey)
    assert matrix.ll[0, -1] == 1.0
    # the older file imported later into the same store is left out: the store already holds newer rows
    older_only = tmp_path / "older"
    copy_run(runs[200], older_only, "2025-12-01T00-00-00.000000")
    later = import_lm_eval([older_only], tmp_path / "r", client)
    assert not later.imported and any("newer import" in n for n in later.notices)
    assert ResultsStore(tmp_path / "r", read_only=True).choice_matrix(key, tkey).ll[0, -1] == 1.0


def test_cli_import_then_stability(archive, lm_hub, tmp_path):
    from hubmerge.cli.app import app

    runner = CliRunner()
    results = tmp_path / "results"
    r = runner.invoke(
        app, ["results", "import", str(archive["out"]), "--results", str(results), "--endpoint", lm_hub.url, "--json"]
    )
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert len(info["imported"]) == len(TASKS) * len(STEPS)
    r = runner.invoke(app, ["stability", "--results", str(results), "--repo", REPO, "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "mini_group (acc)" in r.output and "mini_arc (acc)" not in r.output and "mini_blimp" not in r.output
    r = runner.invoke(
        app, ["stability", "--results", str(results), "--repo", REPO, "--subtasks", "--out", str(tmp_path / "s2")]
    )
    assert r.exit_code == 0 and "mini_arc (acc)" in r.output and "mini_blimp (acc)" in r.output


# --- bad input: one line naming the file (and line), nothing half-imported ------------------------------------


def broken_copy(archive, tmp_path, edit_samples=None, edit_results=None, task="mini_blimp") -> Path:
    """Two runs (step100 intact, step200 broken) in one folder: the broken one must stop the whole PATH."""
    runs = runs_by_step(archive["out"])
    folder = tmp_path / "broken"
    copy_run(runs[100], folder, "2026-01-01T00-00-00.000000")
    bad = copy_run(runs[200], folder, "2026-01-02T00-00-00.000000")
    if edit_samples is not None:
        samples = folder / f"samples_{task}_2026-01-02T00-00-00.000000.jsonl"
        samples.write_text(edit_samples(samples.read_text()))
    if edit_results is not None:
        bad.write_text(edit_results(bad.read_text()))
    return folder


def assert_refused(folder: Path, tmp_path, lm_hub, *expected: str) -> None:
    from hubmerge.cli.app import app
    from hubmerge.results.store import ResultsStore

    results = tmp_path / "results"
    r = CliRunner().invoke(
        app, ["results", "import", str(folder), "--results", str(results), "--endpoint", lm_hub.url, "-q"]
    )
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "Traceback" not in line
    for part in expected:
        assert part in line, line
    if (results / "results.duckdb").exists():
        store = ResultsStore(results, read_only=True)
        assert not store.models() and not store.imports()


@pytest.mark.parametrize("cut", ["mid-line", "at a line end"])
def test_truncated_samples_file(archive, tmp_path, lm_hub, cut):
    def truncate(text):
        lines = text.splitlines(keepends=True)
        kept = "".join(lines[: len(lines) // 2])
        return kept + lines[len(lines) // 2][:40] if cut == "mid-line" else kept

    folder = broken_copy(archive, tmp_path, truncate)
    assert_refused(folder, tmp_path, lm_hub, "samples_mini_blimp_2026-01-02", "truncated")


def test_results_file_without_results(archive, tmp_path, lm_hub):
    def drop(text):
        data = json.loads(text)
        del data["results"]
        return json.dumps(data)

    folder = broken_copy(archive, tmp_path, edit_results=drop)
    assert_refused(folder, tmp_path, lm_hub, "results_2026-01-02", "no 'results'")


def test_log_likelihood_that_is_not_a_number(archive, tmp_path, lm_hub):
    def corrupt(text):
        lines = text.splitlines()
        row = json.loads(lines[2])
        row["filtered_resps"][0][0] = "nan"
        lines[2] = json.dumps(row)
        return "\n".join(lines) + "\n"

    folder = broken_copy(archive, tmp_path, corrupt)
    assert_refused(folder, tmp_path, lm_hub, "samples_mini_blimp_2026-01-02", ":3:", "not a number")


def test_doc_ids_that_disagree_with_another_revision(archive, tmp_path, lm_hub):
    def swap(text):
        rows = [json.loads(line) for line in text.splitlines()]
        a = next(r for r in rows if r["doc_id"] == 0)
        b = next(r for r in rows if r["doc_id"] == 1)
        a["doc_hash"], b["doc_hash"] = b["doc_hash"], a["doc_hash"]  # the same ids, other documents
        return "".join(json.dumps(r) + "\n" for r in rows)

    folder = broken_copy(archive, tmp_path, swap)
    assert_refused(folder, tmp_path, lm_hub, "samples_mini_blimp_2026-01-02", "doc_id", "another document")


def test_a_run_that_names_no_revision(archive, tmp_path, lm_hub):
    def anonymous(text):
        data = json.loads(text)
        data["config"]["model_args"] = f"pretrained={REPO}"
        data["config"].pop("model_revision", None)
        data["config"].pop("model_sha", None)
        return json.dumps(data)

    folder = broken_copy(archive, tmp_path, edit_results=anonymous)
    assert_refused(folder, tmp_path, lm_hub, "results_2026-01-02", "--revision")


def test_revision_given_on_the_command_line(archive, tmp_path, lm_hub):
    from hubmerge.cli.app import app
    from hubmerge.results.store import ResultsStore

    runs = runs_by_step(archive["out"])
    folder = tmp_path / "one"
    copy_run(runs[300], folder, "2026-01-01T00-00-00.000000")
    r = CliRunner().invoke(
        app,
        ["results", "import", str(folder), "--results", str(tmp_path / "r"), "--endpoint", lm_hub.url,
         "--repo", REPO, "--revision", "step300", "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (m,) = ResultsStore(tmp_path / "r", read_only=True).models()
    assert m["revision"] == "step300" and m["step"] == 300


def test_old_json_list_layout(archive, tmp_path, lm_hub):
    """lm-eval 0.4.0-0.4.2 wrote each task's samples as one indented JSON list named ``<model_args>_<task>.jsonl``."""
    from hubmerge.hub.client import HubClient
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.imports import import_lm_eval

    runs = runs_by_step(archive["out"])
    date = runs[100].stem.removeprefix("results_")
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(runs[100], folder / "results.json")
    for task in TASKS:
        lines = (runs[100].parent / f"samples_{task}_{date}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        (folder / f"pretrained__me__tiny-traj,revision__step100_{task}.jsonl").write_text(json.dumps(rows, indent=2))
    client = HubClient(endpoint=lm_hub.url, token="hf_test", offline=False)
    import_lm_eval([folder], tmp_path / "old-r", client)
    import_lm_eval([runs[100]], tmp_path / "new-r", client)
    old = ResultsStore(tmp_path / "old-r", read_only=True).scores()
    new = ResultsStore(tmp_path / "new-r", read_only=True).scores()
    assert old == new and len(old) == len(TASKS)


def test_a_folder_without_results_files(tmp_path):
    from hubmerge.cli.app import app

    empty = tmp_path / "nothing"
    empty.mkdir()
    r = CliRunner().invoke(app, ["results", "import", str(empty), "--results", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no lm-eval results files" in r.output


def test_standalone_tasks_listed_as_empty_groups_are_imported(archive, tmp_path, lm_hub):
    """Early lm-eval 0.4 releases wrote ``group_subtasks: {"task": []}`` for every task outside a group."""
    from hubmerge.workflows.imports import import_lm_eval

    runs = runs_by_step(archive["out"])

    results_file = copy_run(runs[100], tmp_path / "early", "2026-01-01T00-00-00.000000")
    data = json.loads(results_file.read_text())
    data["group_subtasks"] = {**data["group_subtasks"], "mini_cloze": [], "mini_ppl": [], "mini_arc_mi": []}
    results_file.write_text(json.dumps(data))
    report = import_lm_eval([tmp_path / "early"], tmp_path / "r", HubClient(endpoint=lm_hub.url, offline=False))
    assert sorted(t for _, t, _ in report.imported) == sorted(TASKS)


def test_offline_import_asks_the_hub_nothing(archive, lm_hub, tmp_path):
    """Offline, rows are keyed by name at once: no request, no retry sleeping (offline errors are not transient)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from hubmerge.hub.client import is_transient
    from hubmerge.workflows.imports import import_lm_eval

    assert not is_transient(OfflineModeIsEnabled("offline"))
    before = len(lm_hub.requests)
    report = import_lm_eval([archive["out"]], tmp_path / "r", HubClient(endpoint=lm_hub.url, offline=True))
    assert len(lm_hub.requests) == before
    assert len(report.imported) == len(STEPS) * len(TASKS)
    assert any("keyed by name" in n for n in report.notices)


def test_an_unreachable_hub_is_tried_once_not_per_revision(archive, tmp_path, monkeypatch):
    """A closed port: the first revision's lookup fails (after its retries); the other three do not wait again."""
    import socket

    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.imports import import_lm_eval

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls = []
    client = HubClient(endpoint=f"http://127.0.0.1:{port}", offline=False, tries=2)
    original = HubClient.retry

    def counted(self, fn, *args, **kwargs):
        calls.append(fn)
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(HubClient, "retry", counted)  # hubmerge's own wrapper; huggingface_hub runs unchanged
    report = import_lm_eval([archive["out"]], tmp_path / "r", client)
    assert len(calls) == 1
    assert len(ResultsStore(tmp_path / "r", read_only=True).models()) == len(STEPS)
    assert any("keyed by name" in n for n in report.notices)


def test_reading_only_the_scores_of_the_same_documents_equals_a_full_read(archive):
    """The importer's fast path (later revisions of a task) gives exactly what reading the whole file gives."""
    from dataclasses import fields

    from hubmerge.results.lm_eval_samples import read_run, read_samples

    runs = {step: read_run(f) for step, f in runs_by_step(archive["out"]).items()}
    fast_used = 0
    for name in TASKS:
        task = runs[100].tasks[name]
        reference = read_samples(runs[100].samples[name], task)
        for step in STEPS[1:]:
            path = runs[step].samples[name]
            full = read_samples(path, task)
            fast = read_samples(path, task, like=reference)
            fast_used += fast.target is reference.target
            for f in fields(full):
                a, b = getattr(full, f.name), getattr(fast, f.name)
                if isinstance(a, np.ndarray):
                    np.testing.assert_array_equal(a, b, err_msg=f"{name} step{step} {f.name}")
                else:
                    assert a == b, (name, step, f.name)
    rolling = sum(runs[100].tasks[n].output_type == "loglikelihood_rolling" for n in TASKS)
    assert fast_used == (len(TASKS) - rolling) * (len(STEPS) - 1)  # every other task took the fast path
