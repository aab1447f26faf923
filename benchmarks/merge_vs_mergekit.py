"""Wall time, peak memory and numerical agreement of ``hubmerge merge`` against ``mergekit-yaml``.

Both tools average the last n revisions of a synthetic 177M-parameter Llama trajectory (see
make_trajectory.py) with equal weights into fp16 safetensors, each as a separate process on the same
warm page cache. Peak RSS is measured two ways because neither is enough alone: the summed RSS of the
child's whole process tree sampled every 20 ms (sees helpers running side by side) and the child's
``ru_maxrss`` from ``wait4`` (sees spikes shorter than the sampling period); the reported peak is the
larger. mergekit runs from its own virtual environment, built on first use, so its pins never touch
the project's.

One command runs everything (``python benchmarks/merge_vs_mergekit.py``); ``--small`` is a
seconds-long smoke test. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from make_trajectory import FULL, SMALL, ModelSpec, build_trajectory  # beside this script

REPO = Path(__file__).resolve().parent.parent
MERGEKIT_VERSION = "0.1.5"
# The venv must get the local CPU build first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_VERSION = "2.13.0"
# Flags that only make the comparison fair (CPU, no tokenizer, no model card, no progress bars).
MERGEKIT_BASE_FLAGS = ["--no-cuda", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
# mergekit's performance knobs that matter on a CPU (--cuda, --read-to-gpu, --low-cpu-memory and
# --multi-gpu need an accelerator; --lazy-unpickle only affects pickled checkpoints). The full run
# tries each and benchmarks the fastest; --mergekit-args skips that and uses the given flags.
MERGEKIT_CANDIDATE_FLAGS: list[list[str]] = [[], ["-j", "1"], ["--async-write"], ["--async-write", "-j", "1"]]
SAMPLE_PERIOD_S = 0.02
MB = 1e6
GB = 1e9
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TARGETS = {"time_ratio_at_8": 0.4, "throughput_ratio": 1.5, "rss_mb": 400.0, "rss_flatness": 0.15}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, in hubmerge's decimal units, so both tools get the same shard limit."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise SystemExit(f"--max-shard-size: cannot read {text!r}; write e.g. 5GB or 500MB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# --------------------------------------------------------------------------- tools and environments


def hubmerge_command(override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    script = REPO / ".venv" / "bin" / "hubmerge"
    if script.is_file():
        return [str(script)]
    python = REPO / ".venv" / "bin" / "python"
    return [str(python if python.is_file() else sys.executable), "-m", "hubmerge.cli"]


def check_hubmerge(cmd: list[str]) -> str | None:
    """Return why ``hubmerge merge`` cannot run, or None when its help answers."""
    try:
        proc = subprocess.run([*cmd, "merge", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{shlex.join(cmd)} merge --help failed: {err}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"{shlex.join(cmd)} merge --help exited {proc.returncode}: {tail[0]}"
    return None


def _venv_python_version(venv: Path, module: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_mergekit(venv: Path, version: str, torch_version: str) -> Path:
    """Create mergekit's own venv on first use: torch (local CPU build) first, then mergekit pinned to it."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.is_file() and _venv_python_version(venv, "mergekit") == version:
        return exe
    log(f"installing mergekit=={version} into {venv} (torch=={torch_version} first; takes a few minutes)")
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    try:
        if _venv_python_version(venv, "torch") is None:
            subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    except subprocess.CalledProcessError as err:
        raise SystemExit(
            f"could not install torch=={torch_version} into {venv} ({err}); pass --mergekit-venv to a venv "
            "that has mergekit, or --skip-mergekit"
        ) from err
    installed = _venv_python_version(venv, "torch")
    cuda = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.version.cuda)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if cuda not in ("", "None"):
        log(f"warning: torch {installed} in {venv} is a CUDA build ({cuda}); mergekit runs on CPU anyway")
    # Pin torch to what is there, so resolving mergekit's dependencies cannot swap it for a CUDA build.
    constraints = venv / "torch-constraint.txt"
    constraints.write_text(f"torch=={installed}\n")
    try:
        subprocess.run([*pip, "-c", str(constraints), f"mergekit=={version}"], check=True)
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"could not install mergekit=={version} into {venv} ({err})") from err
    if not exe.is_file():
        raise SystemExit(f"mergekit installed into {venv} but {exe} is missing")
    return exe


# --------------------------------------------------------------------------- configs


def write_hubmerge_recipe(path: Path, name: str, sources: list[Path], out: Path, shard: str) -> None:
    recipe = {
        "name": name,
        "sources": [{"path": str(s)} for s in sources],
        "method": "uniform",
        "dtype": "float16",
        "output": {"path": str(out), "max_shard_size": shard},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def write_mergekit_config(path: Path, sources: list[Path]) -> None:
    config = {
        "merge_method": "linear",
        "dtype": "float16",
        "models": [{"model": str(s), "parameters": {"weight": 1.0}} for s in sources],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def warm_cache(folders: list[Path]) -> int:
    """Read every input byte once, so neither tool pays for (or profits from) a cold page cache."""
    total = 0
    for folder in folders:
        for path in safetensors_files(folder):
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
    return total


# --------------------------------------------------------------------------- measuring a process


# Kernels without CONFIG_PROC_CHILDREN lack .../children; then parents are found by scanning /proc.
HAVE_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    if not HAVE_PROC_CHILDREN:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            kids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
        return kids
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def _rss_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in kB; zeros once the process is gone or a zombie."""
    out = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out["VmRSS"], out["RssAnon"], out["RssFile"]


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


class TreeSampler(threading.Thread):
    """Polls the summed RSS of a process tree every 20 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.peak_kb = self.peak_anon_kb = self.peak_file_kb = 0
        self.max_procs = 1
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            rss = [_rss_kb(p) for p in pids]
            total = sum(r[0] for r in rss)
            if total > self.peak_kb:
                self.peak_kb = total
                self.peak_anon_kb = sum(r[1] for r in rss)
                self.peak_file_kb = sum(r[2] for r in rss)
            self.max_procs = max(self.max_procs, sum(1 for r in rss if r[0]))
            self.samples += 1
            self.stop.wait(SAMPLE_PERIOD_S)


@dataclass
class Run:
    tool: str
    n: int
    repeat: int
    command: list[str]
    returncode: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    tree_sampled_peak_mb: float = 0.0
    wait4_maxrss_mb: float = 0.0
    peak_anon_mb: float = 0.0
    peak_file_mb: float = 0.0
    max_processes: int = 1
    other_load_cores: float = 0.0
    log: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.error


def measure(run: Run, log_path: Path, env: dict[str, str]) -> Run:
    """Run one command, timing it and tracking its memory; stdout/stderr go to ``log_path``."""
    clk = os.sysconf("SC_CLK_TCK")
    with open(log_path, "wb") as logf:
        busy0 = _busy_jiffies()
        start = time.perf_counter()
        proc = subprocess.Popen(run.command, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        run.wall_s = time.perf_counter() - start
        busy1 = _busy_jiffies()
        sampler.stop.set()
        sampler.join()
    proc.returncode = run.returncode = os.waitstatus_to_exitcode(status)
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.tree_sampled_peak_mb = sampler.peak_kb * 1024 / MB
    run.wait4_maxrss_mb = usage.ru_maxrss * 1024 / MB
    run.peak_rss_mb = max(run.tree_sampled_peak_mb, run.wait4_maxrss_mb)
    run.peak_anon_mb = sampler.peak_anon_kb * 1024 / MB
    run.peak_file_mb = sampler.peak_file_kb * 1024 / MB
    run.max_processes = sampler.max_procs
    run.other_load_cores = max(0.0, ((busy1 - busy0) / clk - run.cpu_s) / max(run.wall_s, 1e-9))
    run.log = str(log_path)
    if run.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        run.error = f"exit {run.returncode}: " + " | ".join(tail)
    return run


def timed_run(run: Run, sources: list[Path], work: Path, env: dict[str, str], label: str, tag: str = "") -> Run:
    """One measured run from a clean output folder and a warm cache of exactly its inputs."""
    out = work / "out" / f"{run.tool}-{run.n}"
    if out.exists():
        shutil.rmtree(out)
    warm_cache(sources)
    measure(run, work / "logs" / f"{run.tool}{tag}-{run.n}-r{run.repeat}.log", env)
    status = "ok" if run.ok else f"FAILED ({run.error})"
    log(
        f"{label} {run.tool:8} {run.n:2} sources: {run.wall_s:7.2f} s, "
        f"peak RSS {run.peak_rss_mb:6.0f} MB (tree {run.tree_sampled_peak_mb:.0f}, "
        f"wait4 {run.wait4_maxrss_mb:.0f}; anon {run.peak_anon_mb:.0f}, file {run.peak_file_mb:.0f}), "
        f"cpu {run.cpu_s:.1f} s, procs {run.max_processes}, other load {run.other_load_cores:.2f} cores: {status}"
    )
    return run


def tune_mergekit(
    exe: Path, base_flags: list[str], sources: list[Path], work: Path, env: dict[str, str], repeat: int
) -> tuple[list[str], list[dict]]:
    """Pick mergekit's fastest CPU flags on this machine, so the comparison is against its best."""
    n = len(sources)
    config = work / "configs" / f"mergekit-{n}.yaml"
    write_mergekit_config(config, sources)
    trials = []
    for flags in MERGEKIT_CANDIDATE_FLAGS:
        cmd = [str(exe), str(config), str(work / "out" / f"mergekit-{n}"), *base_flags, *flags]
        label = f"[tune {shlex.join(flags) or 'defaults'}]"
        done = [timed_run(Run("mergekit", n, r, cmd), sources, work, env, label, "-tune") for r in range(repeat)]
        ok = [r.wall_s for r in done if r.ok]
        trials.append({"flags": flags, "wall_s": median_or_none(ok), "runs": [r.wall_s for r in done]})
    timed = [t for t in trials if t["wall_s"] is not None]
    if not timed:
        raise SystemExit(f"mergekit failed with every candidate flag set; see {work / 'logs'}")
    best = min(timed, key=lambda t: t["wall_s"])
    log(f"mergekit's fastest flags here: {shlex.join(best['flags']) or '(its defaults)'}")
    return best["flags"], trials


# --------------------------------------------------------------------------- comparing outputs


def tensor_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when there is one, else from the headers."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / fname for name, fname in weight_map.items()}
    out = {}
    for path in safetensors_files(folder):
        with safe_open(path, framework="numpy") as f:
            out.update({name: path for name in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of representable fp16 values between a and b (0 = identical, +0 == -0)."""

    def ordered(x: np.ndarray) -> np.ndarray:
        i = x.view(np.int16).astype(np.int32)
        return np.where(i < 0, -(i + 32768), i)

    return np.abs(ordered(a) - ordered(b))


@dataclass
class Agreement:
    n: int
    tensors: int = 0
    elements: int = 0
    max_abs_diff: float = 0.0
    differing: int = 0  # elements not bit-identical
    beyond_one_ulp: int = 0
    max_ulps: int = 0
    only_hubmerge: list[str] = field(default_factory=list)
    only_mergekit: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # against the exact (float64) mean of the sources, rounded once to fp16
    exact: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def names_match(self) -> bool:
        return not (self.only_hubmerge or self.only_mergekit)

    @property
    def ok(self) -> bool:
        return self.names_match and not self.problems and self.beyond_one_ulp == 0


def compare_outputs(n: int, hub: Path, mk: Path, sources: list[Path] | None) -> Agreement:
    """Compare tensor by tensor, one tensor in memory at a time (plus the sources when checking exactness)."""
    from safetensors import safe_open

    res = Agreement(n)
    try:
        hub_map, mk_map = tensor_index(hub), tensor_index(mk)
    except (OSError, ValueError, KeyError) as err:
        res.problems.append(f"cannot read outputs: {err}")
        return res
    res.only_hubmerge = sorted(set(hub_map) - set(mk_map))
    res.only_mergekit = sorted(set(mk_map) - set(hub_map))
    src_maps = [tensor_index(s) for s in sources] if sources else []
    err_stats = {t: {"max_abs_err": 0.0, "not_correctly_rounded": 0, "max_ulps": 0} for t in ("hubmerge", "mergekit")}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def load(path: Path, name: str) -> np.ndarray:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="numpy"))
            return handles[path].get_tensor(name)

        for name in sorted(set(hub_map) & set(mk_map)):
            a, b = load(hub_map[name], name), load(mk_map[name], name)
            if a.dtype != np.float16 or b.dtype != np.float16 or a.shape != b.shape:
                res.problems.append(f"{name}: hubmerge {a.dtype}{a.shape} vs mergekit {b.dtype}{b.shape}")
                continue
            res.tensors += 1
            res.elements += a.size
            res.max_abs_diff = max(res.max_abs_diff, float(np.max(np.abs(a.astype(np.float32) - b))))
            ulps = ulp_distance(a, b)
            res.differing += int(np.count_nonzero(ulps))
            res.beyond_one_ulp += int(np.count_nonzero(ulps > 1))
            res.max_ulps = max(res.max_ulps, int(ulps.max(initial=0)))
            if src_maps and all(name in m for m in src_maps):
                acc = np.zeros(a.shape, dtype=np.float64)
                for m in src_maps:
                    acc += load(m[name], name)
                acc /= len(src_maps)
                rounded = acc.astype(np.float16)
                for tool, x in (("hubmerge", a), ("mergekit", b)):
                    st = err_stats[tool]
                    st["max_abs_err"] = max(st["max_abs_err"], float(np.max(np.abs(x - acc))))
                    u = ulp_distance(x, rounded)
                    st["not_correctly_rounded"] += int(np.count_nonzero(u))
                    st["max_ulps"] = max(st["max_ulps"], int(u.max(initial=0)))
    if src_maps:
        res.exact = err_stats
    return res


# --------------------------------------------------------------------------- summary and report


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: list[Run], ns: list[int], input_bytes: dict[int, int]) -> tuple[list[dict], dict]:
    rows = []
    for n in ns:
        row: dict = {"sources": n, "input_gb": input_bytes[n] / GB}
        for tool in ("hubmerge", "mergekit"):
            ok = [r for r in runs if r.tool == tool and r.n == n and r.ok]
            row[f"{tool}_s"] = median_or_none([r.wall_s for r in ok])
            row[f"{tool}_rss_mb"] = median_or_none([r.peak_rss_mb for r in ok])
            row[f"{tool}_cpu_s"] = median_or_none([r.cpu_s for r in ok])
            row[f"{tool}_anon_mb"] = median_or_none([r.peak_anon_mb for r in ok])
            row[f"{tool}_file_mb"] = median_or_none([r.peak_file_mb for r in ok])
        row["time_ratio"] = ratio(row["hubmerge_s"], row["mergekit_s"])
        row["rss_ratio"] = ratio(row["hubmerge_rss_mb"], row["mergekit_rss_mb"])
        rows.append(row)
    lo, hi = rows[0], rows[-1]
    through: dict = {"from_sources": lo["sources"], "to_sources": hi["sources"]}
    why = [] if hi["sources"] > lo["sources"] else ["needs two source counts"]
    for tool in ("hubmerge", "mergekit"):
        t0, t1 = lo[f"{tool}_s"], hi[f"{tool}_s"]
        through[f"{tool}_gb_per_s"] = None
        if t0 is None or t1 is None:
            why.append(f"no {tool} timings")
        elif t1 <= t0:
            why.append(f"{tool} was no slower at {hi['sources']} sources than at {lo['sources']} (noise?)")
        elif hi["sources"] > lo["sources"]:
            through[f"{tool}_gb_per_s"] = (hi["input_gb"] - lo["input_gb"]) / (t1 - t0)
    through["ratio"] = ratio(through["hubmerge_gb_per_s"], through["mergekit_gb_per_s"])
    through["undefined_because"] = "; ".join(why)
    return rows, through


def verdicts(rows: list[dict], through: dict, agreements: list[Agreement]) -> list[dict]:
    def verdict(name: str, passed: bool | None, detail: str) -> dict:
        status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
        return {"target": name, "status": status, "detail": detail}

    out = []
    at8 = next((r for r in rows if r["sources"] == 8), None)
    t8 = at8["time_ratio"] if at8 else None
    out.append(
        verdict(
            f"wall time at 8 sources <= {TARGETS['time_ratio_at_8']}x mergekit's",
            None if t8 is None else t8 <= TARGETS["time_ratio_at_8"],
            "no 8-source pair" if t8 is None else f"ratio {t8:.2f}",
        )
    )
    tr = through["ratio"]
    out.append(
        verdict(
            f"marginal throughput >= {TARGETS['throughput_ratio']}x mergekit's",
            None if tr is None else tr >= TARGETS["throughput_ratio"],
            through["undefined_because"] or "undefined" if tr is None else f"ratio {tr:.2f}",
        )
    )
    rss = [r["hubmerge_rss_mb"] for r in rows]
    if any(v is None for v in rss) or not rss:
        out.append(verdict(f"hubmerge peak RSS < {TARGETS['rss_mb']:.0f} MB", None, "no hubmerge run"))
        out.append(verdict("hubmerge peak RSS flat across source counts (+-15%)", None, "no hubmerge run"))
    else:
        out.append(
            verdict(
                f"hubmerge peak RSS < {TARGETS['rss_mb']:.0f} MB",
                max(rss) < TARGETS["rss_mb"],
                f"max {max(rss):.0f} MB",
            )
        )
        spread = max(abs(v / rss[0] - 1) for v in rss)
        flat_ok = None if len(rss) < 2 else spread <= TARGETS["rss_flatness"]
        out.append(
            verdict(
                f"hubmerge peak RSS flat from {rows[0]['sources']} to {rows[-1]['sources']} sources (+-15%)",
                flat_ok,
                " / ".join(f"{v:.0f}" for v in rss) + f" MB, max deviation {100 * spread:.0f}%",
            )
        )
    if agreements:
        bad = [a for a in agreements if not a.ok]
        out.append(
            verdict(
                "outputs equal within fp16 rounding (<= 1 ulp)",
                not bad,
                "; ".join(
                    f"{a.n} sources: {a.beyond_one_ulp} elements > 1 ulp, max {a.max_ulps} ulp"
                    + (f", {len(a.only_hubmerge) + len(a.only_mergekit)} names differ" if not a.names_match else "")
                    + (f", {a.problems[0]}" if a.problems else "")
                    for a in agreements
                ),
            )
        )
    else:
        out.append(verdict("outputs equal within fp16 rounding (<= 1 ulp)", None, "not compared"))
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


TABLE_HEADER = [
    "sources",
    "input GB",
    "hubmerge s",
    "mergekit s",
    "time ratio",
    "hubmerge MB",
    "mergekit MB",
    "RSS ratio",
]


def table_cells(rows: list[dict]) -> list[list[str]]:
    return [
        [
            str(r["sources"]),
            fmt(r["input_gb"]),
            fmt(r["hubmerge_s"]),
            fmt(r["mergekit_s"]),
            fmt(r["time_ratio"]),
            fmt(r["hubmerge_rss_mb"], ".0f"),
            fmt(r["mergekit_rss_mb"], ".0f"),
            fmt(r["rss_ratio"]),
        ]
        for r in rows
    ]


def text_report(
    rows: list[dict], through: dict, agreements: list[Agreement], checks: list[dict], trials: list[dict]
) -> str:
    cells = [TABLE_HEADER, *table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"marginal throughput {through['from_sources']}->{through['to_sources']} sources (GB of input per s): "
        f"hubmerge {fmt(through['hubmerge_gb_per_s'])}, mergekit {fmt(through['mergekit_gb_per_s'])}, "
        f"ratio {fmt(through['ratio'])}"
    )
    for a in agreements:
        line = (
            f"outputs at {a.n} sources: {a.tensors} tensors, max |diff| {a.max_abs_diff:.3g}, "
            f"{a.differing} of {a.elements} elements differ, {a.beyond_one_ulp} by more than 1 ulp (max {a.max_ulps})"
        )
        if a.exact:
            line += "; vs exact mean: " + ", ".join(
                f"{t} max err {s['max_abs_err']:.3g}, {s['not_correctly_rounded']} not correctly rounded"
                for t, s in a.exact.items()
            )
        lines.append(line)
        for label, names in (("only in hubmerge", a.only_hubmerge), ("only in mergekit", a.only_mergekit)):
            if names:
                lines.append(f"  {label}: {len(names)} tensors, e.g. {', '.join(names[:3])}")
        lines.extend(f"  problem: {p}" for p in a.problems[:5])
    if trials:
        lines.append(
            "mergekit flag tuning (median s): "
            + ", ".join(f"{shlex.join(t['flags']) or 'defaults'} {fmt(t['wall_s'])}" for t in trials)
        )
    lines.append("")
    lines.extend(f"{c['status']:4}  {c['target']}: {c['detail']}" for c in checks)
    return "\n".join(lines)


def markdown_report(rows: list[dict], through: dict, checks: list[dict], meta: dict) -> str:
    out = [
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---:|" * len(TABLE_HEADER),
        *("| " + " | ".join(c) + " |" for c in table_cells(rows)),
        "",
        f"Marginal throughput ({through['from_sources']}→{through['to_sources']} sources, GB of input per s): "
        f"hubmerge {fmt(through['hubmerge_gb_per_s'])}, mergekit {fmt(through['mergekit_gb_per_s'])} "
        f"(ratio {fmt(through['ratio'])}).",
        "",
        "| target | result | detail |",
        "|---|---|---|",
        *(f"| {c['target']} | {c['status']} | {c['detail']} |" for c in checks),
        "",
        f"{meta['model']['name']} ({meta['model']['params'] / 1e6:.1f}M params, fp16, "
        f"{meta['model']['bytes_per_revision'] / MB:.0f} MB per revision), {meta['cpus']} CPU cores, "
        f"median of {meta['repeat']} run(s), warm page cache; mergekit {meta['mergekit_version'] or '—'} "
        f"`{meta['mergekit_flags']}`; peak RSS = max(process-tree RSS sampled every 20 ms, wait4 ru_maxrss); "
        f"other load during runs {fmt(meta['other_load_cores_median'])} cores (median).",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="2,8,16", help="source counts to merge (the last n revisions)")
    p.add_argument("--work", type=Path, default=REPO / "bench-work", help="cache and scratch folder")
    p.add_argument("--small", action="store_true", help="tiny model: a smoke test that runs in under a minute")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and source count; the median is reported")
    p.add_argument("--skip-mergekit", action="store_true", help="run hubmerge only")
    p.add_argument("--skip-hubmerge", action="store_true", help="run mergekit only (while hubmerge merge is missing)")
    p.add_argument("--no-exact", action="store_true", help="skip the check against the exact float64 mean")
    p.add_argument("--max-shard-size", default="5GB", help="output shard limit for both tools")
    p.add_argument("--hubmerge", help="hubmerge command to run (default: the repo's .venv)")
    p.add_argument("--mergekit-venv", type=Path, help="default: WORK/mergekit-venv")
    p.add_argument("--mergekit-version", default=MERGEKIT_VERSION)
    p.add_argument(
        "--mergekit-args",
        help="performance flags for mergekit-yaml, e.g. --mergekit-args='-j 1' (default: tune, see --tune-mergekit)",
    )
    p.add_argument(
        "--tune-mergekit",
        action=argparse.BooleanOptionalAction,
        help="time mergekit's candidate CPU flags at 8 sources first and use the fastest "
        "(default: on, except with --small or --mergekit-args)",
    )
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--markdown", nargs="?", const="-", help="print (or write to PATH) a Markdown summary")
    args = p.parse_args(argv)

    spec: ModelSpec = SMALL if args.small else FULL
    try:
        ns = sorted({int(x) for x in args.sources.split(",") if x.strip()})
    except ValueError:
        p.error(f"--sources: expected comma-separated integers, got {args.sources!r}")
    if not ns or ns[0] < 2 or ns[-1] > spec.revisions:
        p.error(f"--sources: each count must be between 2 and {spec.revisions}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.skip_mergekit and args.skip_hubmerge:
        p.error("--skip-mergekit and --skip-hubmerge together leave nothing to run")
    shard_bytes = parse_size(args.max_shard_size)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("configs", "out", "logs"):
        (work / sub).mkdir(exist_ok=True)

    hub_cmd = hubmerge_command(args.hubmerge)
    if not args.skip_hubmerge:
        why = check_hubmerge(hub_cmd)
        if why:
            log(f"error: hubmerge cannot run: {why}\n  Install it (pip install -e . in the repo's .venv), or pass")
            log("  --hubmerge 'CMD' to point at it, or --skip-hubmerge to measure mergekit alone.")
            return 2
    mk_exe, mk_version = None, None
    # mergekit counts shard size in parameters; fp16 is 2 bytes each.
    mk_base_flags = [*MERGEKIT_BASE_FLAGS, "--out-shard-size", str(shard_bytes // 2)]
    perf_flags = shlex.split(args.mergekit_args) if args.mergekit_args is not None else []
    tune = args.tune_mergekit
    if tune is None:
        tune = args.mergekit_args is None and not args.small
    if not args.skip_mergekit:
        mk_exe = ensure_mergekit(
            (args.mergekit_venv or work / "mergekit-venv").resolve(), args.mergekit_version, TORCH_VERSION
        )
        mk_version = _venv_python_version(mk_exe.parent.parent, "mergekit")

    revisions = build_trajectory(work / f"trajectory-{spec.name}", spec, log=log)
    bytes_per_rev = [sum(f.stat().st_size for f in safetensors_files(d)) for d in revisions]
    input_bytes = {n: sum(bytes_per_rev[-n:]) for n in ns}
    index = json.loads((revisions[0] / "model.safetensors.index.json").read_text())
    params = index["metadata"]["total_size"] // 2
    log(f"warming the page cache ({sum(bytes_per_rev[-ns[-1] :]) / GB:.2f} GB)")
    warm_cache(revisions[-ns[-1] :])

    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    trials: list[dict] = []
    if mk_exe and tune:
        n_tune = 8 if 8 in ns else ns[-1]
        perf_flags, trials = tune_mergekit(mk_exe, mk_base_flags, revisions[-n_tune:], work, env, args.repeat)
    mk_flags = [*mk_base_flags, *perf_flags]
    runs: list[Run] = []
    for rep in range(args.repeat):
        for n in ns:
            sources = revisions[-n:]
            tools = []
            if not args.skip_hubmerge:
                recipe = work / "configs" / f"hubmerge-{n}.yaml"
                out = work / "out" / f"hubmerge-{n}"
                write_hubmerge_recipe(recipe, f"bench-{n}", sources, out, args.max_shard_size)
                tools.append(("hubmerge", [*hub_cmd, "merge", str(recipe), "--quiet", "--force"]))
            if mk_exe:
                config = work / "configs" / f"mergekit-{n}.yaml"
                write_mergekit_config(config, sources)
                tools.append(("mergekit", [str(mk_exe), str(config), str(work / "out" / f"mergekit-{n}"), *mk_flags]))
            if rep % 2:
                tools.reverse()  # alternate which tool goes first, so neither always inherits the other's cache state
            for tool, cmd in tools:
                runs.append(timed_run(Run(tool, n, rep, cmd), sources, work, env, f"[{rep + 1}/{args.repeat}]"))
    load_after = os.getloadavg()

    rows, through = summarize(runs, ns, input_bytes)
    agreements = []
    if not args.skip_hubmerge and mk_exe:
        for n in ns:
            hub_out, mk_out = work / "out" / f"hubmerge-{n}", work / "out" / f"mergekit-{n}"
            if hub_out.is_dir() and mk_out.is_dir():
                log(f"comparing outputs at {n} sources")
                agreements.append(compare_outputs(n, hub_out, mk_out, None if args.no_exact else revisions[-n:]))
    checks = verdicts(rows, through, agreements)

    meta = {
        "model": {**asdict(spec), "params": params, "bytes_per_revision": bytes_per_rev[0]},
        "sources": ns,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "other_load_cores_median": median_or_none([r.other_load_cores for r in runs]),
        "hubmerge_command": None if args.skip_hubmerge else shlex.join(hub_cmd),
        "mergekit_version": mk_version,
        "mergekit_flags": shlex.join(mk_flags),
        "mergekit_tuning": trials,
        "max_shard_size": args.max_shard_size,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(text_report(rows, through, agreements, checks, trials))
    print(
        f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; other processes used a median "
        f"{fmt(meta['other_load_cores_median'])} of {meta['cpus']} cores during the runs"
    )
    if args.small:
        print("note: --small is a smoke test; the RSS and speed targets are meant for the full 177M model")
    if args.json:
        payload = {
            "meta": meta,
            "summary": rows,
            "throughput": through,
            "agreement": [asdict(a) for a in agreements],
            "verdicts": checks,
            "runs": [asdict(r) for r in runs],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"results written to {args.json}")
    if args.markdown:
        md = markdown_report(rows, through, checks, meta)
        if args.markdown == "-":
            print("\n" + md)
        else:
            Path(args.markdown).write_text(md + "\n")
            log(f"Markdown written to {args.markdown}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
