"""hubmerge's `evaluate` modules: loaded from their folder, offline, and equal to hand computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("evaluate")

from hubmerge.errors import HubmergeError  # noqa: E402
from hubmerge.metrics import list_metrics, load_metric, metric_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_every_metric_is_a_loadable_module_folder():
    assert {"cloze_accuracy", "mc_accuracy", "minimal_pairs_accuracy", "perplexity"} <= set(list_metrics())
    for name in list_metrics():
        source = (metric_path(name) / f"{name}.py").read_text()
        # evaluate's import scanner misreads "import a, b" as one package named "a,"
        assert not [line for line in source.splitlines() if line.startswith("import ") and "," in line]
    with pytest.raises(HubmergeError, match="unknown metric 'accuracy'"):
        metric_path("accuracy")


def test_mc_accuracy_by_hand():
    m = load_metric("mc_accuracy")
    # ex0: acc picks 0 (-1 > -2); norm: -1/1 = -1 < -2/4 = -0.5 -> picks 1
    # ex1: three choices; acc picks 1; norm: [-4/2, -3/1, -5/10] -> 2
    # ex2: a tie picks the lowest index for both
    got = m.compute(
        predictions=[[-1.0, -2.0], [-4.0, -3.0, -5.0], [-2.0, -2.0]],
        references=[0, 2, 0],
        choice_lengths=[[1, 4], [2, 1, 10], [3, 3]],
    )
    assert got == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3)}
    m.add_batch(predictions=[[-1.0, -2.0]], references=[1], choice_lengths=[[1, 4]])  # streaming use
    assert m.compute() == {"acc": 0.0, "acc_norm": 1.0}


def test_minimal_pairs_cloze_and_perplexity_by_hand():
    assert load_metric("minimal_pairs_accuracy").compute(good=[-10.0, -12.0, -7.0], bad=[-11.0, -11.0, -7.0]) == {
        "acc": pytest.approx(2 / 3)  # the exact tie counts as correct, as in lm-eval
    }
    got = load_metric("cloze_accuracy").compute(is_greedy=[True, False, False, True], logprobs=[-1.0, -2.0, -3.0, -2.0])
    assert got == {"acc": 0.5, "perplexity": pytest.approx(math.exp(2.0))}
    got = load_metric("perplexity").compute(logprobs=[-100.0, -50.0], words=[20, 10], bytes=[100, 50])
    assert got["word_perplexity"] == pytest.approx(math.exp(150 / 30))
    assert got["byte_perplexity"] == pytest.approx(math.exp(1.0))
    assert got["bits_per_byte"] == pytest.approx(1 / math.log(2))


def test_loading_works_offline_with_no_network(tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1, an empty module cache and every socket refused."""
    script = """
import json, socket, evaluate
def refuse(*a, **k):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
from hubmerge.metrics import load_metric, metric_path
direct = evaluate.load(str(metric_path("mc_accuracy")))  # the way users load it in their own code
out = {
    "mc": direct.compute(predictions=[[-1.0, -3.0], [-2.0, -1.0]], references=[0, 0], choice_lengths=[[1, 1], [9, 1]]),
    "pairs": load_metric("minimal_pairs_accuracy").compute(good=[-1.0], bad=[-2.0]),
}
print(json.dumps(out))
"""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": str(ROOT),
    }
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"mc": {"acc": 0.5, "acc_norm": 1.0}, "pairs": {"acc": 1.0}}
