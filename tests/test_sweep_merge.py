"""The sweep engine: every window equals its own ``hubmerge merge``, sources are read once, runs resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from factories import load_state, save_trajectory

from hubmerge.errors import OutputError, RecipeError
from hubmerge.io.writer import TEMP_SUFFIX, stale_partials
from hubmerge.merging.plan import PROCESS_BASELINE_BYTES, READ_BUFFERS, WRITE_BUFFERS
from hubmerge.merging.sweep import (
    DELETED_SUFFIX,
    Window,
    max_open_windows,
    plan_sweep,
    run_sweep,
    sweep,
    window_positions,
)
from hubmerge.workflows.merge import merge_recipe


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> list[Path]:
    return save_trajectory(tmp_path_factory.mktemp("traj") / "ckpts", 6)


def direct_merge(out, tmp_path: Path) -> dict[str, str]:
    """Run ``hubmerge merge`` on the recipe the window recorded; return its files' hashes."""
    recipe = json.loads((out.path / "hubmerge.json").read_text())["recipe"]
    recipe["output"]["path"] = str(tmp_path / "direct" / out.window.name)
    path = tmp_path / f"{out.window.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return merge_recipe(path).files


def weight_files(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if k != "hubmerge.json"}


def expected_windows(count: int, sizes: list[int], stride: int) -> set[tuple[int, int]]:
    return {(s, w) for w in sizes for s in range(0, count - w + 1, stride)}


@pytest.mark.parametrize(("stride", "chunk"), [(1, None), (2, None), (1, 1000)])
def test_every_window_is_bit_identical_to_a_direct_merge(trajectory, tmp_path, stride, chunk):
    """Shards, index and config of each window hash the same as ``hubmerge merge`` of its recorded recipe.

    ``chunk=1000`` splits every large tensor into many chunks (and blocks of 256), which must not matter.
    """
    options = {"chunk_elems": chunk, "block_elems": 256} if chunk else {}
    result = sweep(trajectory, [1, 2, 3, 4], tmp_path / "sweep", stride=stride, **options)
    assert {(o.window.start, o.window.size) for o in result.outputs} == expected_windows(6, [2, 3, 4], stride)
    assert result.passes == 1
    for out in result.outputs:
        first, last = trajectory[out.window.start].name, trajectory[out.window.end].name
        assert out.path == tmp_path / "sweep" / f"w{out.window.size}-{first}-{last}"
        assert weight_files(out.files) == weight_files(direct_merge(out, tmp_path)), out.window.name
        prov = json.loads((out.path / "hubmerge.json").read_text())
        members = trajectory[out.window.start : out.window.end + 1]
        assert [s["path"] for s in prov["sources"]] == [str(p) for p in members]
        assert prov["weights"] == [1 / out.window.size] * out.window.size
        assert prov["sweep"]["window"] == {
            "size": out.window.size,
            "start": out.window.start,
            "end": out.window.end,
            "stride": stride,
        }
    assert stale_partials(tmp_path / "sweep") == []


@pytest.mark.parametrize(
    ("method", "options"),
    [("ema", {"decay": 0.5}), ("weighted", {"weights": {2: [1, 3], 3: [1, 2, 5]}})],
)
def test_ema_and_weighted_windows_equal_direct_merges(trajectory, tmp_path, method, options):
    result = sweep(trajectory, [2, 3], tmp_path / "sweep", stride=2, method=method, dtype="bfloat16", **options)
    for out in result.outputs:
        if method == "ema":
            w = [0.5 ** (out.window.size - 1 - i) for i in range(out.window.size)]
            assert out.window.weights == pytest.approx([x / sum(w) for x in w])
        assert weight_files(out.files) == weight_files(direct_merge(out, tmp_path)), out.window.name
        assert next(iter(load_state(out.path).values())).dtype == torch.bfloat16


def test_write_behind_leaves_the_bytes_unchanged(trajectory, tmp_path, monkeypatch):
    """Outputs are handed to the disk (and dropped from the page cache) every few KiB here: same files."""
    import hubmerge.io.writer

    monkeypatch.setattr(hubmerge.io.writer, "WRITE_BEHIND_BYTES", 4096)
    result = sweep(trajectory[:4], [2, 3], tmp_path / "sweep")
    assert result.outputs[0].plan.bytes_written > 10 * 4096
    for out in result.outputs:
        assert weight_files(out.files) == weight_files(direct_merge(out, tmp_path)), out.window.name


def test_bin_checkpoints_with_integer_buffers_and_a_tied_head(tmp_path):
    """The non-floating path (buffers copied, checked equal) and dropped aliases, as ``hubmerge merge`` does."""
    paths = save_trajectory(tmp_path / "ckpts", 4, fmt="bin")
    result = sweep(paths, [2, 3], tmp_path / "sweep", chunk_elems=1000, block_elems=256)
    for out in result.outputs:
        assert weight_files(out.files) == weight_files(direct_merge(out, tmp_path)), out.window.name
        assert "lm_head.weight" not in load_state(out.path)


def test_each_source_is_read_once(trajectory, tmp_path):
    """The reader's own byte count: T models, against sum over w of (T - w + 1) * w for independent merges."""
    plan = plan_sweep(trajectory, [2, 3, 4], tmp_path / "sweep")
    model = plan.source_bytes(0)
    assert model == sum(t.nbytes for t in plan.checkpoints[0].tensors.values())
    assert plan.bytes_read == 6 * model
    assert plan.bytes_read_independent == (5 * 2 + 4 * 3 + 3 * 4) * model
    result = run_sweep(plan)
    assert result.bytes_read == 6 * model
    assert result.bytes_written == sum(plan.plans[w.name].bytes_written for w in plan.windows)


def test_open_windows_and_memory_estimate():
    """Accumulators held at once = the most windows containing one source: sum of ceil(w / s) in the interior."""

    def windows(count, sizes, stride):
        return [Window(s, w, f"{s}-{w}", (1 / w,) * w) for s, w in window_positions(count, sizes, stride)]

    assert window_positions(6, [1, 4, 2], 2) == [(0, 2), (2, 2), (4, 2), (0, 4), (2, 4)]
    assert max_open_windows(windows(6, [2, 3, 4], 1)) == 8  # t = 2 or 3: 2 + 3 + 3 (size 4 starts at 0..2)
    assert max_open_windows(windows(6, [2, 3, 4], 2)) == 5  # t = 2: 1 + 2 + 2
    for stride in (1, 2, 3):
        expected = sum(math.ceil(w / stride) for w in (2, 4, 8))
        assert max_open_windows(windows(100, [2, 4, 8], stride)) == expected


def test_memory_is_bounded_by_chunk_times_open_windows_not_by_trajectory_length(trajectory, tmp_path):
    short = plan_sweep(trajectory[:3], [2], tmp_path / "a", chunk_elems=1000)
    long = plan_sweep(trajectory, [2], tmp_path / "b", chunk_elems=1000)
    assert short.max_open == long.max_open == 2
    assert short.memory_estimate == long.memory_estimate
    assert long.bytes_read == 2 * short.bytes_read
    wide = plan_sweep(trajectory, [2, 3, 4], tmp_path / "c", chunk_elems=1000)
    assert wide.max_open == 8
    # fp16 in and out: read pool, a float32 accumulator and a write buffer per open window, a block.
    chunk = 1000
    expected = chunk * (READ_BUFFERS * 2 + 8 * 4 + (WRITE_BUFFERS + 8) * 2) + min(chunk, wide.block_elems) * 4
    assert wide.buffer_bytes == expected
    assert wide.memory_estimate == PROCESS_BASELINE_BYTES + expected


class Stop(Exception):
    pass


def test_interrupted_sweep_resumes_with_only_the_missing_windows(trajectory, tmp_path):
    reference = {o.window.name: o.files for o in sweep(trajectory, [2, 3, 4], tmp_path / "ref").outputs}
    root = tmp_path / "sweep"
    plan = plan_sweep(trajectory, [2, 3, 4], root, max_windows_on_disk=4)
    assert [len(b) for b in plan.batches] == [4, 4, 4]
    handed = []

    def evaluate(out):
        handed.append(out.window.name)
        if len(handed) == 5:
            raise Stop  # the evaluation loop fails on the first window of the second pass

    with pytest.raises(Stop):
        run_sweep(plan, on_window=evaluate)
    finished = {p.name for p in root.iterdir()}
    assert finished == {w.name for w in plan.batches[0] + plan.batches[1]}  # the second pass was committed
    assert stale_partials(root) == []

    again = plan_sweep(trajectory, [2, 3, 4], root, max_windows_on_disk=4)
    todo = plan.batches[2]
    assert again.todo == todo
    result = run_sweep(again)
    assert [o.window.name for o in result.outputs if o.computed] == [w.name for w in todo]
    assert {o.window.name for o in result.outputs if not o.computed} == finished
    # Only the sources the last pass spans were read.
    first = min(w.start for w in todo)
    assert result.bytes_read == again.bytes_read == (6 - first) * again.source_bytes(0)
    assert {o.window.name: o.files for o in result.outputs} == reference


def test_keep_false_bounds_the_outputs_on_disk_and_remembers_what_was_done(trajectory, tmp_path):
    root = tmp_path / "sweep"
    on_disk = []

    def evaluate(out):
        assert load_state(out.path)  # the caller can read the model here
        on_disk.append(sum(1 for p in root.iterdir() if p.is_dir()))

    plan = plan_sweep(trajectory, [2, 3, 4], root, max_windows_on_disk=3)
    assert plan.disk_bytes(keep=False) < plan.disk_bytes(keep=True) / 3
    result = run_sweep(plan, on_window=evaluate, keep=False)
    assert len(on_disk) == 12 and max(on_disk) <= 3
    assert not [p for p in root.iterdir() if p.is_dir()]
    assert sorted(p.name for p in root.iterdir()) == sorted(o.window.name + DELETED_SUFFIX for o in result.outputs)
    again = plan_sweep(trajectory, [2, 3, 4], root, max_windows_on_disk=3)
    assert again.todo == [] and again.bytes_read == 0
    assert len(run_sweep(again).skipped) == 12


def test_windows_are_merged_on_one_thread_and_handed_over_on_the_callers(trajectory, tmp_path):
    """Scoring a window in ``on_window`` must not inherit the merge's single torch thread."""
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = plan_sweep(trajectory, [2], tmp_path / "sweep")
        run_sweep(plan, on_window=lambda out: seen.append(torch.get_num_threads()), keep=False, threads=1)
        assert seen == [2] * len(plan.windows) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_killed_sweep_leaves_only_finished_windows_and_the_rerun_cleans_up(trajectory, tmp_path):
    """SIGKILL mid-pass (no chance to clean up): the rerun removes the partial folder and finishes the sweep."""
    root = tmp_path / "sweep"
    code = (
        "import sys, time, hubmerge.io.writer as w\n"
        "orig = w.ShardWriter.write\n"
        "def slow(self, data):\n"
        "    time.sleep(0.05); orig(self, data)\n"
        "w.ShardWriter.write = slow\n"
        "from hubmerge.merging.sweep import sweep\n"
        "sweep(sys.argv[2:], [2, 3], sys.argv[1], max_windows_on_disk=2)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), *map(str, trajectory)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Wait for the first pass to be committed and the second to be under way.
    while time.time() < deadline and not (
        root.is_dir() and any(p.name.startswith("w") for p in root.iterdir()) and stale_partials(root)
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    partial = stale_partials(root)
    assert partial and all(p.name.endswith(TEMP_SUFFIX) for p in partial)
    done = {p.name for p in root.iterdir() if not p.name.startswith(".")}
    assert done and all((root / name / "hubmerge.json").is_file() for name in done)

    plan = plan_sweep(trajectory, [2, 3], root, max_windows_on_disk=2)
    assert {w.name for w in plan.windows if plan.status[w.name] == "done"} == done
    result = run_sweep(plan)
    assert stale_partials(root) == []
    assert {o.window.name for o in result.outputs if o.computed} == {w.name for w in plan.windows} - done
    assert len(result.outputs) == 5 + 4


def test_a_folder_that_is_not_a_finished_window_is_refused(trajectory, tmp_path):
    root = tmp_path / "sweep"
    result = sweep(trajectory[:3], [2], root)
    shard = result.outputs[0].path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(OutputError, match="does not match the sha256"):
        plan_sweep(trajectory[:3], [2], root)
    with pytest.raises(OutputError, match="other sources, weights"):
        plan_sweep(trajectory[:3], [2], root, dtype="float32", verify=False)
    redone = sweep(trajectory[:3], [2], root, force=True)
    assert all(o.computed for o in redone.outputs)
    assert redone.outputs[0].files == result.outputs[0].files


def test_bad_sweep_options_are_refused_before_reading(trajectory, tmp_path):
    with pytest.raises(RecipeError, match="larger than the trajectory"):
        plan_sweep(trajectory, [8], tmp_path / "s")
    with pytest.raises(RecipeError, match="stride"):
        plan_sweep(trajectory, [2], tmp_path / "s", stride=0)
    with pytest.raises(RecipeError, match="decay"):
        plan_sweep(trajectory, [2], tmp_path / "s", method="ema")
    with pytest.raises(RecipeError, match=r"weights\[3\]"):
        plan_sweep(trajectory, [2, 3], tmp_path / "s", method="weighted", weights={2: [1, 1]})
    with pytest.raises(RecipeError, match="inside source"):
        plan_sweep(trajectory, [2], trajectory[0] / "sweep")
    with pytest.raises(RecipeError, match="no window larger than 1"):
        plan_sweep(trajectory, [1], tmp_path / "s")


def test_plan_summary(trajectory, tmp_path):
    from rich.console import Console

    plan = plan_sweep(trajectory, [2, 4], tmp_path / "s", stride=2)
    d = plan.to_dict()
    assert [w["name"] for w in d["windows"]] == [
        "w2-step100-step200",
        "w2-step300-step400",
        "w2-step500-step600",
        "w4-step100-step400",
        "w4-step300-step600",
    ]
    assert d["bytes_read"] * 14 == d["bytes_read_independent"] * 6
    console = Console(record=True, width=120)
    from hubmerge.cli.render import render_sweep_plan

    render_sweep_plan(plan, console)
    text = console.export_text()
    assert "5 to compute" in text and "independent merges would read" in text and "disk" in text
