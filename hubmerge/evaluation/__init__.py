"""The evaluation engine: tasks (definitions, registry, readers, the built-in YAML, lm-eval's tasks), lm-eval-exact
scoring, the runner that scores only what the results store lacks (locally or over Ray), and
:class:`HubmergeLM`, hubmerge as one of lm-eval's models."""

from __future__ import annotations

from typing import Any

__all__ = ["HubmergeLM"]


def __getattr__(name: str) -> Any:
    """``HubmergeLM`` subclasses lm-eval's ``LM``: lm-eval (an optional extra) is imported when it is asked for."""
    if name == "HubmergeLM":
        try:
            from hubmerge.evaluation.lm_eval_model import HubmergeLM
        except ImportError as e:
            if "lm_eval" not in str(e):
                raise
            from hubmerge.errors import MissingExtraError

            raise MissingExtraError(
                "HubmergeLM needs lm-evaluation-harness, an optional extra: pip install 'hubmerge[lm-eval]'"
            ) from None
        return HubmergeLM
    raise AttributeError(f"module 'hubmerge.evaluation' has no attribute {name!r}")
