"""lm-eval's tasks scored by hubmerge (``--tasks lm_eval:NAME``) and hubmerge as an lm-eval model (HubmergeLM).

Both are checked against the session's real lm-eval archive (tests/lm_eval_archive.py): the same tiny checkpoints
on the dev Hub, scored by lm-eval's HF backend on the same local-data tasks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install 'hubmerge[lm-eval]'")

from lm_eval_archive import REPO, TASKS, plain_choices, plain_samples, runs_by_step  # noqa: E402

NAMES = "lm_eval:mini_group,lm_eval:mini_arc_mi,lm_eval:mini_cloze,lm_eval:mini_ppl"
NEAR_TIE = 1e-4


def invoke(*args: str):
    from hubmerge.cli.app import app

    return CliRunner().invoke(app, list(args))


def lm_eval_identity(results_file: Path, task: str) -> str:
    from hubmerge.results.lm_eval_samples import task_identity

    config = json.loads(results_file.read_text())["configs"][task]
    return task_identity({"task": task, **config})


def test_requests_are_the_ones_lm_eval_sent(archive, datasets_cache):
    from hubmerge.evaluation.tasks.lm_eval_tasks import load_lm_eval_tasks

    runs = runs_by_step(archive["out"])
    tasks = {t.name: t for t in load_lm_eval_tasks(NAMES.split(","), [archive["tasks"]])}
    assert sorted(tasks) == sorted(TASKS)
    assert tasks["mini_arc"].groups == ("mini_group",) and tasks["mini_cloze"].groups == ()
    for name, task in tasks.items():
        rows = plain_samples(runs[100], name)
        assert [ex.doc_id for ex in task.examples] == [r["doc_id"] for r in rows]
        assert task.doc_hashes == tuple(r["doc_hash"] for r in rows)
        assert task.data_hash == lm_eval_identity(runs[100], name)  # one store key for imported and scored rows
        for ex, row in zip(task.examples, rows, strict=True):
            sent = [tuple(a.values()) for a in row["arguments"].values()]
            if task.kind == "perplexity":
                assert sent == [(ex.text,)]
            else:
                assert sent == [(r.context, r.continuation) for r in (*ex.requests, *ex.unconditional)]
    assert tasks["mini_arc_mi"].mutual_info and not tasks["mini_arc"].mutual_info
    assert tasks["mini_arc"].spec.metrics == ["acc", "acc_norm"] and tasks["mini_blimp"].spec.metrics == ["acc"]


def test_eval_of_hub_revisions_equals_lm_eval(archive, lm_hub, tmp_path, datasets_cache):
    from hubmerge.results.store import ResultsStore

    results = tmp_path / "r"
    r = invoke(
        "eval", REPO, "--select", "{revisions: [step100, step200]}", "--tasks", NAMES,
        "--lm-eval-include", str(archive["tasks"]), "--results", str(results), "--endpoint", lm_hub.url, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    scores = {(s["model"], s["task"]): s for s in json.loads(r.output)["scores"]}
    runs = runs_by_step(archive["out"])
    store = ResultsStore(results, read_only=True)
    keys = {m["revision"]: m["model_key"] for m in store.models()}
    for step in (100, 200):
        lm = json.loads(runs[step].read_text())["results"]
        mine = {t: scores[(f"step{step}", t)] for t in TASKS}
        for task, metric in (
            ("mini_arc", "acc"),
            ("mini_arc", "acc_norm"),
            ("mini_blimp", "acc"),
            ("mini_cloze", "acc"),
            ("mini_arc_mi", "acc"),
            ("mini_arc_mi", "acc_mutual_info"),
        ):
            assert mine[task][metric] == pytest.approx(lm[task][f"{metric},none"], abs=1e-12), (step, task, metric)
        assert mine["mini_cloze"]["perplexity"] == pytest.approx(lm["mini_cloze"]["perplexity,none"], rel=1e-4)
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert mine["mini_ppl"][metric] == pytest.approx(lm["mini_ppl"][f"{metric},none"], rel=1e-4)
        for task in ("mini_arc", "mini_blimp"):  # example by example, lm-eval's log-likelihoods against ours
            (tkey,) = [t["task_key"] for t in store.tasks() if t["name"] == task]
            matrix = store.choice_matrix(keys[f"step{step}"], tkey)
            _, theirs, _ = plain_choices(runs[step], task)
            assert np.abs(matrix.ll - theirs).max() < 1e-3
            differ = np.flatnonzero(matrix.ll.argmax(axis=1) != theirs.argmax(axis=1))
            assert all(np.sort(theirs[i])[-1] - np.sort(theirs[i])[-2] < NEAR_TIE for i in differ)
    assert store.task_groups() == {"mini_group": ["mini_arc", "mini_blimp"]}


def test_imported_and_scored_rows_are_one_task_and_one_model(archive, lm_hub, tmp_path, datasets_cache):
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.imports import import_lm_eval
    from hubmerge.workflows.reports import stability_from_store

    results = tmp_path / "r"
    r = invoke(
        "eval", str(archive["folders"][0]), "--tasks", NAMES, "--lm-eval-include", str(archive["tasks"]),
        "--results", str(results), "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    before = ResultsStore(results, read_only=True).tasks()
    import_lm_eval([archive["out"]], results, _client(lm_hub))
    store = ResultsStore(results, read_only=True)
    assert [t["task_key"] for t in store.tasks()] == [t["task_key"] for t in before]
    assert len(store.models()) == 4  # the folder scored here is the Hub's step100: one model
    out = stability_from_store(results, repo=REPO)
    assert out.comparison.raw.labels == ("step100", "step200", "step300", "step400")


def _client(hub):
    from hubmerge.hub.client import HubClient

    return HubClient(endpoint=hub.url, token="hf_test", offline=False)


def test_recipe_evaluates_lm_eval_tasks_after_a_merge(archive, tmp_path, datasets_cache):
    from factories import write_recipe

    from hubmerge.results.store import ResultsStore

    results = tmp_path / "r"
    recipe = write_recipe(
        tmp_path / "merge.yaml",
        archive["folders"][:2],
        tmp_path / "merged",
        evaluate={
            "tasks": ["lm_eval:mini_blimp"],
            "lm_eval_include": str(archive["tasks"]),
            "results": str(results),
        },
    )
    r = invoke("merge", str(recipe), "-q")
    assert r.exit_code == 0, r.output
    rows = ResultsStore(results, read_only=True).scores("mini_blimp")
    assert len(rows) == 3 and all(row.n == 8 for row in rows)  # the merge and its two sources


# --- bad input ----------------------------------------------------------------------------------------------


def one_line(result, code: int, *parts: str) -> None:
    assert result.exit_code == code, result.output
    text = result.output.strip()
    assert "\n" not in text and "Traceback" not in text, text
    for part in parts:
        assert part in text, text


def test_a_generation_task_is_refused(archive, tmp_path, datasets_cache):
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "gen.yaml").write_text(
        "task: mini_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {archive['tasks'] / 'arc.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_text: query\ndoc_to_target: gold\ngeneration_kwargs:\n  until: ['\\n']\nmetadata:\n  version: 1\n"
    )
    r = invoke("eval", str(archive["folders"][0]), "--tasks", "lm_eval:mini_gen", "--lm-eval-include", str(folder))
    one_line(r, 2, "lm_eval:mini_gen", "generate_until")


def test_include_folder_without_yaml(archive, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no tasks here")
    r = invoke("eval", str(archive["folders"][0]), "--tasks", "lm_eval:mini_arc", "--lm-eval-include", str(empty))
    one_line(r, 2, str(empty), "no task YAML")
    r = invoke("eval", str(archive["folders"][0]), "--tasks", "lm_eval:x", "--lm-eval-include", str(tmp_path / "no"))
    one_line(r, 2, "no such folder")


def test_unknown_lm_eval_task_names_the_closest(archive):
    r = invoke(
        "eval", str(archive["folders"][0]), "--tasks", "lm_eval:mini_ark", "--lm-eval-include", str(archive["tasks"])
    )
    one_line(r, 2, "lm_eval:mini_ark", "mini_arc")


def test_data_option_does_not_apply_to_lm_eval_tasks(archive, tmp_path):
    r = invoke("eval", str(archive["folders"][0]), "--tasks", "lm_eval:mini_arc", "--data", str(tmp_path))
    one_line(r, 2, "lm_eval:mini_arc", "--data")


def test_without_lm_eval_installed_one_line_says_what_to_install(archive, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where the extra is missing
    r = invoke("eval", str(archive["folders"][0]), "--tasks", "lm_eval:mini_arc")
    one_line(r, 1, "pip install 'hubmerge[lm-eval]'")


def test_task_data_that_changed_under_the_same_config_is_caught(archive, tmp_path, datasets_cache):
    folder = tmp_path / "tasks"
    folder.mkdir()
    pairs = (archive["tasks"] / "pairs.jsonl").read_text().splitlines()
    data = folder / "pairs.jsonl"
    data.write_text("\n".join(pairs[:4]) + "\n")
    (folder / "pairs.yaml").write_text(
        (archive["tasks"] / "pairs.yaml")
        .read_text()
        .replace("mini_blimp", "mini_edit")
        .replace(str(archive["tasks"] / "pairs.jsonl"), str(data))
    )
    args = ["eval", str(archive["folders"][0]), "--tasks", "lm_eval:mini_edit", "--lm-eval-include", str(folder)]
    args += ["--results", str(tmp_path / "r"), "-q"]
    assert invoke(*args).exit_code == 0
    data.write_text("\n".join([pairs[5], *pairs[1:4]]) + "\n")  # doc 0 is now another pair
    one_line(invoke(*args), 1, "mini_edit", "example 0", "another document")


# --- HubmergeLM: hubmerge as one of lm-eval's models ------------------------------------------------------------


@pytest.fixture
def evaluate(archive):
    """lm-eval's own runner, leaving the process's random generators as they were (seeds None).

    ``bootstrap_iters=0``: no standard errors, which lm-eval computes in a forked ``multiprocessing.Pool``. Forking
    this many-threaded test process (dev Hub servers, Ray's SIGTERM handler left by an earlier ``--ray`` test) once
    left a pool worker that ignored the pool's SIGTERM, and the run hung. No test here reads the stderrs.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(archive["tasks"]))

    def run(model, tasks, **kwargs):
        return lm_eval.simple_evaluate(
            model=model,
            tasks=list(tasks),
            task_manager=manager,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            bootstrap_iters=0,
            **kwargs,
        )

    return run


def test_hubmerge_lm_gives_the_hf_backends_numbers_and_fills_the_store(
    archive, lm_hub, tmp_path, datasets_cache, evaluate
):
    from hubmerge.evaluation import HubmergeLM
    from hubmerge.results.keys import model_key, weight_hashes_of_folder
    from hubmerge.results.store import ResultsStore

    lm = HubmergeLM(
        pretrained=REPO, revision="step200", endpoint=lm_hub.url, token="hf_test", results=tmp_path / "r",
        include_path=str(archive["tasks"]),
    )  # fmt: skip
    got = evaluate(lm, ["mini_group", "mini_arc_mi", "mini_cloze", "mini_ppl"])["results"]
    hf_file = runs_by_step(archive["out"])[200]
    hf = json.loads(hf_file.read_text())["results"]
    for task in ("mini_arc", "mini_blimp", "mini_group", "mini_cloze"):
        assert got[task]["acc,none"] == pytest.approx(hf[task]["acc,none"], abs=1e-12), task
    assert got["mini_arc"]["acc_norm,none"] == pytest.approx(hf["mini_arc"]["acc_norm,none"], abs=1e-12)
    for metric in ("perplexity",):
        assert got["mini_cloze"][f"{metric},none"] == pytest.approx(hf["mini_cloze"][f"{metric},none"], rel=1e-4)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got["mini_ppl"][f"{metric},none"] == pytest.approx(hf["mini_ppl"][f"{metric},none"], rel=1e-4)
    store = ResultsStore(tmp_path / "r", read_only=True)
    (model,) = store.models()
    assert model["model_key"] == model_key(weight_hashes_of_folder(archive["folders"][1]))
    assert model["revision"] == "step200" and model["step"] == 200
    stored = {s.task: s for s in store.scores()}
    assert {t["task_key"].split("@")[0] for t in store.tasks()} == set(TASKS)
    for t in store.tasks():
        assert t["data_hash"] == lm_eval_identity(hf_file, t["name"])  # the keys an import of lm-eval's files gets
    assert stored["mini_arc"].acc == pytest.approx(got["mini_arc"]["acc,none"])
    assert got["mini_arc_mi"]["acc_mutual_info,none"] == pytest.approx(hf["mini_arc_mi"]["acc_mutual_info,none"])
    assert stored["mini_arc_mi"].acc_mutual_info == pytest.approx(got["mini_arc_mi"]["acc_mutual_info,none"])
    assert stored["mini_ppl"].word_perplexity == pytest.approx(got["mini_ppl"]["word_perplexity,none"])
    assert not lm.notices


def test_hubmerge_lm_keys_other_prompts_apart(archive, tmp_path, datasets_cache, evaluate):
    from hubmerge.evaluation import HubmergeLM
    from hubmerge.results.store import ResultsStore

    lm = HubmergeLM(pretrained=str(archive["folders"][0]), results=tmp_path / "r", include_path=str(archive["tasks"]))
    evaluate(lm, ["mini_arc"], num_fewshot=1)
    (task,) = ResultsStore(tmp_path / "r", read_only=True).tasks()
    assert task["data_hash"] != lm_eval_identity(runs_by_step(archive["out"])[100], "mini_arc")
    assert any("other prompts" in n for n in lm.notices)


def test_hubmerge_is_an_lm_eval_model_name(archive, tmp_path, datasets_cache, evaluate):
    """``model="hubmerge"`` with lm-eval's own ``model_args`` string, as its CLI passes them."""
    import hubmerge.evaluation.lm_eval_model  # noqa: F401  (registers the name)
    from hubmerge.results.store import ResultsStore

    folder = archive["folders"][0]
    args = f"pretrained={folder},results={tmp_path / 'r'},include_path={archive['tasks']}"
    got = evaluate("hubmerge", ["mini_arc"], model_args=args)["results"]
    hf = json.loads(runs_by_step(archive["out"])[100].read_text())["results"]
    assert got["mini_arc"]["acc,none"] == pytest.approx(hf["mini_arc"]["acc,none"], abs=1e-12)
    assert [s.task for s in ResultsStore(tmp_path / "r", read_only=True).scores()] == ["mini_arc"]


def test_hubmerge_lm_refuses_generation_and_unknown_arguments(archive, tmp_path):
    from lm_eval.api.instance import Instance

    from hubmerge.errors import RecipeError
    from hubmerge.evaluation import HubmergeLM

    lm = HubmergeLM(pretrained=str(archive["folders"][0]), store=False)
    request = Instance("generate_until", {}, ("Question:", {"until": ["\n"]}), 0, ("mini_gen", 0, 1))
    with pytest.raises(NotImplementedError, match="mini_gen.*generate_until"):
        lm.generate_until([request])
    with pytest.raises(RecipeError, match="unknown model_args trust_remote_code"):
        HubmergeLM(pretrained=str(archive["folders"][0]), trust_remote_code=True)


def test_a_rolling_task_weighs_perplexity_with_its_own_counts(archive, tmp_path, datasets_cache):
    """Like lm-eval's wikitext: words and bytes counted on the page, the detokenised text scored."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hubmerge.evaluation import HubmergeLM

    folder = tmp_path / "wiki"
    folder.mkdir()
    pages = ["The cat @-@ like animal 's toy .", "A dog @-@ shaped cloud , and ( it ) ."]
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in pages))
    (folder / "utils.py").write_text(
        "import re\n\n"
        "def detokenize(doc):\n    return doc['page'].replace(' @-@ ', '-').replace(' .', '.')\n\n"
        "def process_results(doc, results):\n    (ll,) = results\n"
        "    words, n = len(re.split(r'\\s+', doc['page'])), len(doc['page'].encode('utf-8'))\n"
        "    return {'word_perplexity': (ll, words), 'byte_perplexity': (ll, n), 'bits_per_byte': (ll, n)}\n"
    )
    (folder / "wiki.yaml").write_text(
        f"task: mini_wiki\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pages.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: !function utils.detokenize\nprocess_results: !function utils.process_results\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1\n"
    )
    model = str(archive["folders"][0])
    r = invoke(
        "eval", model, "--tasks", "lm_eval:mini_wiki", "--lm-eval-include", str(folder), "--results",
        str(tmp_path / "r"), "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (ours,) = json.loads(r.output)["scores"]
    lm = HubmergeLM(pretrained=model, store=False)  # the same scorer, so lm-eval's numbers differ only by counting
    theirs = lm_eval.simple_evaluate(
        model=lm,
        tasks=["mini_wiki"],
        task_manager=TaskManager(include_path=str(folder)),
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        bootstrap_iters=0,  # no forked pool in this process: see the evaluate fixture
    )["results"]["mini_wiki"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-9), metric
    detok_words = sum(len(p.replace(" @-@ ", "-").replace(" .", ".").split()) for p in pages)
    assert detok_words != sum(len(p.split()) for p in pages)  # counting the scored text would give another number
