"""The ``hubmerge`` command line: a thin shell over the workflows.

Each command parses its options once (a recipe into a :class:`~hubmerge.merging.recipe.RecipeDocument`, the Hub
options into one :class:`~hubmerge.hub.client.HubClient`, ``--quiet`` into one
:class:`~hubmerge.io.progress.Display`), calls one workflow function, and prints through :mod:`.render`. A
:class:`~hubmerge.errors.HubmergeError` becomes one line on stderr and its documented exit code. Heavy libraries
are imported inside the commands that need them, so ``--help``, ``--dry-run``, ``revisions`` and ``check`` start
fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from hubmerge.errors import EXIT_INTERRUPTED, EXIT_USAGE, HubmergeError, IntegrityError, RecipeError
from hubmerge.io.env import quiet_client_warnings
from hubmerge.version import __version__

if TYPE_CHECKING:
    from hubmerge.hub.client import HubClient
    from hubmerge.hub.revisions import Revision
    from hubmerge.io.progress import Display
    from hubmerge.merging.plan import MergePlan
    from hubmerge.merging.recipe import RecipeDocument

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def error_line(message: str) -> None:
    """Print one ``error: ...`` line on stderr: the text verbatim (no markup), its line breaks folded."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)


# click's base of every usage error, from typer's public BadParameter (typer 0.2x ships its own copy of click).
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """The root command: a usage error (unknown option, missing argument, bad value) is one ``error:`` line and
    exit code 2, as every other error, rather than click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # `hubmerge`, `hubmerge hub`: the help
                print(ctx.get_help(), file=sys.stderr)
                sys.exit(EXIT_USAGE)
            where = ctx.command_path if ctx is not None else self.name
            error_line(f"{where}: {e.format_message()} (see `{where} --help`)")
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            err.print("[red]interrupted[/red]", highlight=False)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


# rich_markup_mode=None: help texts are printed as written (`[a, b]` stays), and flags show no metavar.
app = typer.Typer(
    name="hubmerge",
    cls=OneLineErrors,
    help="Average or ensemble neighbouring pretraining checkpoints, and measure how much steadier they get.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
hub_app = typer.Typer(
    help="A local Hub-compatible server for tests, demos and offline work.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(hub_app, name="hub")


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that partial outputs are removed on `kill` too


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt for the command's duration; the previous handler is put back after."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a command called from a worker thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def command(fn: F) -> F:
    """Run a command body with one-line errors and clean interruption."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_interrupts(), quiet_client_warnings():
                return fn(*args, **kwargs)
        except HubmergeError as e:
            error_line(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]: nothing was written to the output", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out.print(f"hubmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """hubmerge: checkpoint averaging and ensembling for pretraining trajectories."""


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Endpoint = Annotated[
    str | None,
    typer.Option(envvar="HF_ENDPOINT", help="Hub URL (default: huggingface.co, or HF_ENDPOINT)."),
]
Select = Annotated[
    str | None,
    typer.Option(
        "--select", "-s", help="Selector, e.g. '{last: 5, every: 1000}' or '{range: [step100000, step110000]}'."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
Stream = Annotated[
    bool | None,
    typer.Option(
        "--stream/--cache",
        help="Read Hub sources by HTTP range requests, writing nothing but the output (--stream), or pull them "
        "into the HF cache first (--cache); default: the recipe's sources.fetch.",
        show_default=False,
    ),
]
UseRay = Annotated[
    bool,
    typer.Option("--ray", help="Run on Ray: merge shards, or sweep passes and scoring, as Ray tasks (same output)."),
]
RayAddress = Annotated[
    str | None, typer.Option(help="Address of a running Ray cluster (implies --ray; default: RAY_ADDRESS).")
]
RayCpus = Annotated[float, typer.Option(help="CPUs each Ray task asks for.")]
RayGpus = Annotated[
    float | None,
    typer.Option(
        help="GPUs each Ray task asks for (default: merge, 1 with --device cuda, else 0; sweep, 1 for scoring "
        "where the cluster has a GPU)."
    ),
]
RayOutput = Annotated[
    str,
    typer.Option(
        help="Where Ray workers put what they write: auto (the output path where a worker sees it, else back to "
        "the driver: a merge's shard bytes, a sweep's scores), shared (the output path, every worker must see "
        "it), driver (always back to the driver)."
    ),
]
Results = Annotated[
    Path | None,
    typer.Option("--results", envvar="HUBMERGE_RESULTS", help="Results folder (default ./hubmerge-results)."),
]


def _client(endpoint: str | None) -> HubClient:
    """The one Hub context of a command: ``--endpoint`` (or HF_ENDPOINT), the user's token, HF_HUB_OFFLINE."""
    from hubmerge.hub.client import HubClient

    return HubClient(endpoint=endpoint)


def _device(device: str) -> str:
    """``--device``: cpu, cuda or cuda:N; anything else is a usage error before any work (no CUDA device: exit 1)."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", device):
        return device
    raise RecipeError(f"--device {device}: not a device hubmerge can use; use cpu, cuda or cuda:N")


def _display(quiet: bool) -> Display:
    from hubmerge.io.progress import Display

    return Display(quiet=quiet, console=err)


@app.command()
@command
def merge(
    recipe: Annotated[Path, typer.Argument(help="YAML merge recipe.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan (reads headers only) and stop.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    device: Annotated[str, typer.Option(help="Where to accumulate: cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(help="Torch compute threads (1 is fastest for this memory-bound loop).")] = 1,
    stream: Stream = None,
    use_ray: UseRay = False,
    ray_address: RayAddress = None,
    ray_cpus_per_task: RayCpus = 1.0,
    ray_gpus_per_task: RayGpus = None,
    ray_output: RayOutput = "auto",
    endpoint: Endpoint = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Merge the checkpoints a recipe names into a new model folder (Hub sources are checked and pulled first,
    or streamed by range requests with --stream; --ray writes its shards on a Ray cluster)."""
    from hubmerge.io.cluster import RayOptions, import_ray
    from hubmerge.merging.recipe import load_recipe
    from hubmerge.workflows.merge import finish_merge, plan_merge, run_merge

    device = _device(device)
    ray = RayOptions(ray_address, ray_cpus_per_task, ray_gpus_per_task, ray_output) if use_ray or ray_address else None
    if ray is not None and not dry_run:
        import_ray()  # without the extra, say so before pulling anything
    doc = load_recipe(recipe)
    client = _client(endpoint)
    streamed = _streamed(doc, stream)
    if dry_run and doc.is_hub and not streamed:
        _hub_dry_run(doc, client, as_json)
        return
    display = _display(quiet or as_json)
    plan = plan_merge(doc, client, device=device, force=force, display=display, stream=streamed)
    if dry_run:
        _show_plan(plan, as_json)
        return
    if not quiet and not as_json:
        _show_plan(plan, False)
    result = run_merge(plan, force=force, display=display, threads=threads, ray=ray)
    outcome = finish_merge(doc, plan, result, client, display=display)
    pushed = outcome.pushed
    if outcome.evaluation is not None and not as_json:
        from hubmerge.cli.render import render_results

        render_results(outcome.evaluation, out)
    if as_json:
        out.print_json(
            data={
                "output": str(result.output),
                "files": result.files,
                "seconds": result.seconds,
                "pushed": pushed.commit_url if pushed else None,
            }
        )
    elif not quiet:
        if pushed:
            out.print(f"[green]pushed[/green] to {pushed.pr_url or pushed.commit_url}")
        out.print(
            f"[green]merged[/green] {len(plan.sources)} checkpoints into {result.output} in {result.seconds:.1f} s"
        )


@app.command()
@command
def plan(
    recipe: Annotated[Path, typer.Argument(help="YAML merge recipe.")],
    endpoint: Endpoint = None,
    as_json: Json = False,
) -> None:
    """Show what a merge would read, write and hold in memory (same as merge --dry-run)."""
    merge(recipe, dry_run=True, force=True, device="cpu", threads=1, endpoint=endpoint, as_json=as_json, quiet=True)


def _streamed(doc: RecipeDocument, stream: bool | None) -> bool:
    """Whether a recipe's Hub sources are streamed: ``--stream``/``--cache``, else its ``sources.fetch``."""
    if stream is not None and not doc.is_hub:
        raise RecipeError(f"{doc.where}: --stream/--cache apply to Hub sources; this recipe lists local folders")
    if stream is not None:
        return stream
    from hubmerge.merging.recipe import HubSources

    return isinstance(doc.recipe.sources, HubSources) and doc.recipe.sources.fetch == "stream"


def _hub_dry_run(doc: RecipeDocument, client: HubClient, as_json: bool) -> None:
    """A Hub recipe's dry run: selection, integrity verdict and download size; no weights fetched."""
    from hubmerge.cli.render import render_revisions
    from hubmerge.io.sizes import format_size
    from hubmerge.workflows.merge import hub_dry_run

    summary = hub_dry_run(doc, client)
    if as_json:
        out.print_json(data=summary.to_dict())
        return
    render_revisions(summary.kept, f"{summary.repo}: {len(summary.kept)} revisions to merge", out)
    for d in summary.dropped:
        out.print(f"dropped {d['revision']}: {d['reason']}")
    out.print(
        f"integrity: ok for the kept revisions; download: {format_size(summary.download_bytes)} in "
        f"{summary.files} files (cached files are reused); tensor names and shapes agree in "
        f"{summary.headers_checked} revisions"
    )


def _selection(
    repo: str, select: str | None, client: HubClient, default: Callable[[list[Revision]], list[Revision]]
) -> tuple[list[Revision], list[Revision]]:
    """(the revisions ``--select`` chooses, or ``default(everything)`` without it; every branch)."""
    from hubmerge.hub.revisions import list_revisions, parse_selector
    from hubmerge.hub.revisions import select as select_revisions

    everything = list_revisions(repo, client)
    chosen = select_revisions(everything, parse_selector(select), repo=repo) if select else default(everything)
    return chosen, everything


@app.command()
@command
def revisions(
    repo: Annotated[str, typer.Argument(help="Hub repo id, e.g. EleutherAI/pythia-160m.")],
    select: Select = None,
    endpoint: Endpoint = None,
    as_json: Json = False,
) -> None:
    """List a repo's checkpoint branches in training order (name, stage, step, tokens, commit)."""
    from hubmerge.cli.render import render_revisions
    from hubmerge.hub.revisions import revisions_table_rows

    revs, _ = _selection(repo, select, _client(endpoint), default=lambda everything: everything)
    if as_json:
        out.print_json(data=revisions_table_rows(revs))
    else:
        what = "selected" if select else "branches"
        render_revisions(revs, f"{repo}: {len(revs)} {what} in training order", out)


@app.command()
@command
def check(
    repo: Annotated[str, typer.Argument(help="Hub repo id.")],
    select: Select = None,
    endpoint: Endpoint = None,
    as_json: Json = False,
) -> None:
    """Check a trajectory's integrity: missing, incomplete, duplicated or mixed weights (no weights downloaded)."""
    from hubmerge.cli.render import render_integrity
    from hubmerge.hub.integrity import check as run_check

    client = _client(endpoint)
    revs, everything = _selection(repo, select, client, default=lambda all_: [r for r in all_ if r.name != "main"])
    report = run_check(repo, revs, client, all_revisions=everything)
    if as_json:
        out.print_json(data=report.to_dict())
    else:
        render_integrity(report, out)
    if report.findings:
        raise typer.Exit(IntegrityError.exit_code)


@app.command()
@command
def pull(
    repo: Annotated[str, typer.Argument(help="Hub repo id.")],
    select: Select = None,
    endpoint: Endpoint = None,
    workers: Annotated[int, typer.Option(help="Parallel downloads.")] = 8,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Download the weights (and config/tokenizer once) of selected revisions into the HF cache."""
    from hubmerge.hub.pull import pull as run_pull
    from hubmerge.hub.revisions import parse_selector, resolve_selection

    if not select:
        raise typer.BadParameter("say which revisions with --select, e.g. --select '{last: 5}'")
    client = _client(endpoint)
    chosen, _ = resolve_selection(repo, parse_selector(select), client)
    refs = run_pull(repo, chosen, client, workers=workers, display=_display(quiet or as_json))
    if as_json:
        out.print_json(data=[r.to_dict() for r in refs])
    elif not quiet:
        for r in refs:
            out.print(f"{r.revision:>24}  {(r.commit or '')[:10]}  {r.path}")


@app.command()
@command
def push(
    folder: Annotated[Path, typer.Argument(help="A merged model folder.")],
    repo: Annotated[str, typer.Argument(help="Target Hub repo id (created if needed).")],
    branch: Annotated[str | None, typer.Option(help="Branch to commit to (created if needed).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    message: Annotated[str | None, typer.Option(help="Commit message (default names the recipe).")] = None,
    endpoint: Endpoint = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Upload a merged folder to a Hub repo in one commit and print the commit URL."""
    from hubmerge.workflows.card import push_merge

    result = push_merge(
        folder, repo, _client(endpoint), branch=branch, private=private, create_pr=create_pr, message=message
    )
    if as_json:
        out.print_json(data=dataclasses.asdict(result))
    elif not quiet:
        out.print(result.pr_url or result.commit_url, highlight=False, soft_wrap=True)


@hub_app.command("serve")
@command
def hub_serve(
    root: Annotated[Path, typer.Option(help="Folder where repositories are stored (kept across restarts).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 7860,
    host: Annotated[str, typer.Option(help="Interface to bind; loopback by default. A dev server: no real auth.")] = (
        "127.0.0.1"
    ),
    max_bandwidth: Annotated[
        float | None,
        typer.Option(help="Cap on the bytes it sends, in MB/s (10^6 bytes), all connections together.", min=0.001),
    ] = None,
    token: Annotated[
        list[str] | None,
        typer.Option("--token", help="Accept only this bearer token (repeat for several); default: any token."),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Run a local Hub-compatible server (development and demos only).

    LFS files are served as the Hub serves them: a redirect to a storage host (here another port) that answers
    range requests."""
    from hubmerge.devhub import serve

    serve(
        root,
        host=host,
        port=port,
        max_bandwidth=max_bandwidth * 1e6 if max_bandwidth else None,
        verbose=not quiet,
        tokens=set(token) if token else None,
    )


@app.command("eval")
@command
def eval_(
    targets: Annotated[list[str], typer.Argument(help="Model folders and/or Hub repo ids (with --select).")],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated tasks, e.g. arc_easy,piqa,blimp; lm_eval:NAME is lm-eval's task NAME.")
    ],
    select: Select = None,
    data: Annotated[Path | None, typer.Option(help="Local data for the task(s): a file or a folder.")] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="multiple_choice, minimal_pairs, cloze or perplexity: score --data as a task of this kind, named by "
            "--tasks (a name of your own, or a built-in of that kind).",
        ),
    ] = None,
    lm_eval_include: Annotated[
        list[Path] | None,
        typer.Option(help="A folder of lm-eval task YAMLs for lm_eval:NAME tasks (lm-eval's --include_path)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="First N examples of each task (as lm-eval's --limit).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Requests per forward pass (default: by token budget).")
    ] = None,
    ensemble: Annotated[int | None, typer.Option(help="Also ensemble every window of K consecutive models.")] = None,
    results: Results = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (default: torch's; 1 suits small models on busy machines).")
    ] = None,
    use_ray: Annotated[bool, typer.Option("--ray", help="Fan (model, task) pairs out over a local Ray.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Address of a running Ray cluster.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be scored and stop.")] = False,
    endpoint: Endpoint = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Score checkpoints, merges and ensembles on downstream tasks; every per-example score is stored."""
    from hubmerge.evaluation.runner import load_tasks, plan_eval
    from hubmerge.hub.revisions import parse_selector
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.evaluate import eval_targets, evaluate

    device = _device(device)
    client = _client(endpoint)
    resolved = eval_targets(targets, parse_selector(select) if select else None, client)
    task_data = load_tasks(tasks, data=data, limit=limit, lm_eval_include=lm_eval_include or (), kind=kind)
    if not (quiet or as_json):
        for note in (n for t in task_data for n in t.notes):
            err.print(f"[dim]{note}[/dim]", highlight=False)
    store = ResultsStore(results)
    plan = plan_eval(resolved, task_data, store, ensemble)
    if dry_run:
        info = plan.to_dict()
        if as_json:
            out.print_json(data=info)
        else:
            out.print(
                f"{len(plan.targets)} models x {len(plan.tasks)} tasks; to score: {info['examples_to_score']} "
                f"examples ({info['requests_to_score']} requests); results in {store.path}"
            )
        return
    result = evaluate(
        plan,
        store,
        client,
        threads=threads,
        batch_size=batch_size,
        device=device,
        display=_display(quiet or as_json),
        use_ray=use_ray,
        ray_address=ray_address,
    )
    from hubmerge.cli.render import render_results, results_json

    if as_json:
        out.print_json(data=results_json(result))
        return

    render_results(result, out)
    out.print(f"scored {result.scored} requests this run; results in {store.path}")


results_app = typer.Typer(
    help="Show, export and import what the results store holds.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)
app.add_typer(results_app, name="results")


@results_app.callback(invoke_without_command=True)
@command
def results(
    ctx: typer.Context,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated task names (default: all).")] = None,
    results_dir: Results = None,
    export: Annotated[Path | None, typer.Option(help="Write to this file (.csv, .parquet, .json, .jsonl).")] = None,
    table: Annotated[str, typer.Option(help="What to export: scores, predictions or logliks.")] = "scores",
    as_json: Json = False,
) -> None:
    """Show (and export) what the results store holds: per (model, task) scores."""
    if ctx.invoked_subcommand is not None:
        return
    from hubmerge.cli.render import render_scores, scores_json
    from hubmerge.results.store import ResultsStore

    store = ResultsStore(results_dir, read_only=True)
    names = [t.strip() for t in tasks.split(",")] if tasks else None
    if export is not None:
        path = store.export(export, table=table, task=names)
        out.print(f"wrote {path}")
        return
    rows = store.scores(names)
    if as_json:
        out.print_json(data=scores_json(rows))
        return
    render_scores(rows, f"results in {store.path}", out)


@results_app.command("import")
@command
def results_import(
    paths: Annotated[list[Path], typer.Argument(help="lm-eval output folders (searched recursively) or files.")],
    results_dir: Results = None,
    repo: Annotated[str | None, typer.Option(help="The Hub repo the runs scored (overrides the files).")] = None,
    revision: Annotated[str | None, typer.Option(help="The revision the runs scored (overrides the files).")] = None,
    filter_name: Annotated[str, typer.Option("--filter", help="lm-eval filter whose samples to keep.")] = "none",
    endpoint: Endpoint = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Import lm-evaluation-harness runs (results and --log_samples files) into the results store."""
    from hubmerge.cli.render import render_import
    from hubmerge.workflows.imports import import_lm_eval

    report = import_lm_eval(
        paths,
        results_dir,
        _client(endpoint),
        repo=repo,
        revision=revision,
        filter_name=filter_name,
        display=_display(quiet or as_json),
    )
    if as_json:
        out.print_json(data=report.to_dict())
        return
    render_import(report, out)


@app.command()
@command
def stability(
    lm_eval: Annotated[
        list[Path] | None,
        typer.Option("--lm-eval", help="lm-evaluation-harness result JSON files or folders (aggregate scores)."),
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: every task found).")] = None,
    metric: Annotated[str, typer.Option(help="Score to use where a task has several (acc, acc_norm, ...).")] = "acc",
    since: Annotated[int | None, typer.Option(help="First training step to include.")] = None,
    until: Annotated[int | None, typer.Option(help="Last training step to include.")] = None,
    window: Annotated[int | None, typer.Option(help="Window size for std, range and worst drop.")] = None,
    stride: Annotated[int, typer.Option(help="Stride between windows.")] = 1,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the CSV, JSON and plots go.")] = Path(
        "hubmerge-stability"
    ),
    title: Annotated[str | None, typer.Option(help="Model name for titles.")] = None,
    results_dir: Results = None,
    repo: Annotated[str | None, typer.Option(help="Results store: the repo whose revisions to use.")] = None,
    ensemble: Annotated[str | None, typer.Option(help="Results store: ensemble window sizes, e.g. 2,4.")] = None,
    subtasks: Annotated[
        bool, typer.Option("--subtasks", help="Show each task of a group in the tables and plots, not only the group.")
    ] = False,
    as_json: Json = False,
) -> None:
    """Instability of downstream scores along a trajectory: MTV, flip rate, IS, windowed std/range/worst drop.

    From lm-eval result files (aggregate scores) with --lm-eval; otherwise from the results store: the
    per-example scores of every evaluated revision (of --repo), and ensembles of their windows (--ensemble).
    """
    from hubmerge.cli.render import render_comparison, render_skipped
    from hubmerge.workflows.reports import stability_from_lm_eval, stability_from_store

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if lm_eval:
        result = stability_from_lm_eval(
            lm_eval,
            tasks=task_list,
            metric=(metric,),
            since=since,
            until=until,
            window=window,
            stride=stride,
            out=out_dir,
            title=title,
            subtasks=subtasks,
        )
    else:
        sizes = _ensemble_sizes(ensemble) if ensemble else []
        result = stability_from_store(
            results_dir,
            repo=repo,
            tasks=task_list,
            ensembles=sizes,
            since=since,
            until=until,
            out=out_dir,
            title=title,
            subtasks=subtasks,
        )
    if as_json:
        out.print_json(data=result.comparison.to_dict())
        return
    render_comparison(result.comparison, out, result.model or "trajectory", tasks=result.headline)
    for group, how in result.group_notes.items():
        out.print(f"[dim]{group}: {how}; its tasks are in the CSV/JSON (--subtasks shows them here)[/dim]")
    render_skipped(result.skipped, err)
    out.print("wrote " + ", ".join(str(p) for p in result.files))


def _ensemble_sizes(text: str) -> list[int]:
    """``--ensemble 2,4`` as window sizes; anything else is a one-line usage error."""
    from hubmerge.errors import RecipeError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--ensemble {text!r}: give window sizes as integers, e.g. --ensemble 2,4") from None


@app.command()
@command
def card(
    folder: Annotated[Path, typer.Argument(help="A merged model folder (with hubmerge.json).")],
    results_dir: Results = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: all stored for it).")] = None,
    license_: Annotated[
        str | None, typer.Option("--license", help="License id (default: the sources' own, from the Hub card).")
    ] = None,
    endpoint: Endpoint = None,
) -> None:
    """Write the stability model card (README.md) of a merge from the results store."""
    from hubmerge.workflows.card import write_card_from_store

    names = [t.strip() for t in tasks.split(",")] if tasks else None
    path = write_card_from_store(folder, results_dir, names, license=license_, client=_client(endpoint))
    out.print(f"wrote {path}")


@app.command()
@command
def sweep(
    recipe: Annotated[Path, typer.Argument(help="Recipe with sources, a sweep: block and an evaluate: block.")],
    keep: Annotated[bool | None, typer.Option("--keep/--no-keep", help="Keep every window's merged folder.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default OUTPUT/report).")] = None,
    stream: Stream = None,
    use_ray: UseRay = False,
    ray_address: RayAddress = None,
    ray_cpus_per_task: RayCpus = 1.0,
    ray_gpus_per_task: RayGpus = None,
    ray_output: RayOutput = "auto",
    endpoint: Endpoint = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Average every window of a trajectory (one shared read), score raw/averaged/ensembled, report stability
    (--ray: each pass and each scoring on Ray tasks; the driver writes the store and the report)."""
    from hubmerge.cli.render import render_comparison
    from hubmerge.io.cluster import RayOptions, import_ray
    from hubmerge.merging.recipe import load_recipe
    from hubmerge.workflows.sweep import run_sweep_recipe

    ray = RayOptions(ray_address, ray_cpus_per_task, ray_gpus_per_task, ray_output) if use_ray or ray_address else None
    if ray is not None:
        import_ray()  # without the extra, say so before reading anything
    doc = load_recipe(recipe)
    report = run_sweep_recipe(
        doc,
        _client(endpoint),
        display=_display(quiet or as_json),
        keep=keep,
        out=out_dir,
        stream=_streamed(doc, stream),
        ray=ray,
    )
    if as_json:
        out.print_json(
            data={
                "recommendation": report.recommendation,
                "files": [str(p) for p in report.files],
                "windows": report.windows,
                "bytes_read": report.bytes_read,
                "comparison": report.comparison.to_dict(),
            }
        )
        return
    render_comparison(report.comparison, out, "sweep", tasks=report.headline)
    if report.headline is not None:
        out.print("[dim]each paradigm's rows are in stability.csv / stability.json[/dim]")
    rec = report.recommendation
    if "window" in rec:
        from hubmerge.cli.render import recommendation_evidence

        out.print(
            f"[bold]recommended:[/bold] window size {rec['window_size']}, {rec['window']} "
            f"(mean score {rec['mean_score']:.4f}); {rec['how']}"
        )
        for line in recommendation_evidence(rec):
            out.print(f"  {line}", highlight=False)
    else:
        out.print(rec["how"])
    out.print("wrote " + ", ".join(str(p) for p in report.files))


@app.command()
@command
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for everything the demo makes.")] = Path(
        "hubmerge-demo"
    ),
    steps: Annotated[int, typer.Option(help="Training steps.")] = 300,
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps.")] = 25,
    window: Annotated[int, typer.Option(help="How many of the last checkpoints to merge.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed for data, initialisation and training.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Offline end to end: local Hub, train a tiny trajectory, push, list, check, merge, push the merge."""
    from hubmerge.demo.pipeline import DemoConfig, run_demo

    run_demo(DemoConfig(out=out_dir, steps=steps, save_every=save_every, window=window, seed=seed, quiet=quiet))


def _show_plan(plan: MergePlan, as_json: bool) -> None:
    from hubmerge.cli.render import render_plan

    if as_json:
        out.print_json(json.dumps(plan.to_dict()))
    else:
        render_plan(plan, out)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `hubmerge revisions ... | head`
        sys.stderr.close()
