"""What the merge's two reliability checks cost: the non-finite check, and hashing cached Hub sources as they are read.

1. Non-finite check (``nonfinite: refuse|warn``). The executor takes each chunk's float32 sum from the blocks it
   accumulates (counting NaN/Inf only in a chunk whose sum is not finite) and, when a float16 output comes from a
   wider source dtype, runs ``aminmax`` on each finished chunk before the cast. There is no option to turn it off,
   so the baseline is a child process with a small, labelled patch: "baseline: the executor without the non-finite
   check". Its ``accumulate_blocks`` is the shipped function's own source with the one summing line deleted (the
   benchmark refuses to run if that line is not there), ``count_nonfinite`` counts nothing and ``torch.aminmax``
   returns (0, 0). Everything else (reader, writer, loop, arithmetic) is the shipped code in both children, so the
   difference is the check alone; that is fairer than a worktree of the commit before the feature, which differs in
   other ways too (read order, the cache reader, partial-output records). Two cases: float16 sources to a float16
   output (the sum only) and bfloat16 sources to a float16 output (the sum and ``aminmax``).
2. Hash-in-read for cached Hub sources. The trajectory is served by ``hubmerge hub serve`` (as in
   stream_vs_cache.py), pulled once into a fresh HF cache by a ``hubmerge merge``, then the server is stopped and
   every measured child merges the cached revisions with ``HF_HUB_OFFLINE=1`` (no server on the two cores):
   (a) ``hashed``: as shipped, the sources carry their LFS sha256s, the reader hashes every byte it reads (the
   newest revision's byte order) and verifies; (b) ``unverified`` (baseline): the same plan with each source's
   sha256 removed, so the executor takes the path of a merge without verification (layout order, no hashing);
   (c) ``hash-then-merge`` (the design it replaced): ``hubmerge.io.files.sha256_file`` on every weight file first,
   checked against the sha256, then (b).

Every run is its own process, same inputs, warm page cache (read just before), modes alternating which goes
first; figures are medians of ``--repeat`` runs. "merge s" is timed inside the child around the work that differs
(hashing and ``execute``); "process s" is the whole child, start to exit. Ratios are feature / baseline, median
with the min-max over repeats (the i-th run of one side against the i-th of the other).

``python benchmarks/reliability_overhead.py`` (~6 minutes here); ``--quick`` is a tiny smoke test (under a minute).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from make_trajectory import ModelSpec, build_trajectory  # beside this script
from merge_vs_mergekit import MB, OFFLINE_ENV, REPO, Run, log, measure, warm_cache
from stream_vs_cache import HUB_REPO, Server, seed_hub

# The merge benchmark's 176.6M-parameter Llama (353 MB a revision in fp16, 3 shards), 8 revisions: 2.8 GB a merge,
# a few seconds of merging (at 4 x 200 MB a merge took 0.3-0.6 s, and run-to-run jitter swamped the ratios).
# --quick: ~7M parameters, 14.5 MB a revision, 4 revisions.
FULL = ModelSpec("llama-177m", 768, 18, 12, 2048, 32000, max_shard_bytes=150_000_000, revisions=8)
QUICK = ModelSpec("llama-7m", 256, 4, 4, 688, 8000, max_shard_bytes=6_000_000, revisions=4)
SUM_LINE = "total += float(x.sum())"

# One measured merge. argv: mode, recipe, result file. Writes the child's timings and the output's file hashes.
CHILD = r"""
import dataclasses, inspect, json, sys, textwrap, time
t0 = time.perf_counter()
mode, recipe, result_file = sys.argv[1:4]
import torch
from hubmerge.io.files import sha256_file
from hubmerge.merging import executor
from hubmerge.merging.recipe import load_recipe
from hubmerge.workflows.merge import plan_merge

if mode == "nocheck":
    # baseline: the executor without the non-finite check. accumulate_blocks is the shipped function with its one
    # summing line deleted; count_nonfinite finds nothing; the float16 overflow test's aminmax returns (0, 0).
    source = textwrap.dedent(inspect.getsource(executor.accumulate_blocks))
    assert source.count(SUM_LINE) == 1, "accumulate_blocks changed: update the benchmark's baseline"
    assert "torch.aminmax(" in inspect.getsource(executor._stream), "the overflow test changed: update the baseline"
    scope = dict(vars(executor))
    exec("from __future__ import annotations\n" + source.replace(SUM_LINE, "pass"), scope)
    executor.accumulate_blocks = scope["accumulate_blocks"]
    executor.count_nonfinite = lambda x: 0
    torch.aminmax = lambda x: (0.0, 0.0)

doc = load_recipe(recipe)
plan = plan_merge(doc, force=True)
hashed = [s for s in plan.sources if s.sha256]
if mode in ("hashed", "unverified", "hash-then-merge") and len(hashed) != len(plan.sources):
    sys.exit(f"{mode}: expected every source to carry its sha256s, got {len(hashed)} of {len(plan.sources)}")
if mode in ("unverified", "hash-then-merge"):
    plan.sources = [dataclasses.replace(s, sha256=None) for s in plan.sources]
t1 = time.perf_counter()
hashed_bytes = 0
if mode == "hash-then-merge":
    for s in hashed:
        for name, expected in sorted(s.sha256.items()):
            if sha256_file(s.path / name) != expected:
                sys.exit(f"{s.path / name}: sha256 mismatch")
            hashed_bytes += (s.path / name).stat().st_size
t2 = time.perf_counter()
result = executor.execute(plan, force=True)
t3 = time.perf_counter()
with open(result_file, "w") as f:
    json.dump({"import_plan_s": t1 - t0, "hash_s": t2 - t1, "execute_s": t3 - t2, "merge_s": t3 - t1,
               "hashed_bytes": hashed_bytes, "bytes_read": result.bytes_read,
               "weights": {k: v for k, v in result.files.items() if k.endswith(".safetensors")}}, f)
""".replace("SUM_LINE", repr(SUM_LINE))

GROUPS = {
    # group: (what it merges, the modes measured: the feature first)
    "nonfinite-f16": ("non-finite check, float16 sources -> float16", ["check", "nocheck"]),
    "nonfinite-bf16": ("non-finite check, bfloat16 sources -> float16 (sum + aminmax)", ["check", "nocheck"]),
    "hash": ("cached Hub sources, offline", ["hashed", "unverified", "hash-then-merge"]),
}
LABELS = {
    "check": "with the check (as shipped)",
    "nocheck": "baseline: the executor without the non-finite check",
    "hashed": "(a) hash in the read (as shipped)",
    "unverified": "(b) baseline: no verification",
    "hash-then-merge": "(c) sha256_file every file, then (b)",
}


def to_bf16(src: Path, dst: Path) -> None:
    """A bfloat16 copy of an fp16 revision folder (weights converted, config and index copied)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.suffix == ".safetensors":
            tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path).items()}
            save_file(tensors, dst / path.name, metadata={"format": "pt"})
        elif path.is_file():
            shutil.copyfile(path, dst / path.name)


def write_recipe(path: Path, sources: object, out: Path, **extra: object) -> Path:
    recipe = {"name": path.stem, "sources": sources, **extra, "output": {"path": str(out)}}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def hub_snapshots(cache: Path, names: list[str]) -> list[Path]:
    """The cached snapshot folders of the pulled branches (for warming the page cache)."""
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    return [repo / "snapshots" / (repo / "refs" / n).read_text().strip() for n in names]


def one_run(mode: str, recipe: Path, inputs: list[Path], out: Path, work: Path, env: dict, tag: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    warm_cache(inputs)
    result = work / "logs" / f"{tag}.json"
    result.unlink(missing_ok=True)
    run = Run(mode, len(inputs), 0, [sys.executable, "-c", CHILD, mode, str(recipe), str(result)])
    measure(run, work / "logs" / f"{tag}.log", env)
    row = {"mode": mode, "process_s": run.wall_s, "cpu_s": run.cpu_s, "other_load": run.other_load_cores}
    row["ok"] = run.ok and result.is_file()
    row["error"] = run.error
    if row["ok"]:
        row.update(json.loads(result.read_text()))
        log(
            f"  {tag:28} merge {row['merge_s']:6.2f} s (hash {row['hash_s']:.2f}), process {run.wall_s:6.2f} s, "
            f"other load {run.other_load_cores:.2f} cores"
        )
    else:
        log(f"  {tag:28} FAILED: {run.error or 'no result file'} (log {work / 'logs' / f'{tag}.log'})")
    return row


def run_group(group: str, recipe: Path, inputs: list[Path], work: Path, env: dict, repeat: int) -> list[dict]:
    modes = GROUPS[group][1]
    out = work / "out" / group
    log(f"{group}: {GROUPS[group][0]}")
    one_run(modes[0], recipe, inputs, out, work, env, f"{group}-warmup")  # not counted
    rows = []
    for r in range(repeat):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]  # which side goes first alternates
        for mode in order:
            row = one_run(mode, recipe, inputs, out, work, env, f"{group}-{mode}-r{r}")
            row.update(group=group, repeat=r)
            rows.append(row)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def ratios(rows: list[dict], group: str, feature: str, baseline: str, key: str) -> tuple[float, float, float]:
    """Median, min and max of feature / baseline over repeats (repeat i against repeat i); NaN without pairs."""
    by = {(r["mode"], r["repeat"]): r[key] for r in rows if r["group"] == group and r["ok"]}
    repeats = sorted({i for _, i in by})
    rs = [by[feature, i] / by[baseline, i] for i in repeats if (feature, i) in by and (baseline, i) in by]
    return (statistics.median(rs), min(rs), max(rs)) if rs else (math.nan, math.nan, math.nan)


def median_of(rows: list[dict], group: str, mode: str, key: str) -> float:
    values = [r[key] for r in rows if r["group"] == group and r["mode"] == mode and r["ok"]]
    return statistics.median(values) if values else math.nan


def identical(rows: list[dict], group: str) -> bool:
    weights = [json.dumps(r["weights"], sort_keys=True) for r in rows if r["group"] == group and r["ok"]]
    return bool(weights) and len(set(weights)) == 1


def report(rows: list[dict], input_mb: dict[str, float], spec: ModelSpec, meta: dict) -> str:
    pairs = [
        ("nonfinite-f16", "check", "nocheck"),
        ("nonfinite-bf16", "check", "nocheck"),
        ("hash", "hashed", "unverified"),
        ("hash", "hashed", "hash-then-merge"),
        ("hash", "hash-then-merge", "unverified"),
    ]
    lines = [
        f"{spec.name}, {spec.revisions} sources, median of {meta['repeat']} runs (min-max of the per-repeat ratios), "
        "warm page cache, each run its own process",
        "",
        "| case | input MB | feature | baseline | feature merge s | baseline merge s | ratio (merge) "
        "| ratio (process) | other load, cores | outputs |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for group, feat, base in pairs:
        if not any(r["group"] == group and r["ok"] for r in rows):
            continue
        m, lo, hi = ratios(rows, group, feat, base, "merge_s")
        pm, plo, phi = ratios(rows, group, feat, base, "process_s")
        load = [r["other_load"] for r in rows if r["group"] == group and r["mode"] in (feat, base) and r["ok"]]
        lines.append(
            f"| {GROUPS[group][0]} | {input_mb[group]:.0f} | {LABELS[feat]} | {LABELS[base]} | "
            f"{median_of(rows, group, feat, 'merge_s'):.2f} | {median_of(rows, group, base, 'merge_s'):.2f} | "
            f"**{m:.2f}x** ({lo:.2f}-{hi:.2f}) | {pm:.2f}x ({plo:.2f}-{phi:.2f}) | {statistics.median(load):.2f} | "
            f"{'identical' if identical(rows, group) else 'DIFFER'} |"
        )
    loads = [r["other_load"] for r in rows if r["ok"]] or [math.nan]
    lines += [
        "",
        f"Other processes kept {statistics.median(loads):.2f} cores busy during the runs (median; "
        f"{min(loads):.2f}-{max(loads):.2f}); load average {meta['load_before']} before, {meta['load_after']} after; "
        f"{meta['minutes']:.1f} min in all. Ratios are feature / baseline: above 1 the feature costs time.",
    ]
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 7M-parameter model, 2 repeats (smoke test, < 1 minute)")
    p.add_argument("--repeat", type=int, help="measured runs of each side (default 7; --quick 2)")
    p.add_argument("--only", choices=["nonfinite", "hash"], help="run one of the two comparisons")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new /tmp/bench-reliability-*, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    args = p.parse_args(argv)
    spec = QUICK if args.quick else FULL
    repeat = args.repeat or (2 if args.quick else 7)
    began, load_before = time.perf_counter(), loadavg()
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="bench-reliability-", dir="/tmp"))
    for sub in ("configs", "logs", "out"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    rows: list[dict] = []
    input_mb: dict[str, float] = {}
    try:
        revisions = build_trajectory(work / f"trajectory-{spec.name}", spec, log=log)
        names = [f"step{(i + 1) * 1000}" for i in range(len(revisions))]
        rev_mb = sum(f.stat().st_size for f in revisions[-1].glob("*.safetensors")) / MB
        if args.only != "hash":
            bf16 = [work / f"bf16-{spec.name}" / r.name for r in revisions]
            for src, dst in zip(revisions, bf16, strict=True):
                to_bf16(src, dst)
            local_env = {**env, **OFFLINE_ENV}
            for group, folders, extra in (
                ("nonfinite-f16", revisions, {"dtype": "float16"}),
                ("nonfinite-bf16", bf16, {"dtype": "float16"}),
            ):
                recipe = write_recipe(
                    work / "configs" / f"{group}.yaml",
                    [{"path": str(f)} for f in folders],
                    work / "out" / group,
                    **extra,
                )
                input_mb[group] = len(folders) * rev_mb
                rows += run_group(group, recipe, folders, work, local_env, repeat)
        if args.only != "nonfinite":
            hub_env = {**env, "HF_HUB_CACHE": str(work / "hf-cache"), "HUBMERGE_CACHE": str(work / "hubmerge-cache")}
            seed_hub(work / "hub", revisions, names)
            recipe = write_recipe(
                work / "configs" / "hash.yaml", {"repo": HUB_REPO, "revisions": names}, work / "out" / "hash"
            )
            server = Server(work / "hub", None, work / "logs")
            try:  # the pull into the fresh HF cache (a verified cache-mode merge), not measured
                cmd = [sys.executable, "-m", "hubmerge", "merge", str(recipe), "--endpoint", server.url, "-q"]
                cmd.append("--force")
                with open(work / "logs" / "pull.log", "wb") as pull_log:
                    subprocess.run(cmd, env=hub_env, cwd=REPO, check=True, stdout=pull_log, stderr=subprocess.STDOUT)
            finally:
                server.stop()
            input_mb["hash"] = len(revisions) * rev_mb
            snapshots = hub_snapshots(work / "hf-cache", names)
            rows += run_group("hash", recipe, snapshots, work, {**hub_env, **OFFLINE_ENV}, repeat)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta = {
        "repeat": repeat,
        "load_before": load_before,
        "load_after": loadavg(),
        "minutes": (time.perf_counter() - began) / 60,
    }
    text = report(rows, input_mb, spec, meta)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "spec": spec.name, "runs": rows}, indent=2))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
