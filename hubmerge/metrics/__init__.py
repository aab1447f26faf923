"""hubmerge's metrics as ``evaluate`` modules, loaded from their folder inside the package (never fetched).

Each metric is a folder ``<name>/`` holding ``<name>.py`` with one ``evaluate.Metric`` subclass, the layout
``evaluate.load(path)`` accepts offline; users can load them the same way in their own code. The modules hold
no arithmetic of their own: they call :mod:`hubmerge.results.scores`, which the results store uses too, so a
metric and a stored score cannot drift apart. ``evaluate`` (and with it ``datasets``) is imported only here,
on first use, because it is slow to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubmerge.errors import HubmergeError

METRICS_DIR = Path(__file__).resolve().parent


def list_metrics() -> list[str]:
    """Names of the metrics shipped with hubmerge."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """The folder of metric ``name``; what to pass to ``evaluate.load``."""
    if name not in list_metrics():
        raise HubmergeError(f"unknown metric {name!r}; hubmerge ships {', '.join(list_metrics())}")
    return METRICS_DIR / name


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of one of our metrics from its path; in memory unless ``keep_in_memory=False``."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(metric_path(name)), **kwargs)
