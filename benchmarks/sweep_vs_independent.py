"""Data read, wall time and peak memory of a shared window sweep against independent ``hubmerge merge`` runs.

Along T = 16 revisions of the synthetic trajectory (make_trajectory.py), every window of sizes
W = {2, 4, 8} at stride 1 is averaged into fp16 twice:

- shared: one process runs ``hubmerge.merging.sweep`` over all windows (each source read once);
- independent: one ``hubmerge merge`` process per window (``sum over w of (T - w + 1) * w`` = 154 model
  reads for T = 16).

Each side runs as a separate process measured like merge_vs_mergekit.py (wall time, peak RSS of the
process tree and ``ru_maxrss``; its helpers are imported, not copied), on a warm page cache. Data read
comes from the engine's reader counter and from the child's own ``/proc/self/io`` (``rchar``: every byte
read through read/pread syscalls, start-up included; ``read_bytes``: what came from the disk).

The full-size independent side would read ~54 GB, too slow for a small shared machine, so by default it
measures a sample of windows of each size (``--independent-sample``, spread over the trajectory) and
extrapolates: time and rchar per window of that size times the number of such windows. The report says
which figures are measured and which extrapolated. ``--small`` (7M-parameter model) measures every
window. Window outputs are deleted as soon as they are written and hashed (the sweep runs with
``keep=False``; each independent output is removed after its run), so disk use stays at most
``--max-windows-on-disk`` windows; each sampled window's shard hashes are compared with the sweep's
(kept in its ``NAME.deleted.json``).

``python benchmarks/sweep_vs_independent.py --small`` is a smoke test (about two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from make_trajectory import FULL, SMALL, build_trajectory  # beside this script
from merge_vs_mergekit import GB, MB, OFFLINE_ENV, REPO, Run, log, measure, warm_cache, write_hubmerge_recipe

TARGETS = {"data_read_ratio": 5.0, "time_ratio": 3.0}
SHARD = "5GB"


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


# --------------------------------------------------------------------------- child processes


def child_sweep(config_path: Path) -> int:
    """Run the sweep with outputs deleted once written; report the engine's counters and /proc/self/io."""
    from hubmerge.io.checkpoint import SourceRef
    from hubmerge.merging.sweep import plan_sweep, run_sweep

    cfg = json.loads(config_path.read_text())
    sources = [SourceRef(Path(p), Path(p).name) for p in cfg["sources"]]
    plan = plan_sweep(
        sources,
        cfg["sizes"],
        cfg["root"],
        stride=cfg["stride"],
        dtype="float16",
        max_shard_size=SHARD,
        max_windows_on_disk=cfg["max_windows_on_disk"],
    )
    result = run_sweep(plan, keep=False)
    report = {
        "bytes_read_counted": result.bytes_read,
        "bytes_read_planned": plan.bytes_read,
        "bytes_read_independent_planned": plan.bytes_read_independent,
        "bytes_written": result.bytes_written,
        "windows": len(result.outputs),
        "passes": result.passes,
        "max_open_windows": plan.max_open,
        "memory_estimate_bytes": plan.memory_estimate,
        "seconds_in_engine": result.seconds,
        "io": proc_io(),
    }
    Path(cfg["report"]).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def child_merge(recipe: str, report: str) -> int:
    """``hubmerge merge RECIPE -q --force``, exactly as the CLI runs it, then this process's /proc/self/io."""
    from hubmerge.cli import main

    sys.argv = ["hubmerge", "merge", recipe, "--quiet", "--force"]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    Path(report).write_text(json.dumps({"io": proc_io()}) + "\n")
    return code


def child_idle(report: str) -> int:
    """The start-up alone (Python, torch and hubmerge imports): the baseline of every child's rchar."""
    import hubmerge.merging.executor  # noqa: F401
    import hubmerge.merging.sweep  # noqa: F401

    Path(report).write_text(json.dumps({"io": proc_io()}) + "\n")
    return 0


# --------------------------------------------------------------------------- measuring


def python_command(*args: str) -> list[str]:
    python = REPO / ".venv" / "bin" / "python"
    return [str(python if python.is_file() else sys.executable), str(Path(__file__).resolve()), *args]


def windows_of(count: int, sizes: list[int], stride: int) -> list[tuple[int, int]]:
    return [(start, w) for w in sizes for start in range(0, count - w + 1, stride)]


def sample_positions(starts: list[int], k: int) -> list[int]:
    """``k`` window starts spread evenly over the trajectory (all of them when k >= len(starts))."""
    if k >= len(starts):
        return starts
    if k == 1:
        return [starts[len(starts) // 2]]
    return sorted({starts[round(i * (len(starts) - 1) / (k - 1))] for i in range(k)})


def choose_max_on_disk(requested: int | None, windows: int, window_bytes: int, work: Path) -> int:
    """Every window in one pass when the disk has room for twice that, else as many as fit."""
    if requested:
        return requested
    free = shutil.disk_usage(work).free
    fit = int((free - 5 * GB) // (2 * window_bytes))
    if fit < 1:
        raise SystemExit(f"not enough free disk under {work} ({free / GB:.1f} GB) for even one window")
    return min(windows, fit)


def run_child(tool: str, n: int, command: list[str], work: Path, tag: str, env: dict[str, str]) -> Run:
    run = measure(Run(tool, n, 0, command), work / "logs" / f"sweep-bench-{tag}.log", env)
    if not run.ok:
        raise SystemExit(f"{tool} {tag} failed: {run.error}")
    return run


def fmt_gb(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / MB:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / "bench-work", help="trajectory cache and scratch folder")
    p.add_argument("--small", action="store_true", help="7M-parameter model, every window measured: a smoke test")
    p.add_argument("--sizes", default="2,4,8", help="window sizes")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--revisions", type=int, help="use the first N revisions (default: all 16)")
    p.add_argument(
        "--independent-sample",
        type=int,
        help="independent merges measured per window size (default: every window with --small, else 2); "
        "the rest are extrapolated from them",
    )
    p.add_argument("--max-windows-on-disk", type=int, help="sweep outputs that may exist at once (default: fit)")
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--child-sweep", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-merge", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-idle", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_sweep:
        return child_sweep(args.child_sweep)
    if args.child_merge:
        return child_merge(*args.child_merge)
    if args.child_idle:
        return child_idle(args.child_idle)

    spec = SMALL if args.small else FULL
    sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    work = args.work.resolve()
    for sub in ("configs", "out", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    revisions = build_trajectory(work / f"trajectory-{spec.name}", spec, log=log)[: args.revisions]
    count = len(revisions)
    if not sizes or sizes[0] < 2 or sizes[-1] > count:
        p.error(f"--sizes: each size must be between 2 and {count}")
    model_bytes = sum(f.stat().st_size for f in revisions[0].glob("*.safetensors"))
    windows = windows_of(count, sizes, args.stride)
    k_disk = choose_max_on_disk(args.max_windows_on_disk, len(windows), model_bytes, work)
    sample = args.independent_sample or (10**9 if args.small else 2)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    disk = shutil.disk_usage(work)
    log(
        f"{spec.name}: T={count}, W={sizes}, stride {args.stride}: {len(windows)} windows, "
        f"{sum(w for _, w in windows)} model reads if independent; {model_bytes / MB:.0f} MB per revision; "
        f"disk free {disk.free / GB:.1f} GB, at most {k_disk} sweep windows on disk; load {load_before[0]:.2f}"
    )

    idle_report = work / "out" / "sweep-bench-idle.json"
    idle = run_child("idle", 0, python_command("--child-idle", str(idle_report)), work, "idle", env)
    idle_rchar = json.loads(idle_report.read_text())["io"]["rchar"]

    # The shared sweep: every window, one process.
    root = work / "out" / "sweep"
    shutil.rmtree(root, ignore_errors=True)
    report = work / "out" / "sweep-bench-report.json"
    config = work / "configs" / "sweep-bench.json"
    config.write_text(
        json.dumps(
            {
                "sources": [str(r) for r in revisions],
                "sizes": sizes,
                "stride": args.stride,
                "root": str(root),
                "max_windows_on_disk": k_disk,
                "report": str(report),
            }
        )
    )
    log(f"warming the page cache ({count * model_bytes / GB:.2f} GB)")
    warm_cache(revisions)
    log("shared sweep ...")
    swept = run_child("sweep", 0, python_command("--child-sweep", str(config)), work, "sweep", env)
    sw = json.loads(report.read_text())
    log(
        f"shared sweep: {swept.wall_s:.1f} s, cpu {swept.cpu_s:.1f} s, peak RSS {swept.peak_rss_mb:.0f} MB, "
        f"read {fmt_gb(sw['bytes_read_counted'])} (engine), rchar {fmt_gb(sw['io']['rchar'])}, "
        f"other load {swept.other_load_cores:.2f} cores"
    )

    # Independent merges: a sample of each size, extrapolated to all windows of that size.
    per_size: dict[int, list[dict]] = {w: [] for w in sizes}
    identical, compared = 0, 0
    for w in sizes:
        starts = [s for s, size in windows if size == w]
        for start in sample_positions(starts, sample):
            srcs = revisions[start : start + w]
            name = f"w{w}-{srcs[0].name}-{srcs[-1].name}"
            out = work / "out" / f"independent-{name}"
            recipe = work / "configs" / f"independent-{name}.yaml"
            write_hubmerge_recipe(recipe, f"independent-{name}", srcs, out, SHARD)
            io_report = work / "out" / f"independent-{name}.io.json"
            warm_cache(srcs)
            run = run_child(
                "independent", w, python_command("--child-merge", str(recipe), str(io_report)), work, name, env
            )
            rchar = json.loads(io_report.read_text())["io"]["rchar"]
            files = json.loads((out / "hubmerge.json").read_text())["files"]
            swept_files = json.loads((root / f"{name}.deleted.json").read_text())["files"]
            shards = {f: h for f, h in files.items() if f.endswith(".safetensors")}
            compared += 1
            identical += shards == {f: h for f, h in swept_files.items() if f.endswith(".safetensors")}
            began = time.perf_counter()
            shutil.rmtree(out)  # the sweep deletes its outputs inside its timed run; so this counts here
            delete_s = time.perf_counter() - began
            per_size[w].append(
                {
                    "window": name,
                    "wall_s": run.wall_s + delete_s,
                    "delete_s": delete_s,
                    "cpu_s": run.cpu_s,
                    "rss_mb": run.peak_rss_mb,
                    "rchar": rchar,
                    "run": run,
                }
            )
            log(
                f"independent {name}: {run.wall_s:.1f} s + {delete_s:.2f} s deleting, cpu {run.cpu_s:.1f} s, "
                f"peak RSS {run.peak_rss_mb:.0f} MB, rchar {fmt_gb(rchar)}, other load {run.other_load_cores:.2f} cores"
            )
    load_after = os.getloadavg()

    counts = {w: sum(1 for _, size in windows if size == w) for w in sizes}
    measured_runs = sum(len(v) for v in per_size.values())
    ind_time = sum(counts[w] * statistics.mean(r["wall_s"] for r in per_size[w]) for w in sizes)
    ind_rchar = sum(counts[w] * statistics.mean(r["rchar"] for r in per_size[w]) for w in sizes)
    ind_read = sw["bytes_read_independent_planned"]
    ind_cpu = sum(counts[w] * statistics.mean(r["cpu_s"] for r in per_size[w]) for w in sizes)
    ind_rss = max(r["rss_mb"] for v in per_size.values() for r in v)
    extrapolated = measured_runs < len(windows)
    how = f"measured on {measured_runs} of {len(windows)} windows, extrapolated" if extrapolated else "measured"
    read_ratio = ind_read / sw["bytes_read_counted"]
    rchar_ratio = ind_rchar / sw["io"]["rchar"]
    time_ratio = ind_time / swept.wall_s

    lines = [
        f"\nsweep vs independent merges: {spec.name}, T={count}, W={{{','.join(map(str, sizes))}}}, "
        f"stride {args.stride}, {len(windows)} windows, fp16",
        f"{'':22}{'data read (engine)':>20}{'rchar':>12}{'wall':>10}{'cpu':>10}{'peak RSS':>11}",
        f"{'shared sweep':22}{fmt_gb(sw['bytes_read_counted']):>20}{fmt_gb(sw['io']['rchar']):>12}"
        f"{swept.wall_s:>9.1f}s{swept.cpu_s:>9.1f}s{swept.peak_rss_mb:>8.0f} MB   (measured; {sw['passes']} pass(es))",
        f"{'independent merges':22}{fmt_gb(ind_read):>20}{fmt_gb(ind_rchar):>12}{ind_time:>9.1f}s{ind_cpu:>9.1f}s"
        f"{ind_rss:>8.0f} MB   ({how}; data read (engine) is computed: sum of w x model)",
        f"{'ratio':22}{read_ratio:>19.1f}x{rchar_ratio:>11.1f}x{time_ratio:>9.1f}x{ind_cpu / swept.cpu_s:>9.1f}x"
        f"{swept.peak_rss_mb / ind_rss:>10.2f}x",
        "",
        "independent merges per window size (mean of the measured windows): "
        + "; ".join(
            f"w={w}: {statistics.mean(r['wall_s'] for r in per_size[w]):.1f} s "
            f"(cpu {statistics.mean(r['cpu_s'] for r in per_size[w]):.1f} s) x {counts[w]} windows"
            for w in sizes
        ),
        f"rchar of a child that only starts up (imports): {fmt_gb(idle_rchar)}; sweep max open windows "
        f"{sw['max_open_windows']}, memory estimate {sw['memory_estimate_bytes'] / MB:.0f} MB",
        f"shard hashes of the sweep equal those of hubmerge merge for {identical} of {compared} sampled windows",
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; other processes used "
        f"{swept.other_load_cores:.2f} cores during the sweep (median "
        f"{statistics.median(r['run'].other_load_cores for v in per_size.values() for r in v):.2f} during "
        f"the merges) of {os.cpu_count()}",
        "",
        f"{'PASS' if read_ratio >= TARGETS['data_read_ratio'] else 'FAIL'}  data read >= "
        f"{TARGETS['data_read_ratio']:.0f}x less: {read_ratio:.1f}x (rchar {rchar_ratio:.1f}x)",
        f"{'PASS' if time_ratio >= TARGETS['time_ratio'] else 'FAIL'}  wall time >= {TARGETS['time_ratio']:.0f}x less: "
        f"{time_ratio:.1f}x (cpu {ind_cpu / swept.cpu_s:.1f}x)"
        + (" (independent side extrapolated)" if extrapolated else ""),
        f"{'PASS' if identical == compared else 'FAIL'}  sweep windows bit-identical to hubmerge merge",
    ]
    if args.small:
        lines.append("note: --small is a smoke test; the targets are meant for the full 177M model")
    print("\n".join(lines))
    if args.json:
        payload = {
            "model": spec.name,
            "revisions": count,
            "sizes": sizes,
            "stride": args.stride,
            "windows": len(windows),
            "model_bytes": model_bytes,
            "sweep": {**sw, "wall_s": swept.wall_s, "peak_rss_mb": swept.peak_rss_mb, "cpu_s": swept.cpu_s},
            "independent": {
                "extrapolated": extrapolated,
                "measured_windows": measured_runs,
                "wall_s": ind_time,
                "cpu_s": ind_cpu,
                "rchar": ind_rchar,
                "bytes_read": ind_read,
                "peak_rss_mb": ind_rss,
                "runs": {w: [{k: v for k, v in r.items() if k != "run"} for r in per_size[w]] for w in sizes},
            },
            "ratios": {"data_read": read_ratio, "rchar": rchar_ratio, "time": time_ratio, "cpu": ind_cpu / swept.cpu_s},
            "identical_windows": [identical, compared],
            "idle_rchar": idle_rchar,
            "loadavg": [load_before, load_after],
            "idle_run_s": idle.wall_s,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"results written to {args.json}")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if read_ratio >= TARGETS["data_read_ratio"] and identical == compared else 1


if __name__ == "__main__":
    sys.exit(main())
