"""lm-eval's own tasks, scored by lm-eval (``lm_eval --model hf``) and by hubmerge (``hubmerge eval --tasks lm_eval:``).

One real model (SmolLM2-135M-Instruct, float32, CPU; ``../shared/notes/models.md``), two lm-eval tasks defined on
local data: ARC-Easy (200 questions) and one BLiMP paradigm (500 pairs), the YAMLs ``eval_vs_lm_eval.py`` writes.
Each tool runs as a child of this process, one after the other, on the same machine state:

- lm-eval: its CLI with the HF backend at its fastest batch size (timed first at 1, 2, ..., 64 on 40 documents),
  ``HFLM.loglikelihood`` wrapped by a timer;
- hubmerge: ``hubmerge eval MODEL --tasks lm_eval:NAME --lm-eval-include DIR`` into a fresh results store,
  ``score_requests`` wrapped by a timer. lm-eval builds hubmerge's requests too (``TaskManager``,
  ``build_all_requests``), so both score the very same strings.

Printed: requests per second of each (scoring phase and whole process) and their ratio; the aggregate metrics side
by side (lm-eval's results file against hubmerge's store); every example whose prediction differs, with the gap
between its top two choices (a near-tie is a gap under 1e-4). Targets: the scoring ratio is at least 2x on ARC-Easy;
on BLiMP, at least 90% of the bound that prefix sharing sets, the ratio of token positions lm-eval computes to those
hubmerge computes for the same requests (``eval_vs_lm_eval.py --sharing`` prints it for every paradigm). The exit
status is 1 when a prediction differs other than at a near-tie or a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_vs_lm_eval as base  # noqa: E402  (the model, the task YAMLs, lm-eval's runner and timer)

REPO = base.REPO
NEAR_TIE = base.NEAR_TIE
ARC_TARGET = 2.0
BLIMP_SHARE_OF_BOUND = 0.9

# hubmerge's CLI with the scorer wrapped by a timer, as LM_EVAL_DRIVER wraps lm-eval's HFLM.loglikelihood.
HUBMERGE_DRIVER = """
import json, os, sys, time
import hubmerge.evaluation.scoring as scoring
original = scoring.score_requests
def timed(*args, **kwargs):
    start = time.perf_counter()
    out = original(*args, **kwargs)
    with open(os.environ["HUBMERGE_BENCH_TIMING"], "a") as f:
        f.write(json.dumps({"requests": len(out), "seconds": time.perf_counter() - start}) + "\\n")
    return out
scoring.score_requests = timed
from hubmerge.cli import main
sys.argv = ["hubmerge", *sys.argv[1:]]
main()
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_hubmerge(setup: base.TaskSetup, args: argparse.Namespace, env: dict[str, str]) -> tuple[base.Run, dict]:
    """``hubmerge eval --tasks lm_eval:NAME`` in a child process, into a fresh results store."""
    results = args.work / "out" / f"bridge-results-{setup.name}"
    shutil.rmtree(results, ignore_errors=True)
    timing = args.work / "out" / f"bridge-{setup.name}.timing.jsonl"
    timing.unlink(missing_ok=True)
    cli = ["eval", str(args.model), "--tasks", f"lm_eval:{setup.lm_eval_task}", "--lm-eval-include"]
    cli += [str(setup.docs.parent), "--results", str(results), "--json"]
    if args.batch_size:
        cli += ["--batch-size", str(args.batch_size)]
    run = base.Run(
        "hubmerge", [sys.executable, "-c", HUBMERGE_DRIVER, *cli], extra={"command": "hubmerge " + " ".join(cli)}
    )
    base.measure(
        run, args.work / "logs" / f"bridge-hubmerge-{setup.name}.log", {**env, "HUBMERGE_BENCH_TIMING": str(timing)}
    )
    run.score_s = sum(json.loads(line)["seconds"] for line in timing.read_text().splitlines())
    run.extra["requests"] = sum(json.loads(line)["requests"] for line in timing.read_text().splitlines())
    return run, {"results": results}


def stored(results: Path, model: Path, task: str):
    """hubmerge's stored choice log-likelihoods (by doc id) and scores of the task."""
    from hubmerge.results.keys import model_key, weight_hashes_of_folder
    from hubmerge.results.store import ResultsStore

    store = ResultsStore(results, read_only=True)
    key = model_key(weight_hashes_of_folder(model))
    (tkey,) = [t["task_key"] for t in store.tasks() if t["name"] == task]
    matrix = store.choice_matrix(key, tkey)
    (score,) = [s for s in store.scores(tkey) if s.model_key == key]
    return matrix, score


def compare(matrix, rows: list[dict]) -> dict:
    """Prediction by prediction: hubmerge's stored log-likelihoods against lm-eval's samples file."""
    import numpy as np

    theirs = {r["doc_id"]: np.array([float(x[0]) for x in r["filtered_resps"]]) for r in rows}
    if sorted(theirs) != matrix.doc_ids.tolist():
        raise SystemExit(f"hubmerge stored {len(matrix.doc_ids)} documents, lm-eval scored {len(theirs)}")
    differing, near_ties, diffs = [], [], []
    for doc_id, ours in zip(matrix.doc_ids.tolist(), matrix.ll, strict=True):
        ours = ours[~np.isnan(ours)]
        b = theirs[doc_id]
        diffs.append(float(np.abs(ours - b).max()))
        if int(np.argmax(ours)) != int(np.argmax(b)):
            gap = min(base._top_two_gap(ours), base._top_two_gap(b))
            case = {"doc_id": doc_id, "hubmerge": ours.tolist(), "lm_eval": b.tolist(), "top_two_gap": gap}
            (near_ties if gap <= NEAR_TIE else differing).append(case)
    return {"differing": differing, "near_ties": near_ties, "max_abs_loglik_diff": max(diffs)}


def sharing_bound(setup: base.TaskSetup, model: Path) -> float:
    """Token positions lm-eval computes over those hubmerge computes, for the requests lm-eval builds."""
    from transformers import AutoTokenizer

    from hubmerge.evaluation.scoring import packing_stats
    from hubmerge.evaluation.tasks.lm_eval_tasks import load_lm_eval_tasks

    (task,) = load_lm_eval_tasks([f"lm_eval:{setup.lm_eval_task}"], [setup.docs.parent])
    stats = packing_stats(AutoTokenizer.from_pretrained(model), task.requests())
    return stats["plain_tokens"] / stats["packed_tokens"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arc-limit", type=int, default=base.DEFAULT_LIMITS["arc_easy"], help="ARC-Easy questions")
    p.add_argument("--blimp-limit", type=int, default=base.DEFAULT_LIMITS["blimp"], help="BLiMP pairs")
    p.add_argument("--blimp-paradigm", default=base.DEFAULT_PARADIGM)
    p.add_argument("--model", type=Path, help="a model folder (default: WORK/smollm2-135m, converted on first use)")
    p.add_argument("--work", type=Path, default=REPO / "bench-work")
    p.add_argument("--lm-eval-batch-size", type=int, help="fix lm-eval's batch size instead of tuning it")
    p.add_argument("--batch-size", type=int, help="hubmerge's batch size (default: by token budget)")
    p.add_argument("--threads", type=int, help="torch threads for both tools (OMP_NUM_THREADS)")
    p.add_argument("--json", type=Path, help="write everything measured to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.lm_eval_python = Path(sys.executable)  # lm-eval is hubmerge's extra here: one venv for both tools
    args.model = (args.model or args.work / "smollm2-135m").resolve()
    base.ensure_model(args.model, args.work, args.lm_eval_python)
    setups = [
        base.arc_setup(args.work, args.arc_limit),
        base.blimp_setup(args.work, args.blimp_limit, args.blimp_paradigm),
    ]
    env = {**os.environ, **base.OFFLINE_ENV, "HF_HOME": str(args.work / "hf-home"), "PYTHONPATH": str(REPO)}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    loadavg_before, results = os.getloadavg(), []
    for setup in setups:
        (setup.docs.parent / f"{setup.lm_eval_task}.yaml").write_text(setup.yaml_text)
        log(f"{setup.name}: {setup.limit} documents")
        if args.lm_eval_batch_size:
            batch, rates = args.lm_eval_batch_size, {}
        else:
            batch, rates = base.tune_lm_eval(setup, args, env)
        theirs, rows, lm_results = base.run_lm_eval(setup, args, env, batch, "-bridge")
        log(f"  lm-eval (batch {batch}): scoring {theirs.score_s:.1f} s, process {theirs.wall_s:.1f} s")
        ours, info = run_hubmerge(setup, args, env)
        log(f"  hubmerge: scoring {ours.score_s:.1f} s, process {ours.wall_s:.1f} s")
        matrix, score = stored(info["results"], args.model, setup.lm_eval_task)
        n_requests = sum(len(r["arguments"]) for r in rows)
        if ours.extra["requests"] != n_requests:
            raise SystemExit(f"{setup.name}: hubmerge scored {ours.extra['requests']} requests, lm-eval {n_requests}")
        reported = lm_results["results"][setup.lm_eval_task]
        entry = {
            "task": setup.name,
            "lm_eval_task": setup.lm_eval_task,
            "documents": len(rows),
            "requests": n_requests,
            "lm_eval": {"batch_size": batch, "tuning": rates, "score_s": theirs.score_s, "wall_s": theirs.wall_s,
                        "command": theirs.extra["command"], "other_load_cores": theirs.other_load_cores},
            "hubmerge": {"score_s": ours.score_s, "wall_s": ours.wall_s, "command": ours.extra["command"],
                         "other_load_cores": ours.other_load_cores},
            "metrics": {m: {"lm_eval": reported.get(f"{m},none"), "hubmerge": getattr(score, m)}
                        for m in ("acc", "acc_norm") if f"{m},none" in reported},
            "comparison": compare(matrix, rows),
        }  # fmt: skip
        entry["ratio_score"] = theirs.score_s / ours.score_s
        entry["ratio_wall"] = theirs.wall_s / ours.wall_s
        if setup.name == "arc_easy":
            entry["target"] = {"ratio": ARC_TARGET, "met": entry["ratio_score"] >= ARC_TARGET}
        else:
            bound = sharing_bound(setup, args.model)
            need = BLIMP_SHARE_OF_BOUND * bound
            entry["target"] = {"sharing_bound": bound, "ratio": need, "met": entry["ratio_score"] >= need}
        results.append(entry)
    report(results, loadavg_before)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "loadavg": [loadavg_before, os.getloadavg()]}, indent=2))
    failed = any(r["comparison"]["differing"] or not r["target"]["met"] for r in results)
    return 1 if failed else 0


def report(results: list[dict], loadavg_before: tuple[float, float, float]) -> None:
    print()
    for r in results:
        lm, ours, c, t = r["lm_eval"], r["hubmerge"], r["comparison"], r["target"]
        print(f"{r['task']} (lm-eval task {r['lm_eval_task']}): {r['documents']} documents, {r['requests']} requests")
        for name, side in (("lm-eval", lm), ("hubmerge", ours)):
            print(
                f"  {name:9s} scoring {r['requests'] / side['score_s']:7.1f} req/s ({side['score_s']:6.1f} s)   "
                f"whole process {r['requests'] / side['wall_s']:6.1f} req/s ({side['wall_s']:6.1f} s)   "
                f"other load {side['other_load_cores']:.2f} cores"
            )
        goal = (
            f"target {t['ratio']:.2f}x"
            if "sharing_bound" not in t
            else f"target {t['ratio']:.2f}x = {BLIMP_SHARE_OF_BOUND:.0%} of the sharing bound {t['sharing_bound']:.2f}x"
        )
        print(
            f"  ratio     scoring {r['ratio_score']:.2f}x   whole process {r['ratio_wall']:.2f}x   "
            f"({goal}: {'PASS' if t['met'] else 'FAIL'})"
        )
        metrics = "  ".join(f"{m} {v['hubmerge']:.4f} vs {v['lm_eval']:.4f}" for m, v in r["metrics"].items())
        print(f"  metrics (hubmerge vs lm-eval): {metrics}")
        print(
            f"  predictions differing: {len(c['differing'])} (+ {len(c['near_ties'])} at near-ties <= {NEAR_TIE:g}); "
            f"max |loglik diff| {c['max_abs_loglik_diff']:.2e}"
        )
        for case in c["differing"] + c["near_ties"]:
            print(f"    doc {case['doc_id']}: top-two gap {case['top_two_gap']:.2e}; hubmerge {case['hubmerge']}; "
                  f"lm-eval {case['lm_eval']}")  # fmt: skip
        print(f"  lm-eval: {lm['command']}\n  hubmerge: {ours['command']}")
    print(f"\n{os.cpu_count()} CPUs; load average before {loadavg_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    log(f"done in {time.perf_counter() - started:.0f} s")
    sys.exit(code)
