"""``fetch: stream`` against ``fetch: cache`` for Hub merges: wall time, peak disk, peak RSS.

The synthetic 16-revision trajectory (make_trajectory.py, 353 MB a revision) is served as ``stepN`` branches by
``hubmerge hub serve`` in its own process, which redirects LFS files to its storage port as the Hub does. For
k = 2, 8, 16 the last k revisions are merged twice, each run in a fresh process with a fresh, empty HF cache:

- ``fetch: cache``: the merge pulls the k revisions into the cache (verifying each file's sha256), then merges
  from disk: what every merging tool does today;
- ``fetch: stream``: the merge reads the weights by range requests as it consumes them; only config and index
  files go through the cache.

Peak disk is the largest total size, sampled every 50 ms, of the files under the run's HF cache and output
folders (hidden partial folders included). Peak RSS is the process tree's, as in merge_vs_mergekit.py. Then the
server is restarted with ``--max-bandwidth`` and the stream's wall is compared with bytes / bandwidth: a merge
that hides behind the network takes little more than the transfer.

``python benchmarks/stream_vs_cache.py`` runs everything (~15 minutes here); ``--small`` is a smoke test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from make_trajectory import FULL, SMALL, build_trajectory  # beside this script
from merge_vs_mergekit import GB, MB, REPO, Run, log, measure

HUB_REPO = "bench/trajectory"
# Runs the CLI and records the process's own peak RSS (VmHWM) at exit: wait4's ru_maxrss would also count the
# benchmark's own pages, which the child inherits until it execs.
HWM_WRAPPER = """
import atexit, sys
out = sys.argv.pop(1)
def record():
    with open('/proc/self/status') as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM'))
    with open(out, 'w') as f:
        f.write(str(kb))
atexit.register(record)
sys.argv[0] = 'hubmerge'
from hubmerge.cli.app import main
main()
"""
TARGETS = {"stream_wall_ratio": 0.6, "rss_mb": 400.0, "rss_flatness": 0.15, "limited_ratio": 1.15}
SEED_VERSION = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blob_entry(path: Path) -> dict[str, object]:
    """What the dev Hub stores for a file: its sha256, size and git blob sha1, read in one pass."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return {"sha256": sha256.hexdigest(), "size": size, "sha1": sha1.hexdigest()}


def seed_hub(root: Path, revisions: list[Path], names: list[str]) -> None:
    """The trajectory as a dev Hub repo, one branch per revision; blobs are hard links (no second copy)."""
    from hubmerge.devhub.storage import HubStore

    stamp = root / "seeded.json"
    manifest = {"version": SEED_VERSION, "revisions": [str(r) for r in revisions], "names": names}
    if stamp.is_file() and json.loads(stamp.read_text()) == manifest:
        return
    if root.exists():
        shutil.rmtree(root)
    store = HubStore(root)
    store.create_repo("models", HUB_REPO, private=False)
    start = time.perf_counter()
    for name, folder in zip(names, revisions, strict=True):
        ops = []
        for path in sorted(folder.iterdir()):
            entry = blob_entry(path)
            blob = store.blob_path(str(entry["sha256"]))
            if not blob.exists():
                blob.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, blob)
                except OSError:
                    shutil.copyfile(path, blob)
            ops.append(("file", path.name, entry))
        head = store.refs("models", HUB_REPO)["branches"]["main"]
        store.create_ref("models", HUB_REPO, "branches", name, head)
        store.apply_commit("models", HUB_REPO, name, ops, f"checkpoint {name}", "", None, False)
    log(f"seeded the dev Hub with {len(names)} revisions in {time.perf_counter() - start:.0f} s")
    stamp.write_text(json.dumps(manifest))


class Server:
    """``hubmerge hub serve`` in its own process, as a user runs it."""

    def __init__(self, root: Path, bandwidth_mb: float | None, logs: Path) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "hubmerge", "hub", "serve", "--root", str(root), "--port", str(self.port), "-q"]
        if bandwidth_mb:
            cmd += ["--max-bandwidth", str(bandwidth_mb)]
        self.log = open(logs / f"server-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub serve exited with {self.proc.returncode}; see {self.log.name}")
            time.sleep(0.2)
        raise RuntimeError("hub serve did not start listening within 60 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class DiskSampler(threading.Thread):
    """The largest total size of the files under some folders, polled every 50 ms."""

    def __init__(self, folders: list[Path]) -> None:
        super().__init__(daemon=True)
        self.folders, self.peak, self.stop = folders, 0, threading.Event()

    def total(self) -> int:
        size = 0
        for folder in self.folders:
            for dirpath, _, names in os.walk(folder):
                for n in names:
                    try:
                        st = os.lstat(os.path.join(dirpath, n))
                    except OSError:
                        continue
                    size += st.st_blocks * 512 if not os.path.islink(os.path.join(dirpath, n)) else 0
        return size

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.total())
            self.stop.wait(0.05)
        self.peak = max(self.peak, self.total())


def one_run(mode: str, k: int, server: Server, work: Path, tag: str) -> dict[str, object]:
    cache, outs = work / "hf-cache", work / "out"
    for folder in (cache, outs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    out = outs / f"{mode}-{k}"
    recipe = work / "configs" / f"{tag}{mode}-{k}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": f"bench-{mode}-{k}",
                "sources": {"repo": HUB_REPO, "select": {"last": k}, "fetch": mode},
                "output": {"path": str(out), "max_shard_size": "150MB"},
            }
        )
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HUBMERGE_CACHE": str(work / "hubmerge-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    shutil.rmtree(work / "hubmerge-cache", ignore_errors=True)
    hwm = work / "logs" / f"{tag}{mode}-{k}.hwm"
    hwm.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", HWM_WRAPPER, str(hwm), "merge", str(recipe), "--endpoint", server.url, "-q", "--force"]
    run = Run(mode, k, 0, cmd)
    disk = DiskSampler([cache, outs])
    disk.start()
    measure(run, work / "logs" / f"{tag}{mode}-{k}.log", env)
    disk.stop.set()
    disk.join()
    # The process's own peak, or (if it died before recording it) the sampled peak of its tree.
    rss_mb = int(hwm.read_text()) * 1024 / MB if hwm.is_file() else run.tree_sampled_peak_mb
    run.peak_rss_mb = max(rss_mb, run.tree_sampled_peak_mb)
    files = {}
    if run.ok:
        recorded = json.loads((out / "hubmerge.json").read_text())["files"]
        files = {f: h for f, h in recorded.items() if ".safetensors" in f}
    output_bytes = sum(p.stat().st_size for p in out.iterdir()) if out.is_dir() else 0
    row = {
        "mode": mode,
        "k": k,
        "wall_s": run.wall_s,
        "cpu_s": run.cpu_s,
        "peak_rss_mb": run.peak_rss_mb,
        "peak_disk_mb": disk.peak / MB,
        "output_mb": output_bytes / MB,
        "ok": run.ok,
        "error": run.error,
        "weights": files,
    }
    status = "ok" if run.ok else f"FAILED ({run.error})"
    log(
        f"{tag}{mode:6} k={k:2}: {run.wall_s:6.1f} s, peak RSS {run.peak_rss_mb:4.0f} MB, peak disk "
        f"{disk.peak / MB:6.0f} MB (output {output_bytes / MB:.0f} MB), cpu {run.cpu_s:.1f} s: {status}"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a 7M-parameter trajectory (smoke test)")
    p.add_argument("--sizes", default="2,8,16", help="window sizes k (default 2,8,16)")
    p.add_argument("--bandwidth", type=float, default=200.0, help="MB/s for the limited runs (0: skip them)")
    p.add_argument("--work", type=Path, default=REPO / "bench-work", help="cache and scratch folder")
    p.add_argument("--json", type=Path, help="write every run's figures here")
    args = p.parse_args(argv)
    spec = SMALL if args.small else FULL
    ks = [int(x) for x in args.sizes.split(",")]
    work = args.work.resolve() / "stream"
    for sub in ("configs", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    revisions = build_trajectory(args.work.resolve() / f"trajectory-{spec.name}", spec, log=log)
    names = [f"step{(i + 1) * 1000}" for i in range(len(revisions))]
    seed_hub(work / f"hub-{spec.name}", revisions, names)
    rev_bytes = sum(f.stat().st_size for f in revisions[-1].glob("*.safetensors"))

    rows: list[dict] = []
    server = Server(work / f"hub-{spec.name}", None, work / "logs")
    try:
        for k in ks:
            for mode in ("cache", "stream"):
                rows.append(one_run(mode, k, server, work, ""))
    finally:
        server.stop()
    limited: list[dict] = []
    if args.bandwidth:
        server = Server(work / f"hub-{spec.name}", args.bandwidth, work / "logs")
        try:
            for k in ks:
                for mode in ("stream", "cache"):
                    row = one_run(mode, k, server, work, "limited-")
                    row["transfer_s"] = k * rev_bytes / (args.bandwidth * MB)
                    limited.append(row)
        finally:
            server.stop()
    shutil.rmtree(work / "hf-cache", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    report(rows, limited, ks, rev_bytes, args.bandwidth)
    if args.json:
        args.json.write_text(json.dumps({"unlimited": rows, "limited": limited, "rev_bytes": rev_bytes}, indent=2))
    return 0 if all(r["ok"] for r in rows + limited) else 1


def report(rows: list[dict], limited: list[dict], ks: list[int], rev_bytes: int, bandwidth: float) -> None:
    by = {(r["mode"], r["k"]): r for r in rows}
    print(f"\nstream vs cache, {rev_bytes / MB:.0f} MB per revision, fresh HF cache per run, loopback")
    print(
        "| k | cache wall s | stream wall s | stream/cache | cache peak disk MB | stream peak disk MB | output MB "
        "| cache RSS MB | stream RSS MB | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in ks:
        c, s = by[("cache", k)], by[("stream", k)]
        same = bool(c["weights"]) and c["weights"] == s["weights"]
        print(
            f"| {k} | {c['wall_s']:.1f} | {s['wall_s']:.1f} | {s['wall_s'] / c['wall_s']:.2f}x | "
            f"{c['peak_disk_mb']:.0f} | {s['peak_disk_mb']:.0f} | {s['output_mb']:.0f} | {c['peak_rss_mb']:.0f} | "
            f"{s['peak_rss_mb']:.0f} | {'yes' if same else 'NO'} |"
        )
    if limited:
        print(f"\nwith --max-bandwidth {bandwidth:g} MB/s")
        print("| k | bytes / bandwidth s | stream wall s | stream / transfer | cache wall s | cache / transfer |")
        print("|---|---|---|---|---|---|")
        lim = {(r["mode"], r["k"]): r for r in limited}
        for k in ks:
            s, c = lim[("stream", k)], lim[("cache", k)]
            t = s["transfer_s"]
            print(
                f"| {k} | {t:.1f} | {s['wall_s']:.1f} | {s['wall_s'] / t:.2f}x | {c['wall_s']:.1f} | "
                f"{c['wall_s'] / t:.2f}x |"
            )
    print("\ntargets:")
    for k in [k for k in ks if k >= 8]:
        ratio = by[("stream", k)]["wall_s"] / by[("cache", k)]["wall_s"]
        verdict = "PASS" if ratio <= TARGETS["stream_wall_ratio"] else "FAIL"
        print(f"  {verdict} stream wall <= {TARGETS['stream_wall_ratio']}x cache at k={k}: {ratio:.2f}x")
    stream_rss = [by[("stream", k)]["peak_rss_mb"] for k in ks]
    flat = (max(stream_rss) - min(stream_rss)) / min(stream_rss)
    print(
        f"  {'PASS' if max(stream_rss) <= TARGETS['rss_mb'] else 'FAIL'} stream RSS <= {TARGETS['rss_mb']:.0f} MB: "
        f"{max(stream_rss):.0f} MB; flat in k within {flat:.0%}"
    )
    for k in ks:
        s = by[("stream", k)]
        extra = s["peak_disk_mb"] - s["output_mb"]
        print(
            f"  peak disk of the stream at k={k}: {s['peak_disk_mb']:.0f} MB, output {s['output_mb']:.0f} MB "
            f"(+{extra:.1f} MB: config, index, tokenizer in the cache)"
        )
    for r in limited:
        if r["mode"] == "stream":
            ratio = r["wall_s"] / r["transfer_s"]
            verdict = "PASS" if ratio <= TARGETS["limited_ratio"] else "FAIL"
            print(
                f"  {verdict} limited stream wall <= {TARGETS['limited_ratio']}x bytes/bandwidth at k={r['k']}: "
                f"{ratio:.2f}x"
            )
    print(f"(MB = 10^6 bytes; {sum(r['wall_s'] for r in rows + limited) / 60:.1f} min of runs; GB = {GB:.0e} bytes)")


if __name__ == "__main__":
    sys.exit(main())
