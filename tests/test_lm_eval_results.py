"""lm-eval result files: Pythia's published ones (../shared/data) and small files in each layout we read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubmerge.errors import StabilityError
from hubmerge.results.lm_eval import load_results, read_results, result_files
from hubmerge.stability.report import StabilityReport

PYTHIA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pythia-evals"
STEPS = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 3000]
STEPS += list(range(13000, 143001, 10000))


def _pythia(size: str) -> Path:
    folder = PYTHIA / f"pythia-{size}"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not here (tests read ../shared/data when it exists)")
    return folder


@pytest.mark.parametrize("size", ["160m", "410m"])
def test_pythia_files_ordered_by_step(size):
    traj = load_results(_pythia(size))
    assert traj.steps == STEPS
    assert traj.labels[0] == "step0" and traj.labels[-1] == "step143000"
    assert traj.model == f"EleutherAI/pythia-v1.1-{size}"
    assert {"lambada_openai", "piqa", "arc_easy", "arc_challenge", "sciq", "winogrande"} <= set(traj.scores)
    assert all(len(v) == 27 for v in traj.scores.values())
    # crows_pairs has no acc: left out, with the reason
    assert "pct_stereotype" in traj.skipped["crows_pairs_english"]


@pytest.mark.parametrize("task", ["piqa", "lambada_openai"])
def test_pythia_numbers_equal_the_json(task):
    folder = _pythia("160m")
    traj = load_results(folder, tasks=[task])
    for step in (1000, 143000):
        raw = json.loads((folder / f"160m_step{step}.json").read_text())["results"][task]
        i = traj.steps.index(step)
        assert traj.scores[task][i] == raw["acc"]
        assert traj.stderr[task][i] == raw["acc_stderr"]
    assert traj.metric == {task: "acc"}


def test_pythia_metric_override_and_preference():
    folder = _pythia("410m")
    traj = load_results(folder, ("acc_norm", "acc"), metrics={"lambada_openai": "ppl"}, tasks=["winogrande", "piqa"])
    assert traj.metric == {"winogrande": "acc", "piqa": "acc_norm"}  # winogrande has no acc_norm
    ppl = load_results(folder, metrics={"lambada_openai": "ppl"}, tasks=["lambada_openai"])
    last = json.loads((folder / "410m_step143000.json").read_text())["results"]["lambada_openai"]["ppl"]
    assert ppl.metric == {"lambada_openai": "ppl"} and ppl.scores["lambada_openai"][-1] == last
    with pytest.raises(StabilityError, match=r"task 'crows_pairs_english': none of the metrics acc in .*410m_step0"):
        load_results(folder, tasks=["crows_pairs_english"])


def test_pythia_points_feed_the_report():
    traj = load_results(_pythia("160m"), tasks=["piqa"])
    report = StabilityReport.build(traj.points(), metrics=traj.metric)
    piqa = report.tasks["piqa"]
    assert piqa.n_points == 27 and piqa.metric == "acc"
    s = traj.scores["piqa"]
    assert piqa.mtv == pytest.approx(sum(abs(s[i + 1] - s[i]) for i in range(26)) / 26, abs=1e-15)


# --- layouts and errors, on small files ---------------------------------------------------------------------------


def _v03(step: int, acc: float, model: str = "org/m") -> dict:
    return {
        "results": {"piqa": {"acc": acc, "acc_stderr": 0.01}, "wsc": {"acc": 0.5}},
        "versions": {"piqa": 0, "wsc": 0},
        "config": {"model": "hf-causal", "model_args": f"pretrained={model},revision=step{step}", "num_fewshot": 0},
    }


def _v04(step: int, acc: float) -> dict:
    return {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": acc, "acc_stderr,none": 0.01, "acc_norm,none": acc / 2},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": "N/A"},
        },
        "groups": {},
        "configs": {"piqa": {"task": "piqa"}},
        "versions": {"piqa": 1.0},
        "n-shot": {"piqa": 0},
        "config": {"model": "hf", "model_args": {"pretrained": "org/m", "revision": f"step{step}"}, "num_fewshot": 0},
        "model_name": "org/m",
    }


def _write(folder: Path, name: str, data: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_lm_eval_04_layout(tmp_path):
    _write(tmp_path, "results_2024-01-01.json", _v04(2000, 0.75))
    _write(tmp_path, "results_2024-01-02.json", _v04(1000, 0.5))
    f = read_results(tmp_path / "results_2024-01-01.json")
    assert (f.step, f.revision, f.model, f.num_fewshot) == (2000, "step2000", "org/m", 0)
    assert f.results["piqa"] == {"acc": 0.75, "acc_stderr": 0.01, "acc_norm": 0.375}  # ",none" dropped
    assert f.results["gsm8k"] == {"exact_match,strict-match": 0.125}  # other filters keep their name; "N/A" skipped
    traj = load_results(tmp_path)
    assert traj.steps == [1000, 2000] and traj.scores["piqa"].tolist() == [0.5, 0.75]
    assert "gsm8k" in traj.skipped


def test_step_from_file_name_and_mismatch(tmp_path):
    data = _v03(8, 0.5)
    data["config"]["model_args"] = "pretrained=org/m"
    assert read_results(_write(tmp_path, "m_step8.json", data)).step == 8
    assert read_results(_write(tmp_path, "m_step8.json", data), step=16).step == 16
    with pytest.raises(StabilityError, match=r"m_step9\.json: the file name says step 9 but .*revision=step8"):
        read_results(_write(tmp_path, "m_step9.json", _v03(8, 0.5)))
    bare = _write(tmp_path / "bare", "results.json", data)
    with pytest.raises(StabilityError, match=r"results\.json: no training step"):
        load_results([bare])


def test_duplicate_steps_and_mixed_models_refused(tmp_path):
    a = _write(tmp_path, "a_step1.json", _v03(1, 0.5))
    b = _write(tmp_path, "b_step1.json", _v03(1, 0.5))
    with pytest.raises(StabilityError, match=r"a_step1\.json and .*b_step1\.json are both step 1"):
        load_results([a, b])
    c = _write(tmp_path, "c_step2.json", _v03(2, 0.5, model="org/other"))
    with pytest.raises(StabilityError, match="different models.*org/m.*org/other"):
        load_results([a, c])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(StabilityError, match=r"broken\.json: not a JSON file"):
        read_results(_write(tmp_path, "broken.json", "{"))
    with pytest.raises(StabilityError, match=r"other\.json: no 'results' object"):
        read_results(_write(tmp_path, "other.json", {"a": 1}))
    with pytest.raises(StabilityError, match=r"nums\.json: results\['piqa'\]\['acc'\] is \[1\]"):
        read_results(_write(tmp_path, "nums.json", {"results": {"piqa": {"acc": [1]}}}))
    with pytest.raises(StabilityError, match=r"missing\.json: cannot read"):
        read_results(tmp_path / "missing.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StabilityError, match=r"empty: no \*\.json"):
        result_files(empty)


def test_nan_score_and_incomplete_task(tmp_path):
    ok = _write(tmp_path, "m_step1.json", _v03(1, 0.5))
    text = json.dumps(_v03(2, 0.5)).replace('"acc": 0.5, "acc_stderr"', '"acc": NaN, "acc_stderr"')
    nan = _write(tmp_path, "m_step2.json", text)
    with pytest.raises(StabilityError, match=r"m_step2\.json: task 'piqa' has acc = nan"):
        load_results([ok, nan])
    partial = _v03(3, 0.5)
    del partial["results"]["wsc"]
    p = _write(tmp_path, "m_step3.json", partial)
    traj = load_results([ok, p])
    assert "m_step3.json" in traj.skipped["wsc"] and list(traj.scores) == ["piqa"]
    with pytest.raises(StabilityError, match=r"task 'wsc': no results for it in .*m_step3\.json"):
        load_results([ok, p], tasks=["wsc"])


# --- groups: pooled rows as lm-eval aggregates them -----------------------------------------------------------


def test_pythia_mmlu_subjects_become_one_group(tmp_path):
    from hubmerge.workflows.reports import stability_from_lm_eval

    traj = load_results(_pythia("160m"))
    subjects = traj.groups["mmlu"]
    assert len(subjects) == 57 and all(s.startswith("hendrycksTest-") for s in subjects)
    mean = sum(traj.scores[s] for s in subjects) / len(subjects)
    assert traj.scores["mmlu"].tolist() == pytest.approx(mean.tolist(), abs=1e-15)
    assert "unweighted" in traj.group_notes["mmlu"] and "no task sizes" in traj.group_notes["mmlu"]
    assert "mmlu" in traj.headline and not set(subjects) & set(traj.headline)
    out = stability_from_lm_eval(_pythia("160m"), out=tmp_path)
    assert out.headline == traj.headline and len(out.headline) == len(traj.scores) - 57
    csv_tasks = [line.split(",")[0] for line in (tmp_path / "stability.csv").read_text().splitlines()[1:]]
    assert set(csv_tasks) == set(traj.scores)  # the CSV keeps every subject
    assert stability_from_lm_eval(_pythia("160m"), subtasks=True).headline is None


def _v04_group(step: int, accs: dict[str, float], sizes: dict[str, int] | None, own: float | None = None) -> dict:
    data = {
        "results": {t: {"alias": t, "acc,none": a} for t, a in accs.items()},
        "group_subtasks": {"g": list(accs)},
        "configs": {t: {"task": t} for t in accs},
        "config": {"model": "hf", "model_args": f"pretrained=org/m,revision=step{step}"},
    }
    if own is not None:
        data["results"]["g"] = {"alias": "g", "acc,none": own}
    if sizes is not None:
        data["n-samples"] = {t: {"original": n, "effective": n} for t, n in sizes.items()}
    return data


@pytest.mark.parametrize(
    ("sizes", "own", "expected", "note"),
    [
        ({"a": 100, "b": 300}, None, 0.8, "weighted by their sizes"),
        (None, None, 0.7, "unweighted"),
        ({"a": 100, "b": 300}, 0.123, 0.123, "lm-eval's own"),
    ],
)
def test_lm_eval_04_group_rows(tmp_path, sizes, own, expected, note):
    for step in (1, 2):
        _write(tmp_path, f"results_2024-01-0{step}.json", _v04_group(step, {"a": 0.5, "b": 0.9}, sizes, own))
    traj = load_results(tmp_path)
    assert traj.groups == {"g": ["a", "b"]} and traj.headline == ["g"]
    assert traj.scores["g"].tolist() == pytest.approx([expected, expected])
    assert note in traj.group_notes["g"]


def test_standalone_tasks_listed_with_no_members_are_tasks(tmp_path):
    """Early lm-eval 0.4 releases listed every standalone task in ``group_subtasks`` with an empty list."""
    for step in (1, 2):
        data = _v04(step, 0.5)
        data["group_subtasks"] = {"piqa": [], "gsm8k": []}
        _write(tmp_path, f"results_2024-01-0{step}.json", data)
    traj = load_results(tmp_path)
    assert "piqa" in traj.scores and traj.groups == {}
