"""Errors reach users as one line and a documented exit code; commands leave the process as they found it."""

from __future__ import annotations

import ast
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from factories import save_trajectory, write_recipe
from typer.testing import CliRunner

from hubmerge import errors
from hubmerge.cli import app
from hubmerge.errors import HubError, HubmergeError, InvalidValueError, OutputError, RecipeError
from hubmerge.io.sizes import parse_size
from hubmerge.io.writer import OutputDir
from hubmerge.merging.methods import source_weights

runner = CliRunner()
PACKAGE = Path(__file__).resolve().parent.parent / "hubmerge"


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def test_every_exception_class_lives_in_errors_py():
    """Every hubmerge exception is defined in errors.py (the dev Hub, which stands apart, has its HTTP answers)."""
    defined = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" or "devhub" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    defined.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert defined == []
    assert {errors.StoreError.__module__, errors.ScoresError.__module__} == {"hubmerge.errors"}


def test_every_exit_code_is_documented_in_errors_and_the_readme():
    readme = (PACKAGE.parent / "README.md").read_text()
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, HubmergeError)]
    assert {c.exit_code for c in classes} <= codes
    for code in codes:
        assert f"| {code} |" in readme, f"exit code {code} is not in the README's error table"


def test_the_cli_uses_no_exit_code_that_errors_py_does_not_name():
    tree = ast.parse((PACKAGE / "cli" / "app.py").read_text())
    literal = [
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "Exit"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    assert literal == []


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: source_weights("weighted", 3, [0, 0, 0]), "must not all be zero"),
        (lambda: source_weights("weighted", 2, [1, float("nan")]), "finite"),
        (lambda: source_weights("weighted", 2, [1e308, 1e308]), "overflows"),
        (lambda: source_weights("weighted", 3, [1, 2]), "needs 3 weights"),
        (lambda: source_weights("median", 2), "unknown method 'median'"),
        (lambda: parse_size("5 parsecs"), "is not a size"),
    ],
)
def test_bad_values_are_recipe_errors_not_bare_value_errors(call, fragment):
    with pytest.raises(RecipeError, match=fragment) as info:
        call()
    assert info.value.exit_code == 2
    if isinstance(info.value, InvalidValueError):
        assert isinstance(info.value, ValueError)  # still catchable as one


def test_committing_an_output_folder_that_was_never_opened_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="nothing to commit"):
        OutputDir(tmp_path / "out").commit()


def test_client_errors_of_a_trajectory_push_are_hub_errors(tmp_path, client):
    from hubmerge.hub.push import push_checkpoints

    ckpt = save_trajectory(tmp_path / "ckpts", 1)[0]
    with pytest.raises(HubError, match="not a valid repo id"):
        push_checkpoints("not a repo id!", [ckpt], client)


def test_a_device_torch_does_not_know_is_one_line(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    res = runner.invoke(app, ["merge", str(recipe), "-q", "--device", "tpu"])
    assert res.exit_code == 2  # a bad option; exit 1 is kept for cuda asked for where there is none
    assert "--device tpu" in one_error_line(res.output)
    assert not (tmp_path / "out").exists()


def test_ensemble_sizes_that_are_not_numbers_are_one_line(tmp_path):
    res = runner.invoke(app, ["stability", "--results", str(tmp_path), "--ensemble", "two,four"])
    assert res.exit_code == 2
    assert "--ensemble 'two,four'" in one_error_line(res.output)


def test_error_text_in_brackets_is_printed_as_written():
    """Rich markup would eat ``[step1000, step2000]``; an error line shows the text verbatim."""
    res = runner.invoke(app, ["pull", "org/x", "--select", "{last: 5"])
    assert res.exit_code == 2
    assert "'{revisions: [step1000, step2000]}'" in one_error_line(res.output)


def test_a_command_gives_back_the_sigterm_handler_it_found(tmp_path):
    def mine(signum, frame):  # pragma: no cover - never delivered
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        res = runner.invoke(app, ["merge", str(tmp_path / "missing.yaml")])
        assert res.exit_code == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_eval_threads_are_given_back(tmp_path):
    """``hubmerge eval --threads 1`` scores on one thread and leaves torch's setting as it found it."""
    from factories import BLIMP, make_models

    if not BLIMP.exists():
        pytest.skip("../shared/data is not present")
    models = make_models(tmp_path / "ckpts", 1, ["the cat sat on the mat ."] * 20)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = ["eval", str(models[0]), "--tasks", "blimp_anaphor_gender_agreement", "--data", str(BLIMP)]
        res = runner.invoke(app, [*args, "--limit", "3", "--threads", "1", "--results", str(tmp_path / "r"), "-q"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_demo_gives_back_the_environment_and_the_client_constants(tmp_path, monkeypatch):
    """The demo uses its own HF cache and one torch thread, then restores HF_HUB_CACHE, HF_HUB_OFFLINE, the
    client's constant and the thread count."""
    from huggingface_hub import constants

    from hubmerge.demo.pipeline import DemoConfig, run_demo

    seen = {}

    def probe(ctx):
        seen.update(cache=os.environ.get("HF_HUB_CACHE"), constant=constants.HF_HUB_CACHE)
        seen.update(offline=os.environ.get("HF_HUB_OFFLINE"), threads=torch.get_num_threads())

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env_before, constant_before = os.environ["HF_HUB_CACHE"], constants.HF_HUB_CACHE
    threads_before = torch.get_num_threads()
    run_demo(DemoConfig(out=tmp_path / "demo", quiet=True), stages=[("probe", probe)])
    assert seen == {
        "cache": str((tmp_path / "demo" / "hf-cache").resolve()),
        "constant": str((tmp_path / "demo" / "hf-cache").resolve()),
        "offline": None,
        "threads": 1,
    }
    assert os.environ["HF_HUB_CACHE"] == env_before and constant_before == constants.HF_HUB_CACHE
    assert os.environ["HF_HUB_OFFLINE"] == "1" and torch.get_num_threads() == threads_before


def test_a_merge_records_the_recipe_it_read(tmp_path):
    from hubmerge.workflows.merge import merge_recipe

    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    outcome = merge_recipe(recipe)
    prov = json.loads((outcome.output / "hubmerge.json").read_text())
    assert prov["recipe_file"] == str(recipe) and prov["recipe"]["sources"][0]["path"] == str(paths[0])


def tiny_disk(monkeypatch, free: int) -> None:
    """Every disk reports ``free`` bytes free (``shutil.disk_usage`` is what the plan's free-space probe asks)."""
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))


def test_a_merge_that_would_not_fit_on_its_disk_is_refused_before_reading(tmp_path, monkeypatch):
    """The plan compares the output's bytes with the free space: exit 4 naming folder, need and free; nothing read."""
    import hubmerge.merging.executor as executor
    from hubmerge.io.writer import stale_partials

    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "new" / "out")
    res = runner.invoke(app, ["merge", str(recipe), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "needed," in res.output and " free" in res.output

    passes = []
    monkeypatch.setattr(executor, "run_pass", lambda *a, **k: passes.append(a))
    tiny_disk(monkeypatch, 1000)
    res = runner.invoke(app, ["merge", str(recipe), "-q"])
    assert res.exit_code == errors.EXIT_OUTPUT, res.output
    line = one_error_line(res.output)
    # the nearest existing folder above the output, the bytes it needs and the 1000 free
    assert f"error: {tmp_path}: not enough free space" in line and "(1000 bytes) free" in line, line
    assert passes == [] and not (tmp_path / "new").exists() and stale_partials(tmp_path) == []


def test_free_space_check_is_a_plain_comparison(tmp_path):
    from hubmerge.io.files import check_free_space

    check_free_space(tmp_path, 100, 100)
    with pytest.raises(OutputError, match=r"needs 101 B \(101 bytes\), 100 B \(100 bytes\) free"):
        check_free_space(tmp_path, 101, 100)


def test_a_sweep_is_refused_when_its_peak_disk_need_does_not_fit(tmp_path, monkeypatch):
    """The peak is the largest pass when windows are deleted once handed over, every window when kept."""
    from hubmerge.merging.sweep import plan_sweep

    paths = save_trajectory(tmp_path / "ckpts", 4)
    plan = plan_sweep(paths, [2], tmp_path / "sweep", max_windows_on_disk=1)
    one, every = plan.new_disk_bytes(False), plan.new_disk_bytes(True)
    assert 0 < one < every and plan.disk_free is not None
    tiny_disk(monkeypatch, one)
    assert plan_sweep(paths, [2], tmp_path / "sweep", max_windows_on_disk=1).disk_free == one
    with pytest.raises(OutputError, match="not enough free space") as e:
        plan_sweep(paths, [2], tmp_path / "sweep", max_windows_on_disk=1, keep=True)
    assert e.value.exit_code == errors.EXIT_OUTPUT and not (tmp_path / "sweep").exists()
