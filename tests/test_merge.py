"""The merge engine against a plain float32 reference, and its guarantees (bounded, atomic, deterministic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import load_state, save_trajectory, terminate_mid_merge, write_recipe
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.io.writer import stale_partials
from hubmerge.merging.methods import ema_weights, source_weights
from hubmerge.merging.recipe import load_recipe
from hubmerge.workflows.merge import merge_recipe, plan_merge

runner = CliRunner()


def reference(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Load everything, average in float32: the straightforward computation the engine must equal."""
    states = [load_state(p) for p in paths]
    ref = {}
    for name, t in states[-1].items():
        if t.is_floating_point():
            ref[name] = sum(w * s[name].float() for w, s in zip(weights, states, strict=True))
            # Scale of the summands, to bound float32 accumulation error when sums cancel.
            ref[name].magnitude = sum(w * s[name].float().abs() for w, s in zip(weights, states, strict=True))
        else:
            ref[name] = t
    return ref


def assert_within_rounding(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name, r in ref.items():
        o = out[name]
        if not r.is_floating_point():
            assert torch.equal(o, r), name
            continue
        assert o.dtype == dtype, name
        # Equal to the reference rounded to the output dtype (one unit in the last place), plus the
        # float32 rounding of a differently ordered sum (a few float32 ulps of the summands' scale).
        eps = torch.finfo(dtype).eps
        err = (o.float() - r).abs()
        bound = eps * r.abs() + 4 * torch.finfo(torch.float32).eps * r.magnitude + torch.finfo(dtype).tiny
        assert bool((err <= bound).all()), f"{name}: max error {err.max().item()}"


@pytest.mark.parametrize("fmt", ["single", "sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize(
    ("method", "extra", "weights"),
    [
        ("uniform", {}, [0.25] * 4),
        ("weighted", {"weights": [1, 1, 2, 4]}, [1 / 8, 1 / 8, 2 / 8, 4 / 8]),
        ("ema", {"ema": {"decay": 0.5}}, ema_weights(4, 0.5)),
    ],
)
def test_merge_equals_float32_reference(tmp_path, fmt, method, extra, weights):
    paths = save_trajectory(tmp_path / "ckpts", 4, fmt=fmt)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out", method=method, **extra)
    result = merge_recipe(recipe)
    out = load_state(result.output)
    ref = reference(paths, weights)
    if fmt.startswith("bin"):
        # The tied head shared storage with the embedding; config says tie, so it is re-tied on load.
        ref.pop("lm_head.weight")
    assert set(out) == set(ref)
    assert_within_rounding(out, ref, torch.float16)


def test_weights_are_normalised_and_ema_favours_newest():
    assert source_weights("weighted", 4, [1, 1, 2, 4]) == [0.125, 0.125, 0.25, 0.5]
    w = ema_weights(4, 0.9)
    assert w == sorted(w) and w[-1] > w[0]
    assert abs(sum(w) - 1) < 1e-12
    assert w[2] / w[3] == pytest.approx(0.9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_output_dtype_and_config(tmp_path, dtype):
    paths = save_trajectory(tmp_path / "ckpts", 3)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out", dtype=dtype)
    result = merge_recipe(recipe)
    tdtype = getattr(torch, dtype)
    assert_within_rounding(load_state(result.output), reference(paths, [1 / 3] * 3), tdtype)
    config = json.loads((result.output / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype


def test_output_is_sharded_like_transformers_and_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    paths = save_trajectory(tmp_path / "ckpts", 3, fmt="sharded")
    recipe = write_recipe(
        tmp_path / "r.yaml", paths, tmp_path / "out", output={"path": str(tmp_path / "out"), "max_shard_size": "20KB"}
    )
    out = merge_recipe(recipe).output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)


def test_provenance_records_recipe_sources_weights_and_hashes(tmp_path):
    import hashlib

    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out", method="weighted", weights=[1, 3])
    out = merge_recipe(recipe).output
    prov = json.loads((out / "hubmerge.json").read_text())
    assert prov["recipe"]["weights"] == [1, 3]
    assert prov["weights"] == [0.25, 0.75]
    assert [s["path"] for s in prov["sources"]] == [str(p) for p in paths]
    files = {p.name for p in out.iterdir()} - {"hubmerge.json"}
    assert set(prov["files"]) == files
    for name, digest in prov["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest


def test_bit_identical_across_runs_and_thread_counts(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 3)
    digests = []
    for i, threads in enumerate([1, 2, 1]):
        recipe = write_recipe(tmp_path / f"r{i}.yaml", paths, tmp_path / f"out{i}", method="ema", ema={"decay": 0.7})
        out = merge_recipe(recipe, threads=threads).output
        digests.append(json.loads((out / "hubmerge.json").read_text())["files"])
    assert digests[0] == digests[1] == digests[2]


def test_large_tensors_are_chunked(tmp_path, monkeypatch):
    """A tensor larger than the chunk size is streamed in pieces and still equals the reference."""
    import hubmerge.merging.executor
    import hubmerge.merging.plan

    monkeypatch.setattr(hubmerge.merging.plan, "CHUNK_ELEMS", 1000)
    monkeypatch.setattr(hubmerge.merging.executor, "BLOCK_ELEMS", 256)
    paths = save_trajectory(tmp_path / "ckpts", 3, dtype=torch.bfloat16)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    out = merge_recipe(recipe).output
    assert_within_rounding(load_state(out), reference(paths, [1 / 3] * 3), torch.bfloat16)


def test_dry_run_shows_plan_and_writes_nothing(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    res = runner.invoke(app, ["merge", str(recipe), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["tensors"] == len(load_state(paths[0])) and plan["bytes_read"] == 2 * plan["bytes_written"]
    assert [s["weight"] for s in plan["sources"]] == [0.5, 0.5]
    assert not (tmp_path / "out").exists()
    res = runner.invoke(app, ["merge", str(recipe), "--dry-run"])
    assert "merge plan" in res.output and "memory" in res.output


def test_existing_output_refused_without_force(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    assert runner.invoke(app, ["merge", str(recipe), "-q"]).exit_code == 0
    before = (tmp_path / "out" / "hubmerge.json").read_bytes()
    res = runner.invoke(app, ["merge", str(recipe), "-q"])
    assert res.exit_code == 4 and "already exists" in res.output and "--force" in res.output
    res = runner.invoke(app, ["merge", str(recipe), "-q", "--force"])
    assert res.exit_code == 0 and (tmp_path / "out" / "hubmerge.json").read_bytes() == before
    assert stale_partials(tmp_path) == []


@pytest.mark.parametrize("victim", ["unrelated", "recipe folder", "file"])
def test_force_replaces_only_what_hubmerge_wrote(tmp_path, victim):
    """``--force`` once deleted a folder of unrelated files (and, pointed at it, the recipe's own folder)."""
    paths = save_trajectory(tmp_path / "ckpts", 2)
    if victim == "unrelated":
        target = tmp_path / "notes"
        target.mkdir()
        (target / "thesis.tex").write_text("months of work")
        recipe = write_recipe(tmp_path / "r.yaml", paths, target)
    elif victim == "recipe folder":
        target = tmp_path / "recipes"
        target.mkdir()
        recipe = write_recipe(target / "r.yaml", paths, target)
    else:
        target = tmp_path / "out.txt"
        target.write_text("a file")
        recipe = write_recipe(tmp_path / "r.yaml", paths, target)
    before = sorted((p.name, p.read_bytes()) for p in ([target] if target.is_file() else target.iterdir()))
    res = runner.invoke(app, ["merge", str(recipe), "-q", "--force"])
    assert res.exit_code == 4 and "--force replaces only" in res.output and str(target) in res.output
    assert sorted((p.name, p.read_bytes()) for p in ([target] if target.is_file() else target.iterdir())) == before
    assert stale_partials(target.parent) == []


def test_force_replaces_an_empty_folder_and_outputs_follow_the_umask(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 2)
    (tmp_path / "empty").mkdir()
    previous = os.umask(0o027)
    try:
        res = runner.invoke(
            app, ["merge", str(write_recipe(tmp_path / "r.yaml", paths, tmp_path / "empty")), "-q", "--force"]
        )
    finally:
        os.umask(previous)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert (tmp_path / "empty").stat().st_mode & 0o777 == 0o750  # as mkdir would make it, not mkdtemp's 0700


def test_memory_estimate_is_independent_of_source_count(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 6)
    plans = [
        plan_merge(load_recipe(write_recipe(tmp_path / f"r{n}.yaml", paths[-n:], tmp_path / "out")), force=True)
        for n in (2, 6)
    ]
    assert plans[0].memory_estimate == plans[1].memory_estimate
    assert plans[1].bytes_read == 3 * plans[0].bytes_read


# `hubmerge merge RECIPE -q` with the writer slowed down, so that a signal lands mid-merge.
SLOW_MERGE = (
    "import time, hubmerge.io.writer as w\n"
    "orig = w.ShardWriter.write\n"
    "def slow(self, data):\n"
    "    time.sleep(0.2); orig(self, data)\n"
    "w.ShardWriter.write = slow\n"
    "from hubmerge.cli import main; import sys; sys.argv=['hubmerge','merge',sys.argv[1],'-q']; main()\n"
)


def test_killed_merge_leaves_no_finished_looking_folder(tmp_path):
    """SIGTERM in the middle of a merge: the target never appears and the partial folder is removed."""
    paths = save_trajectory(tmp_path / "ckpts", 4)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    code = SLOW_MERGE
    proc = subprocess.Popen([sys.executable, "-c", code, str(recipe)], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    stderr = terminate_mid_merge(proc, tmp_path)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not (tmp_path / "out").exists()
    assert stale_partials(tmp_path) == []


def test_rerun_removes_the_partial_of_a_merge_killed_with_sigkill(tmp_path):
    """kill -9 leaves the hidden partial folder (with its writer's pid); rerunning the same target removes it."""
    import signal
    import time

    paths = save_trajectory(tmp_path / "ckpts", 4)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    code = SLOW_MERGE
    proc = subprocess.Popen([sys.executable, "-c", code, str(recipe)], cwd=tmp_path, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not stale_partials(tmp_path) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    (left,) = stale_partials(tmp_path)
    assert json.loads((left / ".hubmerge-writer.json").read_text())["pid"] == proc.pid

    result = runner.invoke(app, ["merge", str(recipe)])
    assert result.exit_code == 0, result.output
    assert f"removed a partial output left by a killed run (pid {proc.pid}): {left}" in result.output
    assert stale_partials(tmp_path) == []
    assert not (tmp_path / "out" / ".hubmerge-writer.json").exists()
    assert ".hubmerge-writer.json" not in json.loads((tmp_path / "out" / "hubmerge.json").read_text())["files"]
    out, ref = load_state(tmp_path / "out"), reference(paths, source_weights("uniform", 4))
    assert set(out) == set(ref)
    assert_within_rounding(out, ref, torch.float16)


def test_partials_of_a_live_writer_or_another_host_are_kept(tmp_path):
    """Only a partial whose writer ran on this host and is gone is removed."""
    import socket

    from hubmerge.io.writer import WRITER_FILE, remove_dead_partials

    target = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        writers = {
            "live": (live.pid, socket.gethostname()),
            "other": (dead.pid, "some-other-host"),
            "dead": (dead.pid, socket.gethostname()),
        }
        for key, (pid, host) in writers.items():
            folder = tmp_path / f".out.{key}1234.hubmerge-partial"
            folder.mkdir()
            (folder / WRITER_FILE).write_text(json.dumps({"pid": pid, "host": host}))
        (tmp_path / ".out.nowriter.hubmerge-partial").mkdir()  # an older hubmerge's: no record, kept
        (tmp_path / ".out.x.deadbeef.hubmerge-partial").mkdir()  # another target's ("out.x")
        removed = remove_dead_partials(target)
        assert removed == [(tmp_path / ".out.dead1234.hubmerge-partial", dead.pid)]
        assert {p.name for p in stale_partials(tmp_path)} == {
            ".out.live1234.hubmerge-partial",
            ".out.other1234.hubmerge-partial",
            ".out.nowriter.hubmerge-partial",
            ".out.x.deadbeef.hubmerge-partial",
        }
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_device_path_accumulates_like_the_cpu_path(dtype):
    """The branch --device cuda takes (whole-chunk transfer and cast) gives the CPU path's float32 result.

    No GPU here: the device branch runs on CPU tensors, which checks its arithmetic, not the transfer.
    """
    from hubmerge.merging.executor import accumulate_blocks, accumulate_on_device

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3000, generator=gen).to(dtype) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    blocked, whole = torch.empty(3000), torch.empty(3000)
    tmp = torch.empty(1024)
    for i, (x, w) in enumerate(zip(xs, weights, strict=True)):
        accumulate_blocks(x, [(blocked, w, i == 0)], tmp, 1024)  # several cache blocks per chunk
        accumulate_on_device(x, [(whole, w, i == 0)])
    assert torch.equal(blocked, whole)
