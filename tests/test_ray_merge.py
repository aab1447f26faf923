"""``hubmerge merge --ray``: a real local Ray instance (two worker CPUs, no mock) writes a merge's shards.

Each test merges the same recipe on this machine first and then on Ray, into the same ``output.path`` (so even
``hubmerge.json``, which records the recipe, must come out the same), and compares every file byte for byte.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from factories import save_trajectory, write_recipe
from typer.testing import CliRunner

from hubmerge.cli.app import app
from hubmerge.errors import ClusterError, MissingExtraError
from hubmerge.io.cluster import RayOptions, import_ray
from hubmerge.merging.distributed import execute_on_ray
from hubmerge.merging.recipe import load_recipe
from hubmerge.workflows.merge import merge_recipe, plan_merge

SHARDS = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_trajectory(tmp_path_factory.mktemp("ckpts"), 3, fmt="sharded")


def local_then_ray_recipe(tmp_path: Path, trajectory: list[Path]) -> tuple[Path, Path]:
    """A three-shard recipe merged on this machine, its output moved to ``local/``; the recipe and that folder."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", trajectory, out, output={"path": str(out), "max_shard_size": "20KB"})
    merge_recipe(recipe)
    local = tmp_path / "local"
    out.rename(local)
    return recipe, local


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert set(SHARDS) <= set(names) and "model.safetensors.index.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_merge_on_ray_is_bit_identical_to_one_on_this_machine(ray_cluster, trajectory, tmp_path):
    recipe, local = local_then_ray_recipe(tmp_path, trajectory)
    res = CliRunner().invoke(app, ["merge", str(recipe), "--ray", "--quiet"])
    assert res.exit_code == 0, res.output
    assert_same_files(local, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "out", "r.yaml"]  # no partial folder left


def test_a_worker_killed_mid_task_is_retried_and_the_output_is_unchanged(ray_cluster, trajectory, tmp_path, crash_dir):
    recipe, local = local_then_ray_recipe(tmp_path, trajectory)
    flag = crash_dir / f"crash-once-{SHARDS[1]}"
    flag.touch()
    result = merge_recipe(recipe, ray=RayOptions())
    assert not flag.exists() and flag.with_name(flag.name + ".done").exists()  # the first attempt died
    assert_same_files(local, result.output)
    files = json.loads((result.output / "hubmerge.json").read_text())["files"]
    assert set(SHARDS) <= set(files)


def test_a_shard_failing_on_every_attempt_fails_the_merge_in_one_line_and_writes_nothing(
    ray_cluster, trajectory, tmp_path, crash_dir
):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", trajectory, out, output={"path": str(out), "max_shard_size": "20KB"})
    flag = crash_dir / f"crash-always-{SHARDS[0]}"
    flag.touch()
    try:
        res = CliRunner().invoke(app, ["merge", str(recipe), "--ray", "--quiet"])
    finally:
        flag.unlink()
    assert res.exit_code == ClusterError.exit_code
    # Ray's driver prints its own "(raylet) A worker died ..." notes as they happen; hubmerge's account is one line
    lines = [line for line in res.output.splitlines() if line.strip() and "(raylet)" not in line]
    assert len(lines) == 1 and SHARDS[0] in lines[0] and "2 attempts" in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output, no partial folder


def test_ray_missing_is_a_one_line_error(trajectory, tmp_path, monkeypatch):
    out = tmp_path / "out"
    plan = plan_merge(load_recipe(write_recipe(tmp_path / "r.yaml", trajectory, out)))
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    with pytest.raises(MissingExtraError, match=r"pip install 'hubmerge\[ray\]'"):
        import_ray()
    with pytest.raises(MissingExtraError):
        execute_on_ray(plan)
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), "--ray", "--quiet"])
    assert res.exit_code == 1, res.output
    assert res.output == "error: --ray needs Ray, an optional extra: pip install 'hubmerge[ray]'\n"
    assert not out.exists()


def seed_hub(hub_api, repo: str, folders: list[Path]) -> list[str]:
    """One branch per checkpoint, as Pythia publishes them; the branch names."""
    hub_api.create_repo(repo, exist_ok=True)
    hub_api.upload_folder(repo_id=repo, folder_path=folders[-1], commit_message="final model")
    names = [f"step{(i + 1) * 1000}" for i in range(len(folders))]
    for name, folder in zip(names, folders, strict=True):
        hub_api.create_branch(repo, branch=name)
        hub_api.upload_folder(repo_id=repo, folder_path=folder, revision=name, delete_patterns="*")
    return names


def test_a_merge_of_hub_cache_sources_on_ray_is_bit_identical_and_still_verifies_every_byte(
    ray_cluster, trajectory, tmp_path, hub, hub_api
):
    """Each task hashes the cached files its shard reads; a flipped byte in one is refused (exit 5), named."""
    seed_hub(hub_api, "org/tiny", trajectory)
    out = tmp_path / "out"
    sources = {"repo": "org/tiny", "select": {"last": 3}}
    recipe = tmp_path / "r.yaml"
    data = {"name": "test-merge", "sources": sources, "output": {"path": str(out), "max_shard_size": "20KB"}}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    cli = ["--endpoint", hub.url, "--quiet"]
    env = {"HF_TOKEN": "hf_test"}
    runner = CliRunner()
    assert runner.invoke(app, ["merge", str(recipe), *cli], env=env).exit_code == 0
    out.rename(tmp_path / "local")
    res = runner.invoke(app, ["merge", str(recipe), "--ray", *cli], env=env)
    assert res.exit_code == 0, res.output
    assert_same_files(tmp_path / "local", out)

    cached = sorted(Path(os.environ["HF_HUB_CACHE"]).rglob("snapshots/*/model-00001-of-*.safetensors"))[0]
    data = bytearray(cached.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # the tail: a shard's task hashes bytes no tensor of it needs
    cached.resolve().write_bytes(bytes(data))
    res = runner.invoke(app, ["merge", str(recipe), "--ray", "--force", *cli], env=env)
    assert res.exit_code == 5, res.output
    assert "does not match the sha256" in res.output and cached.name in res.output
    assert_same_files(tmp_path / "local", out)  # the earlier output is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no partial folder left


def poison(folder: Path, values: dict[str, float]) -> None:
    """Set the first element of some tensors of a saved single-file checkpoint."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    for name, v in values.items():
        state[name].view(-1)[0] = v
    save_file(state, path, metadata={"format": "pt"})


def test_nonfinite_counts_from_several_tasks_are_recorded_as_one_machine_records_them(
    ray_cluster, tmp_path_factory, tmp_path
):
    """``nonfinite: warn``: each task counts what its shard met; the driver's ``hubmerge.json`` is the same."""
    import torch

    tensors = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    paths = save_trajectory(tmp_path_factory.mktemp("nan"), 3, dtype=torch.float32)
    poison(paths[1], {tensors[0]: float("nan"), tensors[1]: float("inf")})
    out = tmp_path / "out"
    extra = {"output": {"path": str(out), "max_shard_size": "40KB"}}
    recipe = write_recipe(tmp_path / "r.yaml", paths, out, nonfinite="warn", **extra)
    merge_recipe(recipe)
    out.rename(tmp_path / "local")
    index = json.loads((tmp_path / "local" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index[tensors[0]] != index[tensors[1]]  # counted by two different tasks
    merge_recipe(recipe, ray=RayOptions())
    assert_same_files(tmp_path / "local", out)
    record = json.loads((out / "hubmerge.json").read_text())["nonfinite"]["sources"]
    assert [r["tensor"] for r in record] == tensors

    out2 = tmp_path / "out2"
    refused = write_recipe(tmp_path / "refuse.yaml", paths, out2, output={"path": str(out2), "max_shard_size": "40KB"})
    res = CliRunner().invoke(app, ["merge", str(refused), "--ray", "--quiet"])
    assert res.exit_code == 3 and "non-finite" in res.output, res.output
    assert not out2.exists() and not list(tmp_path.glob(".out2.*"))


def test_each_cached_file_is_hashed_by_the_tasks_that_read_it_and_every_file_by_one():
    from types import SimpleNamespace

    from hubmerge.io.checkpoint import SourceRef
    from hubmerge.merging.distributed import shard_sources
    from hubmerge.merging.plan import ShardPlan, TensorPlan

    a, b = TensorPlan("a", (2,), "F16", True), TensorPlan("b", (2,), "F16", True)
    ck = SimpleNamespace(tensors={"a": SimpleNamespace(file="f1"), "b": SimpleNamespace(file="f2")})
    hashes = {"f1": "h1", "f2": "h2", "f3": "h3"}  # f3 holds no planned tensor (a dropped alias, say)
    plan = SimpleNamespace(
        shards=[ShardPlan("s1", [a]), ShardPlan("s2", [b])],
        sources=[SourceRef(Path("/x"), "x", sha256=hashes), SourceRef(Path("/y"), "y")],
        checkpoints=[ck, ck],
    )
    per_shard = shard_sources(plan)  # type: ignore[arg-type]
    assert [refs[0].sha256 for refs in per_shard] == [{"f1": "h1", "f3": "h3"}, {"f2": "h2"}]
    assert [refs[1].sha256 for refs in per_shard] == [None, None]


@pytest.mark.parametrize(
    ("option", "said"),
    [
        (["--ray-gpus-per-task", "1"], "the Ray cluster has 0 GPUs in all"),
        (["--ray-cpus-per-task", "0"], "give a number above 0"),
    ],
)
def test_resources_no_task_could_get_are_one_line_usage_errors(ray_cluster, trajectory, tmp_path, option, said):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", trajectory, out)
    res = CliRunner().invoke(app, ["merge", str(recipe), "--ray", *option, "--quiet"])
    assert res.exit_code == 2 and said in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_model_of_one_shard_runs_as_one_task_and_is_bit_identical(ray_cluster, trajectory, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", trajectory, out)
    merge_recipe(recipe)
    out.rename(tmp_path / "local")
    merge_recipe(recipe, ray=RayOptions())
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir()) and "model.safetensors" in names
    assert all((out / n).read_bytes() == (tmp_path / "local" / n).read_bytes() for n in names)


def test_a_streamed_merge_on_ray_is_bit_identical_and_a_corrupt_byte_on_the_hub_is_refused(
    ray_cluster, trajectory, tmp_path, hub, hub_api, client, hf_cache
):
    """Each shard's task range-reads the Hub itself and verifies every file it reads; the driver's HF cache gets
    no weight byte, and a byte flipped in transit fails the run (exit 5) with the earlier output untouched."""
    seed_hub(hub_api, "org/tiny", trajectory)
    out = tmp_path / "out"
    data = {
        "name": "test-merge",
        "sources": {"repo": "org/tiny", "select": {"last": 3}, "fetch": "stream"},
        "output": {"path": str(out), "max_shard_size": "20KB"},
    }
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    merge_recipe(recipe, client)
    out.rename(tmp_path / "local")
    merge_recipe(recipe, client, ray=RayOptions())
    assert_same_files(tmp_path / "local", out)
    assert set(SHARDS) <= {p.name for p in out.iterdir()}  # three shards: three tasks, each streaming
    assert not [p for p in hf_cache.rglob("*.safetensors")]  # streamed: weights went nowhere on this machine

    hub.inject_corrupt("org/tiny", "model-00002-of-00002.safetensors")
    res = CliRunner().invoke(
        app, ["merge", str(recipe), "--ray", "--force", "--endpoint", hub.url, "--quiet"], env={"HF_TOKEN": "hf_test"}
    )
    assert res.exit_code == 5, res.output
    assert "model-00002-of-00002.safetensors does not match the sha256" in res.output
    assert_same_files(tmp_path / "local", out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_shards_come_back_to_the_driver_from_workers_that_do_not_share_the_output(ray_cluster, trajectory, tmp_path):
    recipe, local = local_then_ray_recipe(tmp_path, trajectory)
    result = merge_recipe(recipe, ray=RayOptions(output="driver"))
    assert_same_files(local, result.output)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_worker_that_cannot_see_the_output_returns_the_shard_unless_told_it_is_shared(trajectory, tmp_path):
    """The task itself, run here: ``auto`` sends the bytes back, ``shared`` refuses in one line."""
    from hubmerge.errors import OutputError
    from hubmerge.io.files import sha256_file
    from hubmerge.merging.distributed import shard_size, write_shard

    recipe, local = local_then_ray_recipe(tmp_path, trajectory)
    plan = plan_merge(load_recipe(recipe))
    unseen = str(tmp_path / "elsewhere" / ".out.partial")
    done = write_shard(plan, 1, plan.sources, unseen, threads=1)
    assert done.data is not None and len(done.data) == done.size == shard_size(plan.shards[1])
    assert done.file == SHARDS[1] and done.sha256 == sha256_file(local / SHARDS[1])
    assert done.data == (local / SHARDS[1]).read_bytes()
    with pytest.raises(OutputError, match="not visible on this Ray worker.*--ray-output auto"):
        write_shard(plan, 1, plan.sources, unseen, threads=1, output="shared")
    assert not (tmp_path / "elsewhere").exists()


def test_memory_no_node_could_offer_is_a_one_line_usage_error():
    """Ray would wait for ever for a task asking more memory than the cluster offers; the check says so first."""
    from types import SimpleNamespace

    from hubmerge.errors import InvalidValueError
    from hubmerge.io.cluster import check_resources

    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0, "memory": 8 * 2**30})
    check_resources(cluster, 1, 0, 4 * 2**30)  # fits: nothing said
    with pytest.raises(InvalidValueError, match=r"about 17.18 GB of memory, and the Ray cluster offers 8.59 GB"):
        check_resources(cluster, 1, 0, 16 * 2**30)
