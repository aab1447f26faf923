"""``hubmerge sweep --ray``: a real local Ray instance (two worker CPUs, no mock) builds and scores a sweep.

The same recipe is swept once on this machine, its outputs moved aside, and then on Ray into the same paths (the
report records the recipe and the window folders), so the store's rows and every report file must come out equal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_hub_flow import seed
from test_stream import grammar  # noqa: F401 (the fixture, shared)
from test_stream import sweep_recipe as stream_sweep_recipe
from test_sweep import sweep_recipe, trajectory  # noqa: F401 (trajectory: the fixture, shared)
from typer.testing import CliRunner

from hubmerge.cli.app import app
from hubmerge.errors import ClusterError, OutputError, SourceError
from hubmerge.io.cluster import RayOptions
from hubmerge.results.store import ResultsStore
from hubmerge.workflows.sweep import run_sweep_recipe

# max_windows_on_disk 3: the nine windows of sizes 2 and 3 over six checkpoints are three passes (three tasks).
PASSES = 3


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, trajectory) -> Path:  # noqa: F811
    """A folder holding the recipe and the one-machine sweep's outputs, moved to ``local-sweep``/``local-res``;
    each test sweeps on Ray into ``sweep``/``res`` there, as the recipe says."""
    ckpts, pairs = trajectory
    root = tmp_path_factory.mktemp("ray-sweep")
    sweep_recipe(root, ckpts, pairs, max_windows_on_disk=3)
    run_sweep_recipe(root / "sweep.yaml")
    (root / "sweep").rename(root / "local-sweep")
    (root / "res").rename(root / "local-res")
    return root


@pytest.fixture
def fresh(base: Path) -> Path:
    """No Ray outputs left by an earlier test: each starts from nothing."""
    for name in ("sweep", "res"):
        shutil.rmtree(base / name, ignore_errors=True)
    return base


def store_rows(folder: Path) -> tuple[list, list, list]:
    """Everything the store holds that a sweep writes: scores, per-example predictions, log-likelihoods."""
    store = ResultsStore(folder)
    rows = []
    for table in ("predictions", "logliks"):
        path = store.export(folder.parent / f"{folder.name}-{table}.json", table=table)
        rows.append(sorted(json.dumps(r, sort_keys=True) for r in json.loads(path.read_text())))
        path.unlink()
    return sorted(map(repr, store.scores())), *rows  # type: ignore[return-value]


def assert_same_as_local(base: Path) -> None:
    assert store_rows(base / "res") == store_rows(base / "local-res")
    local, ray = base / "local-sweep", base / "sweep"
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(ray).as_posix() for p in ray.rglob("*") if p.is_file())
    assert "report/recommendation.json" in names and "report/stability.csv" in names
    for name in names:
        if not name.endswith(".png"):  # plots carry matplotlib's render details; the figures behind them are checked
            assert (local / name).read_bytes() == (ray / name).read_bytes(), name
    assert not [p for p in ray.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_a_sweep_on_ray_equals_one_on_this_machine(ray_cluster, fresh):
    res = CliRunner().invoke(app, ["sweep", str(fresh / "sweep.yaml"), "--ray", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert_same_as_local(fresh)


def test_a_worker_killed_mid_pass_is_retried_and_the_results_are_unchanged(ray_cluster, fresh, crash_dir):
    flag = crash_dir / "crash-once-pass-2"
    flag.touch()
    report = run_sweep_recipe(fresh / "sweep.yaml", ray=RayOptions())
    assert not flag.exists() and flag.with_name(flag.name + ".done").exists()  # it did kill a worker
    assert report.windows == 9
    assert_same_as_local(fresh)


def test_a_rerun_on_ray_skips_what_the_store_and_the_output_hold(ray_cluster, fresh):
    recipe = fresh / "sweep.yaml"
    run_sweep_recipe(recipe, ray=RayOptions())
    again = run_sweep_recipe(recipe, ray=RayOptions())
    assert again.bytes_read == 0 and again.windows == 9  # nothing rebuilt, every window's scores from the store
    # A driver stopped after a pass: a window it never handed over (no tombstone) is built again, alone.
    tomb = next((fresh / "sweep").glob("w3-*.deleted.json"))
    tomb.unlink()
    partly = run_sweep_recipe(recipe, ray=RayOptions())
    assert partly.bytes_read > 0 and tomb.exists()
    assert_same_as_local(fresh)


def test_a_pass_that_fails_twice_fails_the_sweep_in_one_line(ray_cluster, fresh, crash_dir):
    flag = crash_dir / "crash-always-pass-1"
    flag.touch()
    try:
        with pytest.raises(ClusterError, match=r"^sweep pass 1/3 \(w2-.*\): its Ray task failed on all 2 attempts"):
            run_sweep_recipe(fresh / "sweep.yaml", ray=RayOptions())
    finally:
        flag.unlink()
    assert not [p for p in (fresh / "sweep").iterdir() if p.name.startswith(".w2-")]  # nothing half-written


def test_a_streamed_sweep_on_ray_equals_one_here_and_its_workers_fetch_what_they_need(
    ray_cluster,
    tmp_path,
    hub,
    hub_api,
    client,
    hf_cache,
    grammar,  # noqa: F811
):
    """Workers stream the weights from the Hub themselves and, having HF caches of their own (see the fixture),
    download each window's config and tokenizer there; no weight byte reaches the driver's cache."""
    ckpts, pairs = grammar
    seed(hub_api, "org/grammar", ckpts, [p.name for p in ckpts])
    here = run_sweep_recipe(stream_sweep_recipe(tmp_path, "here", "stream", pairs), client)
    ray = run_sweep_recipe(stream_sweep_recipe(tmp_path, "ray", "stream", pairs), client, ray=RayOptions())
    # 5 windows and 4 raw copies, in 2 passes on Ray (one a CPU), in 1 here: each source streamed up to twice
    assert ray.windows == here.windows == 5 and here.bytes_read < ray.bytes_read <= 2 * here.bytes_read
    assert ray.comparison.to_dict() == here.comparison.to_dict() and ray.recommendation == here.recommendation
    assert store_rows(tmp_path / "res-ray") == store_rows(tmp_path / "res-here")
    assert not list(hf_cache.rglob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "sweep-ray").iterdir() if not p.name.endswith(".json")) == ["report"]


def test_workers_that_do_not_share_the_output_return_only_scores(ray_cluster, fresh):
    """``--ray-output driver``: each pass builds its windows in a folder of its own, scores and deletes them; the
    driver writes the tombstones, the store and the report, all equal to the one-machine sweep's."""
    cli = ["sweep", str(fresh / "sweep.yaml"), "--ray", "--ray-output", "driver", "-q"]
    kept = CliRunner().invoke(app, [*cli, "--keep"])
    assert kept.exit_code == OutputError.exit_code, kept.output
    assert "keeps its windows" in kept.output and "--no-keep" in kept.output
    assert not [p for p in (fresh / "sweep").iterdir() if p.name.startswith("w")]  # no window was committed
    res = CliRunner().invoke(app, cli)
    assert res.exit_code == 0, res.output
    assert_same_as_local(fresh)


def test_more_cpus_per_task_than_the_cluster_has_is_one_line(ray_cluster, fresh):
    res = CliRunner().invoke(app, ["sweep", str(fresh / "sweep.yaml"), "--ray", "--ray-cpus-per-task", "3", "-q"])
    assert res.exit_code == 2
    assert "--ray-cpus-per-task 3: the Ray cluster has 2 CPUs in all" in res.output
    assert not (fresh / "res").exists()  # refused before anything was scored


def test_a_scoring_task_that_fails_stops_the_run_with_its_own_error(ray_cluster, tmp_path, trajectory):  # noqa: F811
    """Scoring runs on Ray through the same reader of results as merges and passes: a hubmerge error raised in a
    task (here a model whose config does not load) comes back as itself, one line naming the folder."""
    from hubmerge.evaluation.runner import load_tasks, plan_eval, run_eval, target_from_folder

    ckpts, pairs = trajectory
    broken = tmp_path / "broken"
    shutil.copytree(ckpts[0], broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "no-such-architecture"}))
    store = ResultsStore(tmp_path / "res")
    tasks = load_tasks(["blimp"], data=pairs)
    plan = plan_eval([target_from_folder(ckpts[1]), target_from_folder(broken)], tasks, store)
    with pytest.raises(SourceError, match=r"broken: cannot load the model or its tokenizer"):
        run_eval(plan, store, use_ray=True)


def test_without_max_windows_on_disk_a_ray_sweep_makes_one_pass_a_task_the_cluster_runs_at_once(
    ray_cluster,
    tmp_path,
    trajectory,  # noqa: F811
):
    """Each pass builds and scores on one worker: on 2 CPUs the nine windows go into 2 passes of at most 5 (in
    order of their last source), and the bytes read are those 2 passes' shared reads."""
    from hubmerge.merging.sweep import plan_sweep
    from hubmerge.workflows.sweep import windows_per_pass

    assert [windows_per_pass(9, s) for s in (1, 2, 4, 9, 20)] == [9, 5, 3, 1, 1]
    ckpts, pairs = trajectory
    recipe = sweep_recipe(tmp_path, ckpts, pairs)
    report = run_sweep_recipe(recipe, ray=RayOptions())
    planned = plan_sweep(ckpts, [2, 3], tmp_path / "elsewhere", max_windows_on_disk=5)
    assert report.windows == 9 and len(planned.batches) == 2
    assert report.bytes_read == planned.bytes_read
