"""`hubmerge sweep`: raw, averaged and ensembled series scored and compared; resumable; a recommendation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.sweep import recommend, run_sweep_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> tuple[list[Path], Path]:
    """Six checkpoints of the demo's tiny grammar model, and its minimal-pairs task."""
    from hubmerge.grammar import write_minimal_pairs
    from hubmerge.train import train_trajectory

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
    return root, recipe, run_sweep_recipe(recipe, quiet=True)


def test_sweep_scores_every_series_and_recommends(swept):
    root, _, report = swept
    comp = report.comparison
    assert len(comp.raw.labels) == 6
    assert [len(comp.averaged[w].labels) for w in (2, 3)] == [5, 4]
    assert [len(comp.ensembled[w].labels) for w in (2, 3)] == [5, 4]
    assert report.windows == 9
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


def test_sweep_rerun_skips_finished_windows_and_scores(swept):
    _, recipe, first = swept
    again = run_sweep_recipe(recipe, quiet=True)
    assert again.bytes_read == 0  # no window recomputed
    assert again.recommendation == first.recommendation
    assert again.comparison.to_dict() == first.comparison.to_dict()


def test_recommendation_prefers_low_instability_then_score():
    from hubmerge.stability import StabilityReport, compare

    def series(scores):
        return StabilityReport.build([(f"w{i}", i, {"t": s}) for i, s in enumerate(scores)])

    comp = compare(series([0.5, 0.7, 0.5, 0.7]), {2: series([0.6, 0.62, 0.6]), 4: series([0.9])})
    rec = recommend(comp)
    assert rec["window_size"] == 2 and rec["window"] == "w1"  # size 4 has one window: no instability to measure


def test_sweep_command_and_missing_blocks(tmp_path, swept, trajectory):
    _, recipe, _ = swept
    res = runner.invoke(app, ["sweep", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "recommended:" in res.output and "average w=2" in res.output
    ckpts, _ = trajectory
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "sources": [{"path": str(p)} for p in ckpts], "output": {"path": "o"}}))
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2 and "needs both a 'sweep:' block" in res.output
