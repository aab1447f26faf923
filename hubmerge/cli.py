"""The ``hubmerge`` command line: a thin layer over the Python API.

Every command calls one importable function and turns :class:`~hubmerge.errors.HubmergeError` into one
line on stderr and a non-zero exit code. Heavy libraries are imported inside the commands that need
them, so ``--help``, ``--dry-run``, ``revisions`` and ``check`` start fast.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from . import __version__
from .errors import HubmergeError

app = typer.Typer(
    name="hubmerge",
    help="Average or ensemble neighbouring pretraining checkpoints, and measure how much steadier they get.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
hub_app = typer.Typer(help="A local Hub-compatible server for tests, demos and offline work.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that partial outputs are removed on `kill` too


def command(fn: F) -> F:
    """Run a command body with one-line errors and clean interruption."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except HubmergeError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[red]interrupted[/red]: nothing was written to the output", highlight=False)
            raise typer.Exit(130) from None

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
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


@app.command()
@command
def merge(
    recipe: Annotated[Path, typer.Argument(help="YAML merge recipe.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan (reads headers only) and stop.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    device: Annotated[str, typer.Option(help="Where to accumulate: cpu or cuda.")] = "cpu",
    threads: Annotated[int, typer.Option(help="Torch compute threads (1 is fastest for this memory-bound loop).")] = 1,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Merge the checkpoints a recipe names into a new model folder."""
    from .merge import execute, plan_recipe

    plan = plan_recipe(recipe, device=device, force=force)
    if dry_run:
        _show_plan(plan, as_json)
        return
    if not quiet and not as_json:
        _show_plan(plan, False)
    result = execute(plan, force=force, quiet=quiet or as_json, threads=threads)
    if as_json:
        out.print_json(data={"output": str(result.output), "files": result.files, "seconds": result.seconds})
    elif not quiet:
        out.print(
            f"[green]merged[/green] {len(plan.sources)} checkpoints into {result.output} in {result.seconds:.1f} s"
        )


@app.command()
@command
def plan(
    recipe: Annotated[Path, typer.Argument(help="YAML merge recipe.")],
    as_json: Json = False,
) -> None:
    """Show what a merge would read, write and hold in memory (same as merge --dry-run)."""
    from .merge import plan_recipe

    _show_plan(plan_recipe(recipe, force=True), as_json)


def _show_plan(plan: Any, as_json: bool) -> None:
    from .plan import render_plan

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


if __name__ == "__main__":
    main()
