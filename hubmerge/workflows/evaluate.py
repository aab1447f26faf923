"""``hubmerge eval``: score folders and Hub revisions on tasks, keeping every per-example score in the store.

The engine (:mod:`hubmerge.evaluation.runner`) plans and scores; this module turns what a user names on the
command line (folders, or a Hub repo with a selector) into targets, and runs the scoring on the thread count
asked for, giving the caller's back afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hubmerge.errors import RecipeError
from hubmerge.evaluation.runner import EvalPlan, EvalResult, EvalTarget, run_eval, target_from_folder, targets_from_hub
from hubmerge.hub.client import HubClient
from hubmerge.hub.revisions import Selector
from hubmerge.io.env import torch_threads
from hubmerge.io.progress import QUIET, Display
from hubmerge.results.store import ResultsStore


def eval_targets(names: Sequence[str], selector: Selector | None, client: HubClient) -> list[EvalTarget]:
    """Model folders as they are; anything else is a Hub repo id, whose revisions ``selector`` chooses."""
    targets: list[EvalTarget] = []
    for name in names:
        if Path(name).is_dir():
            targets.append(target_from_folder(name))
        elif selector is None:
            raise RecipeError(
                f"{name} is not a folder; for a Hub repo say which revisions with --select, "
                "e.g. --select '{last: 5}'",
                path=name,
            )
        else:
            targets += targets_from_hub(name, selector, client)
    return targets


def evaluate(
    plan: EvalPlan,
    store: ResultsStore,
    client: HubClient | None = None,
    *,
    threads: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    display: Display = QUIET,
    use_ray: bool = False,
    ray_address: str | None = None,
) -> EvalResult:
    """Score what ``plan`` lacks on ``threads`` torch threads (None: torch's setting), restored afterwards."""
    with torch_threads(threads):
        return run_eval(
            plan,
            store,
            client=client,
            batch_size=batch_size,
            device=device,
            display=display,
            use_ray=use_ray,
            ray_address=ray_address,
        )
