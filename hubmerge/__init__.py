"""hubmerge: average or ensemble neighbouring pretraining checkpoints, and measure the stability gain.

The public API is importable from the package itself (``from hubmerge import merge_recipe``) through a lazy
facade, as ``huggingface_hub`` does: a name's module is imported on first use, so ``import hubmerge`` stays fast
and these names stay put while the modules behind them move. The package's folders are its layers; the README's
"How the code is organised" says what each holds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hubmerge.version import __version__

# Module -> the public names it provides through the facade.
_SUBMOD_ATTRS: dict[str, list[str]] = {
    "hubmerge.errors": ["HubmergeError", "RecipeError", "SourceError", "OutputError", "HubError", "StoreError"],
    "hubmerge.io.progress": ["Display"],
    "hubmerge.hub.client": ["HubClient"],
    "hubmerge.hub.revisions": ["Selector", "list_revisions", "parse_selector", "select"],
    "hubmerge.hub.pull": ["pull"],
    "hubmerge.hub.push": ["push", "push_checkpoints"],
    "hubmerge.results.store": ["ResultsStore"],
    "hubmerge.merging.recipe": ["Recipe", "RecipeDocument", "load_recipe"],
    "hubmerge.merging.methods": ["METHODS", "source_weights"],
    "hubmerge.merging.plan": ["MergePlan", "build_plan"],
    "hubmerge.merging.executor": ["MergeResult", "execute"],
    "hubmerge.merging.sweep": ["SweepPlan", "plan_sweep", "run_sweep"],
    "hubmerge.evaluation.tasks.registry": ["list_tasks", "load_task"],
    "hubmerge.evaluation.runner": ["load_tasks", "plan_eval", "run_eval", "target_from_folder", "targets_from_hub"],
    "hubmerge.stability.metrics": ["flip_rate", "instability_score", "mean_total_variation"],
    "hubmerge.stability.report": ["StabilityReport", "compare"],
    "hubmerge.workflows.merge": ["MergeOutcome", "merge_recipe", "plan_merge"],
    "hubmerge.workflows.evaluate": ["evaluate"],
    "hubmerge.workflows.sweep": ["run_sweep_recipe"],
    "hubmerge.workflows.reports": ["stability_from_lm_eval", "stability_from_store"],
    "hubmerge.workflows.card": ["write_card", "write_card_from_store"],
}
_ATTR_MODULE = {name: module for module, names in _SUBMOD_ATTRS.items() for name in names}

__all__ = ["__version__", *sorted(_ATTR_MODULE)]


def __getattr__(name: str) -> Any:
    module = _ATTR_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module 'hubmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from hubmerge.errors import HubError, HubmergeError, OutputError, RecipeError, SourceError, StoreError
    from hubmerge.evaluation.runner import load_tasks, plan_eval, run_eval, target_from_folder, targets_from_hub
    from hubmerge.evaluation.tasks.registry import list_tasks, load_task
    from hubmerge.hub.client import HubClient
    from hubmerge.hub.pull import pull
    from hubmerge.hub.push import push, push_checkpoints
    from hubmerge.hub.revisions import Selector, list_revisions, parse_selector, select
    from hubmerge.io.progress import Display
    from hubmerge.merging.executor import MergeResult, execute
    from hubmerge.merging.methods import METHODS, source_weights
    from hubmerge.merging.plan import MergePlan, build_plan
    from hubmerge.merging.recipe import Recipe, RecipeDocument, load_recipe
    from hubmerge.merging.sweep import SweepPlan, plan_sweep, run_sweep
    from hubmerge.results.store import ResultsStore
    from hubmerge.stability.metrics import flip_rate, instability_score, mean_total_variation
    from hubmerge.stability.report import StabilityReport, compare
    from hubmerge.workflows.card import write_card, write_card_from_store
    from hubmerge.workflows.evaluate import evaluate
    from hubmerge.workflows.merge import MergeOutcome, merge_recipe, plan_merge
    from hubmerge.workflows.reports import stability_from_lm_eval, stability_from_store
    from hubmerge.workflows.sweep import run_sweep_recipe
