"""`hubmerge sweep`: raw, averaged and ensembled series scored and compared; resumable; a recommendation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.workflows.sweep import recommend, run_sweep_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> tuple[list[Path], Path]:
    """Six checkpoints of the demo's tiny grammar model, and its minimal-pairs task."""
    from hubmerge.demo.grammar import write_minimal_pairs
    from hubmerge.demo.train import train_trajectory

    root = tmp_path_factory.mktemp("traj")
    ckpts = train_trajectory(root / "ckpts", steps=24, save_every=4, d_model=32, n_layers=1, n_heads=2, batch_size=8)
    pairs = write_minimal_pairs(root / "pairs.jsonl", 6, seed=3)
    return ckpts, pairs


def sweep_recipe(tmp_path: Path, ckpts: list[Path], pairs: Path, **sweep) -> Path:
    data = {
        "name": "tiny-sweep",
        "sources": [{"path": str(p)} for p in ckpts],
        "output": {"path": str(tmp_path / "sweep")},
        "evaluate": {"tasks": "blimp", "data": str(pairs), "results": str(tmp_path / "res")},
        "sweep": {"sizes": [1, 2, 3], "stride": 1, **sweep},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, trajectory):
    """One sweep, shared: the tests below check it, rerun it, and drive the CLI over it."""
    ckpts, pairs = trajectory
    root = tmp_path_factory.mktemp("sweep")
    recipe = sweep_recipe(root, ckpts, pairs)
    return root, recipe, run_sweep_recipe(recipe)


def test_sweep_scores_every_series_and_recommends(swept):
    root, _, report = swept
    comp = report.comparison
    # Aligned: every series covers the window ends the largest window (3) reaches, steps 12..24.
    assert comp.raw.steps == comp.averaged[2].steps == comp.averaged[3].steps == (12, 16, 20, 24)
    assert comp.ensembled[2].steps == comp.ensembled[3].steps == (12, 16, 20, 24)
    assert comp.averaged[3].labels[0] == "step4..step12" and comp.ensembled[2].labels[0] == "step8..step12"
    assert report.windows == 9  # every window was still built and scored
    for ts in comp.raw.tasks.values():  # per-example metrics are present, since the store holds every example
        assert ts.flip_rate is not None and ts.instability_score is not None and ts.gold_prob_mtv is not None
    # Every averaged window was scored and then deleted (not kept), leaving only its provenance.
    out = root / "sweep"
    assert len(list(out.glob("*.deleted.json"))) == 9
    assert not [p for p in out.iterdir() if p.is_dir() and p.name != "report"]
    rec = report.recommendation
    assert rec["window_size"] in (2, 3) and "flip rate" in rec["how"]
    assert (out / "report" / "stability.csv").is_file() and (out / "report" / "stability-flip-rate.png").is_file()
    assert json.loads((out / "report" / "recommendation.json").read_text()) == rec


def test_the_recommendation_says_how_sure_it_is(swept, trajectory):
    """How many examples the pick rests on, its score's standard error (lm-eval's acc_stderr), 95% bootstrap
    intervals of the instability of its size and of the size it is compared with, and the paired difference
    from the last raw checkpoint: each checked against a computation made here."""
    import math

    import numpy as np

    _, _, report = swept
    _, pairs = trajectory
    comp, rec = report.comparison, report.recommendation
    n = len(pairs.read_text().splitlines())  # 7 paradigms x 6 pairs, every one loaded and scored
    assert rec["n_examples"] == {"blimp": n} and rec["n_examples_total"] == n
    p = rec["mean_score"]  # one task, the pooled group: its accuracy over the n pooled examples
    assert rec["stderr"]["blimp"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12)
    assert rec["mean_score_stderr"] == pytest.approx(rec["stderr"]["blimp"], rel=1e-12)

    low, high = rec["instability_interval"]
    assert low <= rec["instability"] <= high and low < high
    other = rec["compared"]
    assert other["window_size"] in (2, 3) and other["window_size"] != rec["window_size"]
    assert other["role"] in ("lowest", "runner-up")
    assert other["instability"] == pytest.approx(comp.averaged[other["window_size"]].tasks["blimp"].flip_rate)
    assert other["instability_interval"][0] <= other["instability"] <= other["instability_interval"][1]
    assert "bootstrap" in rec["interval"] and "1000 resamples, seed 0" in rec["interval"]
    again = recommend(comp, ["blimp"])  # a fixed seed: the same intervals every time
    assert again["instability_interval"] == rec["instability_interval"] and again["compared"] == other

    vs = rec["versus_last"]
    last = float(comp.raw.scores["blimp"][-1])
    assert vs["checkpoint"] == comp.raw.labels[-1] == "step24" and vs["n_examples"] == n
    assert vs["last_score"] == pytest.approx(last) and vs["difference"] == pytest.approx(p - last, abs=1e-12)
    lo, hi = vs["interval"]
    assert lo <= vs["difference"] <= hi
    assert vs["distinguishable"] == (lo > 0 or hi < 0)
    # the paired standard error: lm-eval's acc_stderr of the per-example differences (window minus last)
    i = comp.averaged[rec["window_size"]].labels.index(rec["window"])
    diff = comp.averaged[rec["window_size"]].examples["blimp"].correct[i] - comp.raw.examples["blimp"].correct[-1]
    assert vs["stderr"] == pytest.approx(np.std(diff, ddof=1) / math.sqrt(n), rel=1e-12)


def test_sweep_pools_a_group_and_plots_it_instead_of_its_paradigms(swept):
    _, _, report = swept
    comp = report.comparison
    paradigms = [t for t in comp.raw.tasks if t.startswith("blimp_")]
    assert len(paradigms) == 7 and "blimp" in comp.raw.tasks
    for series in (comp.raw, comp.averaged[3], comp.ensembled[2]):
        pooled = series.tasks["blimp"]
        parts = [series.tasks[t] for t in paradigms]
        n = sum(ts.n_examples for ts in parts)
        assert pooled.n_examples == n
        # Pooled = size-weighted mean of the paradigms, for the score and for the per-example metrics.
        for attr in ("mean", "flip_rate", "instability_score", "gold_prob_mtv"):
            expected = sum(getattr(ts, attr) * ts.n_examples for ts in parts) / n
            assert getattr(pooled, attr) == pytest.approx(expected, abs=1e-12)
        for i in range(len(series.labels)):
            expected = sum(series.scores[t][i] * series.tasks[t].n_examples for t in paradigms) / n
            assert series.scores["blimp"][i] == pytest.approx(expected, abs=1e-12)


def test_sweep_unaligned_keeps_every_window_end(tmp_path, swept, trajectory):
    root, _, _ = swept
    ckpts, pairs = trajectory
    recipe = sweep_recipe(tmp_path, ckpts, pairs, align=False)
    data = yaml.safe_load(recipe.read_text())
    data["evaluate"]["results"] = str(root / "res")  # the scores are stored already: nothing is rescored
    data["evaluate"]["limit"] = {"blimp": 4}
    recipe.write_text(yaml.safe_dump(data))
    comp = run_sweep_recipe(recipe).comparison
    assert [len(comp.raw.labels), len(comp.averaged[2].labels), len(comp.averaged[3].labels)] == [6, 5, 4]
    assert comp.raw.tasks["blimp"].n_examples == 4 * 7  # the limit applies to each paradigm of the group


def test_sweep_rerun_skips_finished_windows_and_scores(swept):
    _, recipe, first = swept
    again = run_sweep_recipe(recipe)
    assert again.bytes_read == 0  # no window recomputed
    assert again.recommendation == first.recommendation
    assert again.comparison.to_dict() == first.comparison.to_dict()


def test_recommendation_prefers_low_instability_then_score():
    from hubmerge.stability.report import StabilityReport, compare

    def series(scores):
        return StabilityReport.build([(f"w{i}", i, {"t": s}) for i, s in enumerate(scores)])

    comp = compare(series([0.5, 0.7, 0.5, 0.7]), {2: series([0.6, 0.62, 0.6]), 4: series([0.9])})
    rec = recommend(comp)
    assert rec["window_size"] == 2 and rec["window"] == "w1"  # size 4 has one window: no instability to measure
    # aggregate scores only: nothing to count examples or resample from, and nothing invented
    assert rec["n_examples_total"] is None and rec["mean_score_stderr"] is None
    assert rec["instability_interval"] is None and rec["compared"] is None


def test_sweep_command_and_missing_blocks(tmp_path, swept, trajectory):
    _, recipe, _ = swept
    res = runner.invoke(app, ["sweep", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "recommended:" in res.output and "average w=2" in res.output
    assert "rests on 42 examples (blimp 42), standard error" in res.output
    assert "versus the last checkpoint step24" in res.output and "95% bootstrap" in res.output
    assert "sweep: blimp" in res.output and "sweep: blimp_" not in res.output  # the pooled row, not 7 paradigms
    ckpts, _ = trajectory
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "sources": [{"path": str(p)} for p in ckpts], "output": {"path": "o"}}))
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2 and "needs both a 'sweep:' block" in res.output


def test_a_weighted_sweep_weights_each_window_size_as_the_recipe_says(tmp_path, trajectory):
    """``method: weighted`` takes one list of shares per window size (``sweep.weights``), and each window uses it."""
    ckpts, pairs = trajectory
    recipe = sweep_recipe(tmp_path, ckpts[:4], pairs, sizes=[1, 2, 3], keep=True, weights={2: [1, 3], 3: [1, 1, 2]})
    data = yaml.safe_load(recipe.read_text())
    data["method"] = "weighted"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    report = run_sweep_recipe(recipe)
    assert report.windows == 5
    for folder in sorted((tmp_path / "sweep").glob("w*-step*")):
        prov = json.loads((folder / "hubmerge.json").read_text())
        expected = {2: [0.25, 0.75], 3: [0.25, 0.25, 0.5]}[prov["sweep"]["window"]["size"]]
        assert prov["method"] == "weighted" and prov["weights"] == expected, folder.name


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "weighted", "weights": [1, 1, 1, 1]}, "field 'weights': 'weights' gives one share per source"),
        ({"method": "weighted", "sweep": {"sizes": [2, 3], "weights": {2: [1, 1]}}}, "window size 3"),
        ({"method": "weighted", "sweep": {"sizes": [2], "weights": {2: [1, 1, 1]}}}, "has 3 shares; give 2"),
        ({"method": "weighted", "sweep": {"sizes": [2], "weights": {2: [0, 0]}}}, "not all zero"),
        ({"sweep": {"sizes": [2], "weights": {2: [1, 3]}}}, "only used with method 'weighted'"),
    ],
)
def test_a_sweep_recipe_with_unusable_weights_is_refused_at_load(tmp_path, trajectory, change, expected):
    ckpts, pairs = trajectory
    recipe = sweep_recipe(tmp_path, ckpts[:4], pairs)
    data = yaml.safe_load(recipe.read_text())
    data.update(change)
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    res = runner.invoke(app, ["sweep", str(recipe), "-q"])
    assert res.exit_code == 2, res.output
    assert "invalid recipe" in res.output and expected in res.output.replace("\n", " ")
    assert not (tmp_path / "sweep").exists()
