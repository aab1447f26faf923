"""What ``hubmerge sweep --ray`` costs and saves against the one-process sweep, measured here and projected to 8 GPUs.

Measured, on this machine (2 cores): one sweep recipe (make_trajectory.py's Llama with the demo grammar's word
tokenizer in each revision, windows 1/2/4, stride 1, ``sweep.max_windows_on_disk`` set so the windows fall into
several passes, ``keep: false``, scored on the built-in ``blimp`` task over the demo's minimal pairs with a
``limit``) runs three ways, each in its own child process, on the same inputs, into the same (emptied) output folder
and results store, so the report files can be compared byte for byte:

(a) baseline: ``hubmerge sweep RECIPE`` (one process);
(b) ``hubmerge sweep RECIPE --ray``: the command starts its own local Ray (2 CPUs), so Ray's start-up is in the wall;
(c) ``hubmerge sweep RECIPE --ray-address ADDR``: against a Ray head started once beforehand (``ray start --head
    --num-cpus 2 --disable-usage-stats``, its own ``--temp-dir``), whose workers stay warm between runs: the per-task
    cost without the start-up. It is stopped by ending its own process session, not by ``ray stop`` (which ends
    every Ray process on the machine). Every child runs with ``RAY_AUTH_MODE=disabled``: Ray 2.5x's ``ray start``
    otherwise turns token authentication on and a driver without the token cannot join.

Each child is the CLI itself (``hubmerge.cli.main`` with that argv), with ``hubmerge.workflows.sweep``'s
``run_sweep_recipe`` wrapped to record the ``bytes_read`` its report counted (the CLI prints no byte count), and,
for the baseline's build and scoring rates, ``run_sweep``/``run_eval`` wrapped in timers; nothing else changes.
Modes alternate which goes first across ``--repeat`` runs; figures are medians, ratios ray / one-process with the
min-max over repeats (repeat i against repeat i). Before any ratio is printed the runs must agree with the first
baseline run: every window's merge output (its tombstone, the ``hubmerge.json`` with each file's sha256) byte for
byte, and the results store's scores and log-likelihoods (``ResultsStore.scores``/``export``) and the report's
figures (CSV/JSON, ``recommendation.json``; plots excepted) within ``TOLERANCE``; stored predictions that differ
are counted. Otherwise the script refuses (exit 1). Not byte for byte, because scoring sums float32 in an order
that follows torch's thread count (2 threads in one process here, 1 in each Ray task).

Bytes each source was read come from the sweep plan (``hubmerge sweep`` has no ``--dry-run``, so this calls
``hubmerge.merging.sweep.plan_sweep`` on the same sources, sizes and ``max_windows_on_disk``): each pass reads the
sources its windows span (``hubmerge.merging.executor.needed_sources``). On Ray each pass is one task that runs the
same shared read, so the reads per source are the same; the totals are checked against every run's measured
``bytes_read``. Ray's own overhead (``import ray``, ``ray.init(num_cpus=2)``, the first task, trivial task round
trips, ``ray.shutdown()``; and connecting to the running head) is timed in a child of its own.

Projected, on paper (no measurement): 8 GPU workers, Pythia-1.4B, 40 revisions, windows 1/2/4/8, stride 1: models
scored, bytes pulled from the Hub and read by the passes, wall. Every assumption is a named constant below and is
printed with the table; the rates measured here appear only as labelled inputs.

``python benchmarks/sweep_ray.py`` (about 5 minutes here); ``--quick`` is a smoke test (tiny model, 1 repeat,
about 1.5 minutes). Needs hubmerge's ``ray`` extra.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import heapq
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from make_trajectory import SMALL, ModelSpec, build_trajectory  # beside this script
from merge_vs_mergekit import GB, MB, OFFLINE_ENV, REPO, Run, log, measure, warm_cache
from stream_vs_cache import free_port

# ------------------------------------------------------------------------------------------------- measured setup
# Default: make_trajectory's 7.3M-parameter Llama (14.5 MB a revision, 3 shards), 8 revisions; windows 1/2/4 are
# 7 + 5 = 12 averaged windows (+ 8 raw checkpoints scored), 3 windows on disk at most: 4 passes.
FULL = dataclasses.replace(SMALL, name="llama-7m-r8", revisions=8)
FULL_SIZES, FULL_MAX_ON_DISK, FULL_LIMIT, FULL_REPEAT = [1, 2, 4], 3, 12, 3
# --quick: a 0.6M-parameter Llama, 6 revisions: 5 + 3 = 8 averaged windows, 3 passes; 6 pairs per paradigm.
QUICK = ModelSpec("llama-tiny-r6", 128, 2, 4, 344, 1024, max_shard_bytes=500_000, revisions=6)
QUICK_SIZES, QUICK_MAX_ON_DISK, QUICK_LIMIT, QUICK_REPEAT = [1, 2, 4], 3, 6, 1
PAIRS_PER_PARADIGM = 50  # written to the pairs file; the recipe's evaluate.limit takes the first LIMIT of each
RAY_CPUS = 2
MODES = ["one", "ray-local", "ray-head"]
LABELS = {
    "one": "(a) one process: `hubmerge sweep RECIPE`",
    "ray-local": "(b) `--ray`: a local Ray started by the command (start-up included)",
    "ray-head": "(c) `--ray-address`: a Ray head started beforehand (warm workers)",
}

# ------------------------------------------------------------------------------------------ projection: assumptions
PROJ_WORKERS = 8  # GPU workers (one GPU and at least one CPU each), each running one Ray task at a time
PROJ_MODEL = "EleutherAI/pythia-1.4b"
PROJ_PARAMS = 1.41e9  # Pythia-1.4B parameters
PROJ_BYTES_PER_PARAM = 2  # fp16 weights (recipes/pythia-1.4b-last5.yaml: "about 2.9 GB per revision in fp16")
PROJ_REVISIONS = 40  # e.g. step104000..step143000, every 1000 (../shared/notes/models.md: step branches every 1000)
PROJ_SIZES = [1, 2, 4, 8]
PROJ_STRIDE = 1
PROJ_MAX_ON_DISK = [None, 16, 8]  # sweep.max_windows_on_disk: None = every window in one pass
PROJ_HUB_BW = 250e6  # B/s, the cluster's download from the Hub into the shared HF cache (fetch: cache), each
#                      revision pulled once whatever the passes (fetch: stream instead re-reads each pass's span)
PROJ_READ_BW = 500e6  # B/s a worker reads sources from the shared file system / HF cache during a pass
PROJ_WRITE_BW = 500e6  # B/s a worker writes its pass's window folders to its own disk
PROJ_LOAD_BW = 1e9  # B/s a task loads one model (a window it built, or a raw revision) onto its GPU
PROJ_REQUESTS_PER_MODEL = 12_000  # ~pretrain_sweep.py's tasks: 40 BLiMP paradigms x 100 pairs x 2 sentences
#                                   + ARC-Easy, PIQA, SciQ x 500 questions x 2-4 choices
PROJ_GPU_REQUESTS_PER_S = 500.0  # scored (context, continuation) requests/s of a 1.4B fp16 model on one GPU, batched
PROJ_NOTES = [
    "each pass is one Ray task on one worker: it reads the sources its windows span once (needed_sources), writes "
    "its windows to its own disk, then loads and scores each on its GPU and deletes it (--no-keep)",
    "each raw revision is scored by a (model, task) task of its own, which loads it from the shared HF cache",
    "pass tasks and raw scoring tasks are independent: all are assigned longest first to the next free worker",
    "window disk, bound: max_windows_on_disk windows per running pass (it bounds each pass, not the cluster), "
    "min(passes, workers) passes at once; one pass holds every window until each is scored and deleted",
    "the pull from the Hub is serial and before everything (an upper bound: it can overlap the first passes)",
    "Ray's fixed costs are those measured here (start-up, per-task round trip), labelled as such",
    "1 worker: the same work on one GPU machine, one process (no Ray costs)",
]


# ------------------------------------------------------------------------------------------------- child processes
# One measured sweep: the CLI as a user runs it, with run_sweep_recipe (and, for timings, run_sweep and run_eval)
# wrapped. argv: result file, then the CLI's own argv.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
result_file, *cli = sys.argv[1:]
import hubmerge.workflows.sweep as ws
from hubmerge.cli import main
info = {"import_s": time.perf_counter() - t0, "run_sweep_s": 0.0, "run_eval_s": 0.0, "eval_in_sweep_s": 0.0,
        "run_eval_calls": 0, "timed": hasattr(ws, "run_sweep") and hasattr(ws, "run_eval")}
recipe_fn = ws.run_sweep_recipe
def run_sweep_recipe(*a, **k):
    s = time.perf_counter()
    report = recipe_fn(*a, **k)
    info.update(recipe_s=time.perf_counter() - s, bytes_read=report.bytes_read, windows=report.windows)
    return report
ws.run_sweep_recipe = run_sweep_recipe
if info["timed"]:
    sweep_fn, eval_fn = ws.run_sweep, ws.run_eval
    def run_sweep(*a, **k):
        s, e = time.perf_counter(), info["run_eval_s"]
        try:
            return sweep_fn(*a, **k)
        finally:
            info["run_sweep_s"] += time.perf_counter() - s
            info["eval_in_sweep_s"] += info["run_eval_s"] - e
    def run_eval(*a, **k):
        s = time.perf_counter()
        try:
            return eval_fn(*a, **k)
        finally:
            info["run_eval_s"] += time.perf_counter() - s
            info["run_eval_calls"] += 1
    ws.run_sweep, ws.run_eval = run_sweep, run_eval
sys.argv = ["hubmerge", *cli]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
info["exit"] = code
with open(result_file, "w") as f:
    json.dump(info, f)
sys.exit(code)
"""

# Ray's own costs, nothing of hubmerge. argv: result file, address ("" = a new local instance of RAY_CPUS CPUs).
RAY_CHILD = r"""
import json, sys, time
result_file, address, cpus = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
kw = {"address": address} if address else {"num_cpus": cpus}
ray.init(include_dashboard=False, log_to_driver=False, **kw)
t2 = time.perf_counter()
@ray.remote(num_cpus=1)
def f(x):
    return x
ray.get(f.remote(0))
t3 = time.perf_counter()
n_seq, n_par = 20, 200
for i in range(n_seq):
    ray.get(f.remote(i))
t4 = time.perf_counter()
ray.get([f.remote(i) for i in range(n_par)])
t5 = time.perf_counter()
ray.shutdown()
t6 = time.perf_counter()
with open(result_file, "w") as out:
    json.dump({"import_s": t1 - t0, "init_s": t2 - t1, "first_task_s": t3 - t2,
               "round_trip_ms": 1e3 * (t4 - t3) / n_seq, "parallel_task_ms": 1e3 * (t5 - t4) / n_par,
               "shutdown_s": t6 - t5, "init_plus_shutdown_s": t2 - t1 + t6 - t5, "total_s": t6 - t0}, out)
"""


# --------------------------------------------------------------------------------------------------------- inputs
def make_checkpoints(work: Path, spec: ModelSpec) -> list[Path]:
    """``work/ckpts/stepN``: the synthetic revisions (weights hard-linked) with the demo grammar's word tokenizer,
    so the built-in blimp task can score them; ``N`` = 1000, 2000, ... (the sweep reads steps from the names)."""
    from hubmerge.demo.grammar import vocabulary
    from hubmerge.demo.train import build_tokenizer

    revisions = build_trajectory(work / f"trajectory-{spec.name}", spec, log=log)
    tokenizer = build_tokenizer([" ".join(vocabulary())], kind="word")
    if len(tokenizer) > spec.vocab_size:
        raise SystemExit(f"the grammar's {len(tokenizer)} tokens do not fit {spec.name}'s vocabulary")
    root = work / "ckpts"
    shutil.rmtree(root, ignore_errors=True)
    out = []
    for i, rev in enumerate(revisions):
        dst = root / f"step{(i + 1) * 1000}"
        dst.mkdir(parents=True)
        for f in rev.iterdir():
            if f.is_file():
                os.link(f, dst / f.name)
        tokenizer.save_pretrained(dst)
        cfg_path = dst / "tokenizer_config.json"  # as the demo's checkpoints name it, for transformers 4.x readers
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        out.append(dst)
    return out


def write_recipe(work: Path, ckpts: list[Path], pairs: Path, sizes: list[int], k: int, limit: int) -> Path:
    recipe = {
        "name": "ray-bench-sweep",
        "sources": [{"path": str(p)} for p in ckpts],
        "method": "uniform",
        "dtype": "float16",
        "output": {"path": str(work / "sweep"), "max_shard_size": "5GB"},
        "evaluate": {"tasks": "blimp", "data": str(pairs), "limit": limit, "results": str(work / "res")},
        "sweep": {"sizes": sizes, "stride": 1, "max_windows_on_disk": k, "keep": False},
    }
    path = work / "configs" / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def plan_reads(ckpts: list[Path], sizes: list[int], k: int, root: Path) -> dict:
    """What ``hubmerge sweep`` will read, from its own planner (an empty output folder: every window to do)."""
    from hubmerge.io.checkpoint import SourceRef
    from hubmerge.merging.executor import needed_sources
    from hubmerge.merging.sweep import plan_sweep

    shutil.rmtree(root, ignore_errors=True)
    plan = plan_sweep(
        [SourceRef(p, p.name) for p in ckpts],
        [w for w in sizes if w > 1],
        root,
        stride=1,
        dtype="float16",
        max_shard_size="5GB",
        max_windows_on_disk=k,
        name="ray-bench-sweep",
    )
    passes = [needed_sources(b) for b in plan.batches]
    per_source = [
        {
            "source": p.name,
            "bytes": plan.source_bytes(t),
            "reads": sum(t in spans for spans in passes),
            "passes": [i + 1 for i, spans in enumerate(passes) if t in spans],
        }
        for t, p in enumerate(ckpts)
    ]
    total = sum(s["bytes"] * s["reads"] for s in per_source)
    if total != plan.bytes_read:
        raise SystemExit(f"per-source reads add up to {total} B, the plan says {plan.bytes_read} B")
    return {
        "passes": [[w.name for w in b] for b in plan.batches],
        "spans": passes,
        "per_source": per_source,
        "bytes_read": plan.bytes_read,
        "bytes_read_independent": plan.bytes_read_independent,
        "windows": len(plan.todo),
    }


# ------------------------------------------------------------------------------------------------------ measuring
def sweep_command(mode: str, recipe: Path, result: Path, address: str | None) -> list[str]:
    cli = ["sweep", str(recipe), "--quiet"]
    if mode == "ray-local":
        cli.append("--ray")
    elif mode == "ray-head":
        cli += ["--ray-address", str(address)]
    return [sys.executable, "-c", CHILD, str(result), *cli]


# Scoring is float32 arithmetic whose summation order follows torch's thread count: the one-process sweep scores
# with this machine's 2 threads, a Ray task with its 1 CPU's one, so log-likelihoods may differ in the last bits
# (measured here: at most ~1e-6 on this model). Merged weights do not (elementwise, in a fixed order).
TOLERANCE = 1e-4  # the most any score, log-likelihood or report figure may move before the runs "disagree"


def numbers_apart(a: object, b: object) -> float:
    """The largest |difference| between the numbers of two JSON-like values of the same shape; inf if their
    shapes, keys or non-numbers differ."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return 0.0 if a == b else math.inf
    if isinstance(a, int | float) and isinstance(b, int | float):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return abs(float(a) - float(b))
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((numbers_apart(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((numbers_apart(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0 if a == b else math.inf


def _cells(text: str) -> list:
    """A CSV's rows, its numbers as floats."""

    def num(v: str) -> object:
        try:
            return float(v)
        except ValueError:
            return v

    return [[num(v) for v in row] for row in csv.reader(text.splitlines())]


def fingerprint(work: Path) -> dict:
    """What a run left, to compare: the sha256 of every merge output (tombstones: hubmerge.json of each window),
    the report's figures (CSV/JSON parsed; plots aside) and the store's rows (scores, predictions,
    log-likelihoods), each table sorted."""
    from hubmerge.results.store import ResultsStore

    root = work / "sweep"
    files, report = {}, {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix == ".png":
            continue
        name = p.relative_to(root).as_posix()
        if name.startswith("report/") or p.name == "recommendation.json":
            report[name] = json.loads(p.read_text()) if p.suffix == ".json" else _cells(p.read_text())
        else:
            files[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    store = ResultsStore(work / "res", read_only=True)
    rows: dict[str, list] = {"scores": sorted(([dataclasses.asdict(s) for s in store.scores()]), key=repr)}
    for table in ("predictions", "logliks"):
        path = work / "tmp" / f"{table}.json"
        store.export(path, table=table)
        rows[table] = sorted(json.loads(path.read_text()), key=lambda r: json.dumps(_key(r), sort_keys=True))
        path.unlink()
    store.close()
    return {"files": files, "report": report, "store": rows, "n_scores": len(rows["scores"])}


def _key(row: dict) -> dict:
    """A store row's identity: its fields that are not floats (model, task, doc, choice...)."""
    return {k: v for k, v in row.items() if not isinstance(v, float)}


def one_run(mode: str, recipe: Path, ckpts: list[Path], work: Path, env: dict, address: str | None, tag: str) -> dict:
    for name in ("sweep", "res"):
        shutil.rmtree(work / name, ignore_errors=True)
    warm_cache(ckpts)
    result = work / "logs" / f"{tag}.json"
    result.unlink(missing_ok=True)
    run = measure(Run(mode, 0, 0, sweep_command(mode, recipe, result, address)), work / "logs" / f"{tag}.log", env)
    row = {"mode": mode, "tag": tag, "wall_s": run.wall_s, "cpu_s": run.cpu_s, "other_load": run.other_load_cores}
    row["peak_rss_mb"] = run.peak_rss_mb
    row["ok"] = run.ok and result.is_file()
    row["error"] = run.error
    if row["ok"]:
        row.update(json.loads(result.read_text()))
        row["fingerprint"] = fingerprint(work)
        log(
            f"  {tag:18} {run.wall_s:7.2f} s wall, cpu {run.cpu_s:6.2f} s (this process tree), read "
            f"{row['bytes_read'] / MB:.1f} MB, {row['windows']} windows, other load {run.other_load_cores:.2f} cores"
        )
    else:
        log(f"  {tag:18} FAILED: {run.error or 'no result file'} (log {work / 'logs' / f'{tag}.log'})")
    return row


def ray_overhead(work: Path, env: dict, address: str | None, tag: str) -> dict:
    result = work / "logs" / f"{tag}.json"
    run = measure(
        Run(tag, 0, 0, [sys.executable, "-c", RAY_CHILD, str(result), address or "", str(RAY_CPUS)]),
        work / "logs" / f"{tag}.log",
        env,
    )
    if not run.ok or not result.is_file():
        raise SystemExit(f"{tag} failed: {run.error} (log {work / 'logs' / f'{tag}.log'})")
    data = {**json.loads(result.read_text()), "process_s": run.wall_s}
    log(
        f"  {tag}: import {data['import_s']:.2f} s, init {data['init_s']:.2f} s, first task {data['first_task_s']:.2f}"
        f" s, round trip {data['round_trip_ms']:.1f} ms, {data['parallel_task_ms']:.2f} ms/task in a batch, "
        f"shutdown {data['shutdown_s']:.2f} s; process {run.wall_s:.2f} s"
    )
    return data


class RayHead:
    """``ray start --head --block`` in a session of its own, so that stopping it ends only its processes."""

    def __init__(self, work: Path, env: dict) -> None:
        self.port = free_port()
        self.address = ""
        self.temp = work / "ray"  # short: Ray's socket paths must stay under 107 bytes
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [str(ray_bin if ray_bin.is_file() else "ray"), "start", "--head", "--num-cpus", str(RAY_CPUS)]
        cmd += ["--disable-usage-stats", "--include-dashboard", "false", "--port", str(self.port)]
        cmd += ["--temp-dir", str(self.temp), "--block"]
        self.log = open(work / "logs" / "ray-head.log", "wb")  # noqa: SIM115 - closed in stop()
        began = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # ray start prints the address to join: "ray start --address='HOST:PORT'" (HOST: the node's IP)
            found = re.search(r"--address='([^']+)'", Path(self.log.name).read_text(errors="replace"))
            if found:
                self.address = found.group(1)
                host, _, port = self.address.rpartition(":")
                with socket.socket() as s:
                    if s.connect_ex((host, int(port))) == 0:
                        break
            if self.proc.poll() is not None:
                raise SystemExit(f"ray start exited with {self.proc.returncode}; see {self.log.name}")
            time.sleep(0.2)
        else:
            self.stop()
            raise SystemExit(f"the Ray head did not start within 120 s; see {self.log.name}")
        self.start_s = time.perf_counter() - began

    def stop(self) -> None:
        """SIGTERM to the head's session (``ray stop`` would end every Ray process on the machine), then SIGKILL."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for _ in range(100):  # the head's children leave after it
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.3)
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# -------------------------------------------------------------------------------------------------------- results
def med(rows: list[dict], mode: str, key: str) -> float:
    values = [r[key] for r in rows if r["mode"] == mode and r["ok"] and r.get(key) is not None]
    return statistics.median(values) if values else math.nan


def ratio(rows: list[dict], mode: str, key: str = "wall_s") -> tuple[float, float, float]:
    by = {(r["mode"], r["repeat"]): r[key] for r in rows if r["ok"]}
    repeats = sorted(i for m, i in by if m == "one")
    rs = [by[mode, i] / by["one", i] for i in repeats if (mode, i) in by]
    return (statistics.median(rs), min(rs), max(rs)) if rs else (math.nan, math.nan, math.nan)


def agreement(rows: list[dict], reference: dict) -> list[str]:
    """What differs from the reference run (the first baseline), one line each; empty when all agree. Sets each
    row's ``apart`` (the largest difference of a score, log-likelihood or report figure) and ``flips`` (stored
    predictions that differ: possible only on a near-tie)."""
    problems = []
    for r in rows:
        if not r["ok"]:
            problems.append(f"{r['tag']}: failed ({r['error']})")
            continue
        fp = r.pop("fingerprint")
        if fp["files"] != reference["files"]:
            diff = sorted(set(fp["files"].items()) ^ set(reference["files"].items()))
            problems.append(f"{r['tag']}: merge outputs differ ({', '.join(sorted({n for n, _ in diff})[:5])})")
        apart = numbers_apart(fp["report"], reference["report"])
        for table in ("scores", "logliks"):
            apart = max(apart, numbers_apart(fp["store"][table], reference["store"][table]))
        mine, theirs = fp["store"]["predictions"], reference["store"]["predictions"]
        r["flips"] = sum(a != b for a, b in zip(mine, theirs, strict=False)) + abs(len(mine) - len(theirs))
        r["apart"], r["n_scores"] = apart, fp["n_scores"]
        if apart > TOLERANCE:
            problems.append(f"{r['tag']}: a score, log-likelihood or report figure moved by {apart:.3g}")
    return problems


def lpt(durations: list[float], workers: int) -> float:
    """Makespan of independent tasks given longest first to the next free worker."""
    free = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free) if durations else 0.0


def paper_passes(count: int, sizes: list[int], stride: int, k: int | None) -> list[list[tuple[int, int]]]:
    """The planner's passes on paper: windows ``(start, size)`` ordered by last source (then first), cut into groups
    of ``k``; main() checks them against ``plan_sweep``'s on the measured trajectory."""
    from hubmerge.merging.sweep import window_positions

    windows = sorted(window_positions(count, sizes, stride), key=lambda w: (w[0] + w[1], w[0]))
    step = k or len(windows)
    return [windows[i : i + step] for i in range(0, len(windows), step)]


def spans_of(passes: list[list[tuple[int, int]]]) -> list[list[int]]:
    return [sorted({t for s, w in p for t in range(s, s + w)}) for p in passes]


def project(ray_fixed_s: float, round_trip_s: float, build_bw_measured: float | None) -> dict:
    """The projected figures for PROJ_MODEL: one row per max_windows_on_disk."""
    rev = PROJ_PARAMS * PROJ_BYTES_PER_PARAM
    windows = [w for p in paper_passes(PROJ_REVISIONS, PROJ_SIZES, PROJ_STRIDE, None) for w in p]
    raw = PROJ_REVISIONS if 1 in PROJ_SIZES else 0  # size 1: the raw checkpoints, scored, not merged
    models = raw + len(windows)
    score_one = rev / PROJ_LOAD_BW + PROJ_REQUESTS_PER_MODEL / PROJ_GPU_REQUESTS_PER_S
    pull_s = PROJ_REVISIONS * rev / PROJ_HUB_BW
    rows = []
    for k in PROJ_MAX_ON_DISK:
        passes = paper_passes(PROJ_REVISIONS, PROJ_SIZES, PROJ_STRIDE, k)
        spans = spans_of(passes)
        reads = sum(len(s) for s in spans)

        def pass_s(span: list[int], p: list, bw: float) -> float:
            return len(span) * rev / bw + len(p) * rev / PROJ_WRITE_BW

        build = [pass_s(s, p, PROJ_READ_BW) for s, p in zip(spans, passes, strict=True)]
        tasks = [b + len(p) * score_one for b, p in zip(build, passes, strict=True)] + [score_one] * raw
        row = {
            "max_windows_on_disk": k,
            "passes": len(passes),
            "models_scored": models,
            "hub_bytes": PROJ_REVISIONS * rev,
            "source_reads": reads,
            "pass_read_bytes": reads * rev,
            "window_write_bytes": len(windows) * rev,
            "window_disk_bytes_peak": min(len(passes), PROJ_WORKERS) * max(len(p) for p in passes) * rev,
            "pull_s": pull_s,
            "build_s_1": sum(build),
            "score_s_1": models * score_one,
            "longest_task_s": max(tasks),
            "tasks_s_n": lpt(tasks, PROJ_WORKERS),
            "ray_s": ray_fixed_s + (len(passes) + raw) * round_trip_s,
        }
        if build_bw_measured:
            measured = [pass_s(s, p, min(PROJ_READ_BW, build_bw_measured)) for s, p in zip(spans, passes, strict=True)]
            slow = [b + len(p) * score_one for b, p in zip(measured, passes, strict=True)] + [score_one] * raw
            row["tasks_s_n_measured_rate"] = lpt(slow, PROJ_WORKERS)
        row["wall_s_1"] = row["pull_s"] + row["build_s_1"] + row["score_s_1"]
        row["wall_s_n"] = row["pull_s"] + row["tasks_s_n"] + row["ray_s"]
        rows.append(row)
    return {"rev_bytes": rev, "windows": len(windows), "score_one_s": score_one, "rows": rows}


def fmt_bytes(b: float) -> str:
    return f"{b / GB:.1f} GB" if b >= 0.1 * GB else f"{b / MB:.1f} MB"


def fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 600 else f"{s:.0f} s"


def report(meta: dict, rows: list[dict], plan: dict, over: dict, proj: dict, problems: list[str]) -> str:
    lines = [
        f"### `hubmerge sweep --ray` against one process: {meta['spec']} ({meta['rev_mb']:.1f} MB a revision, "
        f"{meta['revisions']} revisions), windows {meta['sizes']}, stride 1, max_windows_on_disk {meta['k']}: "
        f"{plan['windows']} averaged windows in {len(plan['passes'])} passes, {meta['models']} models scored on "
        f"blimp (limit {meta['limit']} a paradigm); {RAY_CPUS}-CPU Ray on this {os.cpu_count()}-core machine",
        "",
        f"Measured: median of {meta['repeat']} runs each (ratio: ray / one process, min-max over repeats; "
        f"{'no warm-up run' if meta['quick'] else 'one warm-up run of (a) and (c) not counted'}).",
        "",
    ]
    if problems:
        lines += ["**The runs disagree: ratios withheld.**", ""] + [f"- {p}" for p in problems]
        return "\n".join(lines)
    lines += [
        "| run | wall s | ratio (wall) | cpu s (driver's tree) | bytes read (counted) | windows | outputs |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for mode in MODES:
        if not any(r["mode"] == mode and r["ok"] for r in rows):
            continue
        mode_rows = [r for r in rows if r["mode"] == mode and r["ok"]]
        apart, flips = max(r["apart"] for r in mode_rows), max(r["flips"] for r in mode_rows)
        outputs = "reference" if mode == "one" else f"merges identical; scores within {apart:.1e}, {flips} flips"
        m, lo, hi = ratio(rows, mode)
        rat = "1" if mode == "one" else f"**{m:.2f}x** ({lo:.2f}-{hi:.2f})"
        reads = {r["bytes_read"] for r in rows if r["mode"] == mode and r["ok"]}
        lines.append(
            f"| {LABELS[mode]} | {med(rows, mode, 'wall_s'):.1f} | {rat} | {med(rows, mode, 'cpu_s'):.1f} | "
            f"{' / '.join(fmt_bytes(b) for b in sorted(reads))} | {med(rows, mode, 'windows'):.0f} | "
            f"{outputs} |"
        )
    lo, ho = over["local"], over.get("head")
    wa, wb, wc = (med(rows, m, "wall_s") for m in MODES)
    lines += [
        "",
        "cpu s: what `wait4` reports for the driver and the children it reaped; the head's workers of (c) are "
        "not in it. The head stays up (idle) during (a) and (b) too.",
        "",
        "Against the first one-process run: every window's merge output (its hubmerge.json, with each file's "
        "sha256) is identical; the store's rows (scores, predictions, log-likelihoods: "
        f"{rows[0]['n_scores']} scores) and the report's figures (CSV/JSON, recommendation.json; plots aside) "
        f"agree within {TOLERANCE:g} (outputs column: the largest difference, and how many stored predictions "
        "differ). Scoring is float32 arithmetic summed in an order that follows torch's thread count: one process "
        "scores with this machine's 2 threads, each Ray task with its 1 CPU's one, so log-likelihoods may differ in "
        "their last bits; merged weights cannot (elementwise, in a fixed order).",
        "",
        f"Ray's own costs (a child of their own): `import ray` {lo['import_s']:.2f} s, `ray.init(num_cpus={RAY_CPUS})` "
        f"{lo['init_s']:.2f} s + `ray.shutdown()` {lo['shutdown_s']:.2f} s = {lo['init_plus_shutdown_s']:.2f} s, "
        f"first task (a worker starting) {lo['first_task_s']:.2f} s, then {lo['round_trip_ms']:.1f} ms a round trip "
        f"of a trivial task ({lo['parallel_task_ms']:.2f} ms a task in a batch of 200)"
        + (
            f"; against the running head: connecting {ho['init_s']:.2f} s, first task {ho['first_task_s']:.2f} s, "
            f"{ho['round_trip_ms']:.1f} ms a round trip; starting the head took {meta['head_start_s']:.1f} s."
            if ho
            else "."
        ),
        f"In the sweep, against one process: (b) {wb - wa:+.1f} s, (c) {wc - wa:+.1f} s (on {RAY_CPUS} CPUs the "
        f"passes and scoring tasks run two at a time, against Ray's costs); (b) - (c) = {wb - wc:+.1f} s is what the "
        "command's own Ray start-up and cold workers cost in the sweep. "
        + (
            f"One process: {meta['build_s']:.1f} s building ({fmt_bytes(plan['bytes_read'])} read: "
            f"{meta['build_bw'] / MB:.0f} MB/s of source), {meta['eval_s']:.1f} s scoring "
            f"({meta['eval_s'] / meta['models']:.2f} s a model)."
            if meta.get("build_s") is not None
            else ""
        ),
        "",
        "Reads per source (planned by `plan_sweep`; each pass reads the sources its windows span; on Ray each pass is "
        "one task running the same read, so the counts are the same):",
        "",
        "| source | size | reads, one process | reads, Ray | in passes |",
        "|---|---:|---:|---:|---|",
    ]
    for s in plan["per_source"]:
        lines.append(
            f"| {s['source']} | {fmt_bytes(s['bytes'])} | {s['reads']} | {s['reads']} | "
            f"{', '.join(map(str, s['passes'])) or '-'} |"
        )
    measured = sorted({r["bytes_read"] for r in rows if r["ok"]})
    lines += [
        f"| total | | {fmt_bytes(plan['bytes_read'])} | {fmt_bytes(plan['bytes_read'])} | "
        f"independent merges would read {fmt_bytes(plan['bytes_read_independent'])} |",
        "",
        f"Counted by every run: {', '.join(f'{b} B' for b in measured)}; planned {plan['bytes_read']} B: "
        + ("equal." if measured == [plan["bytes_read"]] else "**DIFFERENT**."),
        "",
        f"### Projected (not measured): {PROJ_WORKERS} GPU workers, {PROJ_MODEL} ({PROJ_PARAMS / 1e9:.2f}B params, "
        f"{fmt_bytes(proj['rev_bytes'])} a revision), {PROJ_REVISIONS} revisions, windows "
        f"{'/'.join(map(str, PROJ_SIZES))}, stride {PROJ_STRIDE}: {proj['windows']} averaged windows + "
        f"{PROJ_REVISIONS} raw = {proj['rows'][0]['models_scored']} models scored",
        "",
        "| max_windows_on_disk | passes | pulled from the Hub | read by the passes (source reads) | windows written "
        f"| window disk, bound | longest task | tasks, {PROJ_WORKERS} workers | Ray fixed "
        f"| wall, {PROJ_WORKERS} workers | wall, 1 worker | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in proj["rows"]:
        tasks = fmt_s(p["tasks_s_n"])
        if "tasks_s_n_measured_rate" in p:
            tasks += f" ({fmt_s(p['tasks_s_n_measured_rate'])} at the build rate measured here)"
        lines.append(
            f"| {p['max_windows_on_disk'] or 'all (one pass)'} | {p['passes']} | {fmt_bytes(p['hub_bytes'])} | "
            f"{fmt_bytes(p['pass_read_bytes'])} ({p['source_reads']}) | {fmt_bytes(p['window_write_bytes'])} | "
            f"{fmt_bytes(p['window_disk_bytes_peak'])} | {fmt_s(p['longest_task_s'])} | {tasks} | "
            f"{p['ray_s']:.0f} s | **{fmt_s(p['wall_s_n'])}** | {fmt_s(p['wall_s_1'])} | "
            f"{p['wall_s_1'] / p['wall_s_n']:.1f}x |"
        )
    lines += [
        "",
        "Assumptions (named constants in benchmarks/sweep_ray.py):",
        "",
        f"- PROJ_PARAMS = {PROJ_PARAMS:.3g}, PROJ_BYTES_PER_PARAM = {PROJ_BYTES_PER_PARAM} (fp16): "
        f"{fmt_bytes(proj['rev_bytes'])} a revision; PROJ_REVISIONS = {PROJ_REVISIONS}",
        f"- PROJ_HUB_BW = {PROJ_HUB_BW / MB:.0f} MB/s (the pull into the shared HF cache, `fetch: cache`: each "
        "revision pulled once, whatever the passes; with `fetch: stream` each pass would stream its span instead)",
        f"- PROJ_READ_BW = {PROJ_READ_BW / MB:.0f} MB/s a worker reads sources in a pass; PROJ_WRITE_BW = "
        f"{PROJ_WRITE_BW / MB:.0f} MB/s it writes windows",
        f"- PROJ_LOAD_BW = {PROJ_LOAD_BW / MB:.0f} MB/s a scoring task loads a model; PROJ_REQUESTS_PER_MODEL = "
        f"{PROJ_REQUESTS_PER_MODEL}; PROJ_GPU_REQUESTS_PER_S = {PROJ_GPU_REQUESTS_PER_S:.0f}: "
        f"{proj['score_one_s']:.1f} s a model",
        f"- Ray fixed: start-up {over['local']['init_plus_shutdown_s']:.1f} s and {over['local']['round_trip_ms']:.1f}"
        " ms a task round trip, measured here (labelled input)",
    ]
    if meta.get("build_bw"):
        lines.append(
            f"- measured here (labelled input, one process, {meta['spec']}, fixed costs included): build "
            f"{meta['build_bw'] / MB:.0f} MB/s of source; shown in brackets as a cap on PROJ_READ_BW; the 2-core "
            f"scoring rate ({meta['eval_s'] / meta['models']:.2f} s a tiny model on CPU) says nothing of a GPU: unused"
        )
    lines += [f"- {n}" for n in PROJ_NOTES]
    lines += [
        "",
        f"Load average {meta['load_before']} before, {meta['load_after']} after; other processes kept "
        f"{meta['other_load']:.2f} cores busy during the runs (median); {meta['minutes']:.1f} min in all.",
    ]
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, 6 revisions, 1 repeat (smoke test, ~1-2 min)")
    p.add_argument("--repeat", type=int, help=f"measured runs of each mode (default {FULL_REPEAT}; --quick 1)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new /tmp/bench-sweep-ray-*, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        p.error("needs Ray, hubmerge's optional extra: pip install -e '.[ray]'")
    spec = QUICK if args.quick else FULL
    sizes, k, limit = (
        (QUICK_SIZES, QUICK_MAX_ON_DISK, QUICK_LIMIT) if args.quick else (FULL_SIZES, FULL_MAX_ON_DISK, FULL_LIMIT)
    )
    repeat = args.repeat or (QUICK_REPEAT if args.quick else FULL_REPEAT)
    began, load_before = time.perf_counter(), loadavg()
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-sweep-ray-", dir="/tmp"))
    for sub in ("configs", "logs", "tmp"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE_ENV, "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    # RAY_AUTH_MODE=disabled: Ray >= 2.5x's `ray start` turns token authentication on, and a driver without the
    # token (~/.ray/auth_token, not written here) cannot join; one machine, one user: no tokens.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)  # (a) and (b) must not find a cluster; (c) names its own
    rows: list[dict] = []
    head: RayHead | None = None
    over: dict = {}
    try:
        from hubmerge.demo.grammar import write_minimal_pairs

        ckpts = make_checkpoints(work, spec)
        pairs = write_minimal_pairs(work / "pairs.jsonl", PAIRS_PER_PARADIGM, seed=3)
        recipe = write_recipe(work, ckpts, pairs, sizes, k, limit)
        plan = plan_reads(ckpts, sizes, k, work / "sweep")
        if spans_of(paper_passes(len(ckpts), sizes, 1, k)) != plan["spans"]:
            raise SystemExit("the projection's passes on paper differ from plan_sweep's: update paper_passes")
        models = plan["windows"] + len(ckpts)  # the raw checkpoints are always scored
        log(
            f"{spec.name}: {len(ckpts)} revisions, windows {sizes}: {plan['windows']} averaged windows in "
            f"{len(plan['passes'])} passes (max_windows_on_disk {k}), {models} models scored; plan reads "
            f"{fmt_bytes(plan['bytes_read'])}"
        )
        log("Ray's own costs:")
        over["local"] = ray_overhead(work, env, None, "ray-overhead-local")
        head = RayHead(work, env)
        log(f"Ray head at {head.address}, started in {head.start_s:.1f} s")
        over["head"] = ray_overhead(work, env, head.address, "ray-overhead-head")
        if not args.quick:
            for mode in ("one", "ray-head"):  # warm-up, not counted: page cache, imports, the head's workers
                one_run(mode, recipe, ckpts, work, env, head.address, f"warmup-{mode}")
        for r in range(repeat):
            order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
            for mode in order:
                row = one_run(mode, recipe, ckpts, work, env, head.address, f"{mode}-r{r}")
                row["repeat"] = r
                rows.append(row)
    finally:
        if head is not None:
            head.stop()
            log("Ray head stopped")
    base = [r for r in rows if r["mode"] == "one" and r["ok"]]
    problems = agreement(rows, base[0]["fingerprint"]) if base else ["no one-process run succeeded"]
    problems += [
        f"{r['tag']}: read {r['bytes_read']} B, the plan says {plan['bytes_read']} B"
        for r in rows
        if r["ok"] and r["bytes_read"] != plan["bytes_read"]
    ]
    timed = [r for r in base if r.get("timed")]
    build_s = statistics.median(r["run_sweep_s"] - r["eval_in_sweep_s"] for r in timed) if timed else None
    eval_s = statistics.median(r["run_eval_s"] for r in timed) if timed else None
    build_bw = plan["bytes_read"] / build_s if build_s else None
    proj = project(over["local"]["init_plus_shutdown_s"], over["local"]["round_trip_ms"] / 1e3, build_bw)
    loads = [r["other_load"] for r in rows if r["ok"]] or [math.nan]
    meta = {
        "spec": spec.name,
        "revisions": len(ckpts),
        "rev_mb": plan["per_source"][-1]["bytes"] / MB,
        "sizes": sizes,
        "k": k,
        "limit": limit,
        "models": models,
        "repeat": repeat,
        "quick": args.quick,
        "head_start_s": head.start_s if head else math.nan,
        "build_s": build_s,
        "eval_s": eval_s,
        "build_bw": build_bw,
        "load_before": load_before,
        "load_after": loadavg(),
        "other_load": statistics.median(loads),
        "minutes": (time.perf_counter() - began) / 60,
    }
    text = report(meta, rows, plan, over, proj, problems)
    print("\n" + text)
    if args.json:
        constants = {k_: v for k_, v in globals().items() if k_.startswith("PROJ_")}
        payload = {"meta": meta, "plan": plan, "ray_overhead": over, "runs": rows, "problems": problems}
        payload["projection"] = {**proj, "assumptions": constants}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        log(f"results written to {args.json}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
