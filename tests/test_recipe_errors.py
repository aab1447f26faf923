"""Bad recipes and mismatched sources: one clear line naming file and field, the right exit code, nothing written."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from factories import save_trajectory, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.io.writer import stale_partials
from hubmerge.merging.recipe import load_recipe

runner = CliRunner()
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run_merge(recipe: Path) -> tuple[int, str]:
    res = runner.invoke(app, ["merge", str(recipe), "--quiet"])
    return res.exit_code, res.output


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert stale_partials(tmp_path) == []


@pytest.fixture
def two(tmp_path):
    return save_trajectory(tmp_path / "ckpts", 2)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"mehtod": "uniform"}, "field 'mehtod': unknown key"),
        ({"output": {"path": "x", "shard": "1GB"}}, "field 'output.shard': unknown key"),
        ({"name": None}, "field 'name'"),
        ({"method": "median"}, "field 'method': Input should be 'uniform', 'weighted' or 'ema'"),
        ({"method": "weighted", "weights": [1, 2, 3]}, "'weights' has 3 entries but there are 2 sources"),
        ({"method": "weighted"}, "method 'weighted' needs 'weights'"),
        ({"weights": [1, 1]}, "'weights' is only used with method 'weighted'"),
        ({"method": "weighted", "weights": [1, -1]}, "non-negative"),
        ({"method": "ema", "ema": {"decay": 1.5}}, "field 'ema.decay': must be strictly between 0 and 1 (got 1.5)"),
        ({"method": "ema", "ema": {"decay": 0}}, "field 'ema.decay': must be strictly between 0 and 1"),
        ({"method": "ema"}, "method 'ema' needs 'ema: {decay: ...}'"),
        ({"dtype": "int8"}, "field 'dtype'"),
        ({"output": {"path": "x", "max_shard_size": "5 parsecs"}}, "field 'output.max_shard_size'"),
        ({"sources": []}, "field 'sources'"),
        ({"sources": "ckpts"}, "field 'sources'"),
        (
            {"evaluate": {"tasks": "blimp", "limit": 0}},
            "field 'evaluate.limit': a limit is a positive number of examples (got 0)",
        ),
        ({"evaluate": {"tasks": "blimp", "limit": {"arc_easy": 5}}}, "limit names arc_easy, not in 'tasks'"),
        ({"evaluate": {"tasks": "blimp", "limit": {"blimp": -1}}}, "a limit is a positive number of examples (got -1)"),
    ],
)
def test_bad_recipe_fields(tmp_path, two, change, expected):
    recipe = write_recipe(tmp_path / "r.yaml", two, tmp_path / "out")
    data = yaml.safe_load(recipe.read_text())
    data.update(change)
    if data.get("name") is None:
        del data["name"]
    recipe.write_text(yaml.safe_dump(data))
    code, output = run_merge(recipe)
    assert code == 2
    assert output.startswith(f"error: {recipe}: invalid recipe:")
    assert expected in output.replace("\n", " ")
    assert "Traceback" not in output
    assert_nothing_written(tmp_path)


def test_missing_field_is_named(tmp_path, two):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "sources": [{"path": str(two[0])}]}))
    code, output = run_merge(recipe)
    assert code == 2 and "field 'output': required field is missing" in output


def test_missing_source_path_names_the_field(tmp_path, two):
    recipe = write_recipe(tmp_path / "r.yaml", [two[0], tmp_path / "nowhere"], tmp_path / "out")
    code, output = run_merge(recipe)
    assert code == 2
    assert f"field 'sources.1.path': '{tmp_path / 'nowhere'}' does not exist" in output
    assert_nothing_written(tmp_path)


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nsources: [\n")
    code, output = run_merge(bad)
    assert code == 2 and f"{bad}: line" in output and "not valid YAML" in output
    bad.write_text("- just\n- a list\n")
    code, output = run_merge(bad)
    assert code == 2 and "a recipe must be a YAML mapping" in output
    code, output = run_merge(tmp_path / "absent.yaml")
    assert code == 2 and "recipe file not found" in output


def test_output_inside_a_source_is_refused(tmp_path, two):
    recipe = write_recipe(tmp_path / "r.yaml", two, two[0] / "merged")
    code, output = run_merge(recipe)
    assert code == 2 and "field 'output.path'" in output and "overlaps source 0" in output


def test_missing_tensor_names_first_difference_and_both_sources(tmp_path, two):
    state = load_file(two[1] / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, two[1] / "model.safetensors", metadata={"format": "pt"})
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", two, tmp_path / "out"))
    assert code == 3
    assert f"tensor 'model.layers.1.mlp.up_proj.weight' is in {two[0]} but not in {two[1]}" in output
    assert_nothing_written(tmp_path)


def test_shape_mismatch_names_tensor_and_sources(tmp_path, two):
    state = load_file(two[0] / "model.safetensors")
    state["model.norm.weight"] = torch.ones(16, dtype=torch.float16)
    save_file(state, two[0] / "model.safetensors", metadata={"format": "pt"})
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", two, tmp_path / "out"))
    assert code == 3
    assert f"tensor 'model.norm.weight' has shape [16] in {two[0]} but [32] in {two[1]}" in output
    assert_nothing_written(tmp_path)


def test_differing_integer_buffers_are_refused_and_nothing_is_written(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 3, fmt="bin")
    state = torch.load(paths[2] / "pytorch_model.bin", weights_only=True)
    state["model.layers.1.self_attn.positions"][3] = 99
    torch.save(state, paths[2] / "pytorch_model.bin")
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out"))
    assert code == 3
    assert "non-floating tensor 'model.layers.1.self_attn.positions' differs between" in output
    assert str(paths[2]) in output
    assert_nothing_written(tmp_path)


def test_index_naming_an_absent_shard(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 2, fmt="sharded")
    index = json.loads((paths[1] / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (paths[1] / shard).unlink()
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out"))
    assert code == 3 and f"names shard '{shard}', which is missing" in output
    assert_nothing_written(tmp_path)


def test_truncated_safetensors_is_refused(tmp_path, two):
    data = (two[1] / "model.safetensors").read_bytes()
    (two[1] / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", two, tmp_path / "out"))
    assert code == 3 and "truncated or corrupt" in output
    assert_nothing_written(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("owned",))


def test_bin_with_arbitrary_objects_is_never_unpickled(tmp_path, capfd):
    paths = save_trajectory(tmp_path / "ckpts", 2, fmt="bin")
    state = torch.load(paths[1] / "pytorch_model.bin", weights_only=True)
    state["evil"] = Payload()
    torch.save(state, paths[1] / "pytorch_model.bin", pickle_module=pickle)
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out"))
    assert code == 3 and "refused to load" in output and "never unpickles" in output
    assert "owned" not in capfd.readouterr().out
    assert_nothing_written(tmp_path)


def test_no_weights_in_folder(tmp_path, two):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = run_merge(write_recipe(tmp_path / "r.yaml", [two[0], empty], tmp_path / "out"))
    assert code == 3 and f"{empty}: no weights found" in output


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    doc = load_recipe(path)
    assert doc.recipe.name and doc.raw["name"] == doc.recipe.name and doc.text == path.read_text()


@pytest.mark.parametrize(
    "weights", ["[1, .inf, 2, 4]", "[1, .nan, 2, 4]", "[1e308, 1e308, 1e308, 1e308]", "[0, 0, 0, 0]"]
)
def test_weights_that_cannot_be_normalised_are_refused_by_field(tmp_path, weights):
    """Infinite, NaN, overflowing or all-zero shares would merge into an all-NaN or all-zero model: exit 2."""
    paths = save_trajectory(tmp_path / "ckpts", 4)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out", method="weighted")
    recipe.write_text(recipe.read_text() + f"weights: {weights}\n")
    code, out = run_merge(recipe)
    assert code == 2 and "field 'weights'" in out and "finite" in out, out
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("copy", ["same folder", "identical copy"])
def test_the_same_weights_listed_twice_are_refused_or_dropped_by_on_anomaly(tmp_path, copy):
    import shutil

    folders = save_trajectory(tmp_path / "ckpts", 3)
    twin = folders[1] if copy == "same folder" else tmp_path / "ckpts" / "twin"
    if copy == "identical copy":
        shutil.copytree(folders[1], twin)
    sources = [folders[0], folders[1], twin, folders[2]]
    code, out = run_merge(write_recipe(tmp_path / "r.yaml", sources, tmp_path / "out"))
    assert code == 6, out
    assert "sources.2.path" in out and "bit-identical to sources.1.path" in out and "drop_duplicates" in out
    assert_nothing_written(tmp_path)
    code, out = run_merge(write_recipe(tmp_path / "r.yaml", sources, tmp_path / "out", on_anomaly="drop_duplicates"))
    assert code == 0, out
    prov = json.loads((tmp_path / "out" / "hubmerge.json").read_text())
    assert [s["path"].rsplit("/", 1)[-1] for s in prov["sources"]] == ["step100", "step200", "step300"]
    assert prov["integrity"]["dropped"][0]["reason"].startswith("duplicate")
    assert prov["weights"] == pytest.approx([1 / 3] * 3)


def test_distinct_checkpoints_of_one_run_are_not_duplicates(tmp_path):
    from hubmerge.io.checkpoint import identical_weights, open_checkpoint

    folders = save_trajectory(tmp_path / "ckpts", 4)
    assert identical_weights([open_checkpoint(f) for f in folders]) == {}


def test_on_anomaly_of_a_hub_recipe_goes_under_sources(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "sources": {"repo": "a/b", "select": {"last": 2}},
                "on_anomaly": "skip",
                "output": {"path": "o"},
            }
        )
    )
    code, out = run_merge(path)
    assert code == 2 and "sources.on_anomaly" in out
