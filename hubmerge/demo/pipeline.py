"""``hubmerge demo``: the whole workflow, offline, on a trajectory made on the spot.

It starts a local Hub server, trains a tiny causal LM on a toy English grammar while saving
checkpoints, pushes every checkpoint as a ``stepN`` branch (as Pythia publishes them), lists the
revisions, checks the trajectory's integrity, merges the last window from the Hub through a recipe,
evaluates the window's checkpoints, the merge and their ensemble on the grammar's minimal pairs,
writes the stability model card, and pushes the merge with its card to a new repo. Each stage is a
function over a shared context, so the pipeline grows by adding stages.

Everything lives under one folder (``hubmerge-demo/`` by default), including its own HF cache, so
the demo never touches the user's cache or account.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hubmerge.devhub import HubServer
from hubmerge.errors import OutputError
from hubmerge.evaluation.runner import EvalResult
from hubmerge.hub.client import HubClient
from hubmerge.hub.revisions import Revision
from hubmerge.io.env import isolated_caches, torch_threads
from hubmerge.io.progress import Display

MARKER = ".hubmerge-demo"
DEMO_TOKEN = "hf_local_demo"  # the local server accepts any token; nothing real is ever sent
TRAJECTORY_REPO = "demo/tiny-grammar"


@dataclass
class DemoConfig:
    out: Path = Path("hubmerge-demo")
    steps: int = 300
    save_every: int = 25
    window: int = 4
    pairs: int = 40  # minimal pairs per grammar paradigm in the evaluation slice
    seed: int = 0
    port: int = 0
    quiet: bool = False


@dataclass
class DemoContext:
    config: DemoConfig
    console: Console
    hub: HubServer | None = None
    checkpoints: list[Path] = field(default_factory=list)
    revisions: list[Revision] = field(default_factory=list)
    recipe: Path | None = None
    merged: Path | None = None
    merged_repo: str | None = None
    evaluation: EvalResult | None = None
    summary: list[tuple[str, str]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        if self.hub is None:
            raise OutputError("the demo's Hub server is not running (the server stage comes first)")
        return self.hub.url

    @property
    def client(self) -> HubClient:
        """The demo's Hub: its local server, with a token the server accepts (no real one is ever sent)."""
        return HubClient(endpoint=self.endpoint, token=DEMO_TOKEN, offline=False)

    @property
    def display(self) -> Display:
        return Display(self.config.quiet, self.console)


Stage = tuple[str, Callable[[DemoContext], None]]


def _prepare_folder(out: Path) -> None:
    """Reuse a previous demo folder (it carries a marker); refuse to clear anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise OutputError(f"{out} exists and is not a hubmerge demo folder; choose another --out")
        for child in out.iterdir():
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `hubmerge demo`; safe to delete\n")


def stage_server(ctx: DemoContext) -> None:
    ctx.hub = HubServer(ctx.config.out / "hub", port=ctx.config.port)
    ctx.hub.start()
    ctx.console.print(f"local Hub server at {ctx.hub.url} (storing under {ctx.config.out / 'hub'})")
    ctx.summary.append(("local Hub", ctx.hub.url))


def stage_train(ctx: DemoContext) -> None:
    from hubmerge.demo.train import train_trajectory

    cfg = ctx.config
    with ctx.display.count("training", cfg.steps) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.advance(1)
            bar.update(status=f"loss {loss:.3f}")

        ctx.checkpoints = train_trajectory(
            cfg.out / "trajectory", steps=cfg.steps, save_every=cfg.save_every, seed=cfg.seed, progress=progress
        )
    ctx.console.print(f"{len(ctx.checkpoints)} checkpoints in {cfg.out / 'trajectory'}")
    ctx.summary.append(("trajectory", f"{len(ctx.checkpoints)} checkpoints in {cfg.out / 'trajectory'}"))


def stage_push_trajectory(ctx: DemoContext) -> None:
    from hubmerge.hub.push import push_checkpoints

    push_checkpoints(TRAJECTORY_REPO, ctx.checkpoints, ctx.client, display=ctx.display)
    ctx.summary.append(("trajectory repo", f"{ctx.endpoint}/{TRAJECTORY_REPO} ({len(ctx.checkpoints)} step branches)"))


def stage_revisions(ctx: DemoContext) -> None:
    from hubmerge.hub.revisions import list_revisions, revisions_table_rows

    ctx.revisions = list_revisions(TRAJECTORY_REPO, ctx.client)
    table = Table(title=f"hubmerge revisions {TRAJECTORY_REPO}", title_justify="left")
    for col in ("revision", "step", "commit"):
        table.add_column(col)
    for row in revisions_table_rows(ctx.revisions):
        table.add_row(row["name"], row["step"], row["commit"])
    ctx.console.print(table)


def stage_check(ctx: DemoContext) -> None:
    from hubmerge.hub.integrity import check
    from hubmerge.hub.revisions import Selector, select

    window = select(ctx.revisions, Selector(last=ctx.config.window))
    report = check(TRAJECTORY_REPO, window, ctx.client, all_revisions=ctx.revisions)
    table = Table(title=f"hubmerge check {TRAJECTORY_REPO} (the last {len(window)})", title_justify="left")
    for col in ("revision", "commit", "weights", "status"):
        table.add_column(col)
    for r in report.checked:
        found = report.for_revision(r.revision)
        status = "; ".join(f"[red]{f.kind}[/red]: {f.detail}" for f in found) if found else "[green]ok[/green]"
        table.add_row(r.revision, (r.commit or "")[:10], str(len(r.weights)), status)
    ctx.console.print(table)


def stage_merge(ctx: DemoContext) -> None:
    import yaml

    from hubmerge.demo.grammar import write_minimal_pairs
    from hubmerge.workflows.merge import merge_recipe

    cfg = ctx.config
    ctx.merged = (cfg.out / f"merged-last{cfg.window}").resolve()
    ctx.merged_repo = f"demo/tiny-grammar-last{cfg.window}"

    pairs = write_minimal_pairs((cfg.out / "grammar-pairs.jsonl").resolve(), cfg.pairs, seed=cfg.seed + 1)
    recipe = {
        "name": f"tiny-grammar-last{cfg.window}",
        "sources": {"repo": TRAJECTORY_REPO, "select": {"last": cfg.window}},
        "method": "uniform",
        "output": {"path": str(ctx.merged), "push": {"repo": ctx.merged_repo}},
        "evaluate": {"tasks": "blimp", "data": str(pairs), "results": str((cfg.out / "results").resolve())},
    }
    ctx.recipe = cfg.out / "recipe.yaml"
    ctx.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False))
    ctx.console.print(f"recipe written to {ctx.recipe}:\n{ctx.recipe.read_text()}")
    result = merge_recipe(ctx.recipe, ctx.client, display=ctx.display)
    ctx.evaluation = result.evaluation
    ctx.summary.append(("recipe", str(ctx.recipe)))
    ctx.summary.append(("merged model", str(result.output)))
    if result.card is not None:
        ctx.summary.append(("model card", str(result.card)))
        plot = result.card.parent / "stability.png"
        if plot.is_file():
            ctx.summary.append(("plot", str(plot)))
    ctx.summary.append(("results store", str((cfg.out / "results" / "results.duckdb").resolve())))
    if result.pushed is not None:
        ctx.summary.append(("merged repo (with card)", f"{ctx.endpoint}/{ctx.merged_repo}"))
        ctx.summary.append(("read the card", f"{ctx.endpoint}/{ctx.merged_repo}/resolve/main/README.md"))


def stage_scores(ctx: DemoContext) -> None:
    """Raw checkpoints vs their average vs their ensemble: mean accuracy over the grammar's paradigms."""
    import numpy as np

    ev = ctx.evaluation
    if ev is None:
        return
    table = Table(title="grammar minimal pairs: accuracy (mean over paradigms)", title_justify="left")
    table.add_column("model")
    table.add_column("mean acc", justify="right")
    table.add_column("per paradigm (min..max)", justify="right")
    by_model: dict[str, list[float]] = {}
    for s in ev.scores:
        by_model.setdefault(s.model, []).append(s.acc)
    for label, accs in by_model.items():
        table.add_row(label, f"{np.mean(accs):.3f}", f"{min(accs):.2f}..{max(accs):.2f}")
    ens = [e["probability"] for e in ev.ensembles]
    if ens:
        table.add_row(
            f"ensemble of the {ctx.config.window} (prob. avg.)",
            f"{np.mean(ens):.3f}",
            f"{min(ens):.2f}..{max(ens):.2f}",
        )
    ctx.console.print(table)


def stage_load(ctx: DemoContext) -> None:
    """The merged folder is a normal transformers model: load it and generate a sentence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubmerge.io.progress import no_transformers_bars

    with no_transformers_bars():
        tok = AutoTokenizer.from_pretrained(ctx.merged)
        model = AutoModelForCausalLM.from_pretrained(ctx.merged)
    prompt = tok("the", return_tensors="pt", add_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    ctx.console.print(f"the merged model generates: [italic]{text}[/italic]")
    ctx.summary.append(("sample", text))


STAGES: list[Stage] = [
    ("start a local Hub server", stage_server),
    ("train a tiny LM and save a checkpoint trajectory", stage_train),
    ("push every checkpoint as a stepN branch", stage_push_trajectory),
    ("list the revisions in training order", stage_revisions),
    ("check the window's integrity", stage_check),
    ("merge the last window, evaluate it, write its card, push both", stage_merge),
    ("compare raw checkpoints, the merge and the ensemble", stage_scores),
    ("load the merge with transformers", stage_load),
]


def run_demo(config: DemoConfig | None = None, stages: list[Stage] | None = None) -> DemoContext:
    """Run every stage in order and print where everything went."""
    config = config or DemoConfig()
    console = Console(stderr=False, quiet=False)
    _prepare_folder(config.out)
    ctx = DemoContext(config, console)
    stages = stages or STAGES
    began = time.perf_counter()
    # The demo's models are tiny: per-op overhead dominates and a second thread only adds OpenMP spin-waits,
    # which on a busy 2-core machine made training 20x slower. One thread is fastest here. Its own HF cache keeps
    # the user's untouched, and so do its other caches (xet, datasets, torch, matplotlib, ...: see isolated_caches);
    # every setting is given back when the demo ends.
    try:
        with torch_threads(1), isolated_caches(config.out):
            for i, (title, fn) in enumerate(stages, 1):
                console.rule(f"[bold][{i}/{len(stages)}] {title}")
                t0 = time.perf_counter()
                fn(ctx)
                ctx.timings.append((title, time.perf_counter() - t0))
                console.print(f"[dim]({ctx.timings[-1][1]:.1f} s)[/dim]")
    finally:
        if ctx.hub is not None:
            ctx.hub.stop()
    console.print(f"[bold]hubmerge demo: done in {time.perf_counter() - began:.0f} s[/bold]", highlight=False)
    width = max((len(what) for what, _ in ctx.summary), default=0)
    for what, where in ctx.summary:  # one line each, never wrapped or cut: these are paths to copy
        console.print(f"{escape(what):<{width}}  {escape(where)}", soft_wrap=True, highlight=False)
    console.print(
        f"Serve the demo Hub again with `hubmerge hub serve --root {escape(str(config.out / 'hub'))}` "
        f"and browse it with the huggingface_hub client.",
        soft_wrap=True,
        highlight=False,
    )
    return ctx
