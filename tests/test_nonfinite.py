"""NaN and Inf never reach a merged model silently: counted as the merge streams, refused or recorded."""

from __future__ import annotations

import json

import pytest
import torch
from factories import load_state, save_trajectory, write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hubmerge.cli import app

runner = CliRunner()
TENSOR = "model.layers.0.mlp.up_proj.weight"


def poison(folder, tensor: str, values: dict[int, float]) -> None:
    """Set some elements of one tensor of a saved checkpoint (flat indices), keeping everything else."""
    path = folder / "model.safetensors"
    state = load_file(path)
    flat = state[tensor].flatten().clone()
    for i, v in values.items():
        flat[i] = v
    state[tensor] = flat.view(state[tensor].shape)
    save_file(state, path, metadata={"format": "pt"})


def merge(recipe, *args: str):
    return runner.invoke(app, ["merge", str(recipe), "--quiet", *args])


@pytest.fixture
def three(tmp_path):
    return save_trajectory(tmp_path / "ckpts", 3, dtype=torch.float32)


def test_a_source_with_nan_and_inf_is_refused_naming_source_tensor_and_count(tmp_path, three):
    poison(three[1], TENSOR, {0: float("nan"), 5: float("inf"), 7: float("-inf")})
    out = tmp_path / "out"
    res = merge(write_recipe(tmp_path / "r.yaml", three, out))
    assert res.exit_code == 3, res.output
    assert "step200" in res.output and TENSOR in res.output and "3 non-finite values" in res.output
    assert "nonfinite: warn" in res.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written left behind


def test_nonfinite_warn_writes_the_merge_says_so_and_records_the_counts(tmp_path, three):
    poison(three[2], TENSOR, {3: float("nan")})
    out = tmp_path / "out"
    res = merge(write_recipe(tmp_path / "r.yaml", three, out, nonfinite="warn"))
    assert res.exit_code == 0, res.output
    prov = json.loads((out / "hubmerge.json").read_text())
    assert prov["nonfinite"] == {
        "policy": "warn",
        "sources": [{"source": "step300", "tensor": TENSOR, "count": 1}],
        "output": [],
    }
    merged = load_state(out)[TENSOR].flatten()
    assert torch.isnan(merged[3]) and torch.isfinite(merged[4:]).all()


def test_clean_merge_records_the_policy_and_nothing_found(tmp_path, three):
    out = tmp_path / "out"
    assert merge(write_recipe(tmp_path / "r.yaml", three, out)).exit_code == 0
    prov = json.loads((out / "hubmerge.json").read_text())
    assert prov["nonfinite"] == {"policy": "refuse", "sources": [], "output": []}


def test_a_float16_cast_that_overflows_names_the_tensor_and_suggests_a_dtype(tmp_path, three):
    for folder in three:
        poison(folder, TENSOR, {11: 1e6})  # finite in float32, past float16's 65504
    out = tmp_path / "out"
    res = merge(write_recipe(tmp_path / "r.yaml", three, out, dtype="float16"))
    assert res.exit_code == 3, res.output
    assert TENSOR in res.output and "float16" in res.output and "dtype: bfloat16" in res.output
    assert not out.exists()
    # bfloat16 holds it
    res = merge(write_recipe(tmp_path / "r.yaml", three, out, dtype="bfloat16"))
    assert res.exit_code == 0, res.output
    assert load_state(out)[TENSOR].flatten()[11].float().item() == pytest.approx(1e6, rel=1e-2)


def test_float16_sources_averaged_into_float16_are_never_flagged(tmp_path):
    folders = save_trajectory(tmp_path / "ckpts", 2, dtype=torch.float16)
    for folder in folders:
        poison(folder, TENSOR, {0: 65504.0})  # at the edge of float16: an average stays within it
    out = tmp_path / "out"
    assert merge(write_recipe(tmp_path / "r.yaml", folders, out)).exit_code == 0
    assert load_state(out)[TENSOR].flatten()[0].item() == 65504.0


def test_the_sweep_refuses_a_window_over_a_nan_source(tmp_path, three):
    from hubmerge.errors import SourceError
    from hubmerge.merging.sweep import sweep

    poison(three[0], TENSOR, {1: float("nan")})
    with pytest.raises(SourceError, match=r"step100.*3?non-finite|non-finite"):
        sweep(three, [2], tmp_path / "sw")
    done = sweep(three, [2], tmp_path / "sw2", nonfinite="warn")
    records = {o.window.name: json.loads((o.path / "hubmerge.json").read_text())["nonfinite"] for o in done.outputs}
    assert [len(r["sources"]) for _, r in sorted(records.items())] == [1, 0]  # only the window holding step100
