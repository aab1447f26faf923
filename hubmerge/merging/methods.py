"""The merge methods, declared once: how each weights its sources, what it needs, how cards describe it.

Recipes validate ``method`` against :data:`METHODS`, plans get their weights from :func:`source_weights`, and the
model card reads each method's phrase and description from here. The arithmetic is pure (no I/O, no torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hubmerge.errors import InvalidValueError, RecipeError


def uniform_weights(n: int) -> list[float]:
    if n < 1:
        raise InvalidValueError("need at least one source")
    return [1.0 / n] * n


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Scale non-negative weights to sum to 1; the recipe's ``weights: [1, 1, 2, 4]`` means shares.

    Shares must be finite and non-negative with a finite, positive sum (in float64), so that no NaN, infinity or
    all-zero weight vector ever reaches the arithmetic.
    """
    if not weights:
        raise InvalidValueError("need at least one weight")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) for w in values):
        raise InvalidValueError(f"weights must be finite numbers (got {list(weights)})")
    if any(w < 0 for w in values):
        raise InvalidValueError("weights must be non-negative")
    total = sum(values)
    if not math.isfinite(total):
        raise InvalidValueError(f"weights are too large: their sum overflows (got {list(weights)})")
    if total <= 0:
        raise InvalidValueError("weights must not all be zero")
    return [w / total for w in values]


def ema_weights(n: int, decay: float) -> list[float]:
    """Weights of an exponential moving average over sources ordered oldest to newest.

    Source ``t`` (1 = oldest) gets ``decay ** (n - t)``, normalised: the newest is weighted highest and
    each step back in training multiplies the weight by ``decay``. (Seeding the average with the oldest
    checkpoint, as a training-time EMA does, would instead give the oldest the largest share.)
    """
    if not 0.0 < decay < 1.0:
        raise InvalidValueError("decay must be strictly between 0 and 1")
    if n < 1:
        raise InvalidValueError("need at least one source")
    return normalised_weights([decay ** (n - 1 - i) for i in range(n)])


@dataclass(frozen=True)
class Method:
    """One merge method: its name in recipes, what it needs, and how the card describes it."""

    name: str
    phrase: str  # how a card's first sentence names a merge made with it
    needs: str | None  # the recipe field it takes its parameter from ("weights", "ema"), if any
    weigh: Callable[[int, Sequence[float] | None, float | None], list[float]]
    summary: Callable[[float | None], str]

    def describe(self, decay: float | None = None) -> str:
        """The card's description of this method, with its parameter."""
        return f"`{self.name}`: {self.summary(decay)}"


def _weighted(n: int, weights: Sequence[float] | None, decay: float | None) -> list[float]:
    if weights is None or len(weights) != n:
        raise RecipeError(f"method 'weighted' needs {n} weights, one per source", field="weights")
    return normalised_weights(weights)


def _ema(n: int, weights: Sequence[float] | None, decay: float | None) -> list[float]:
    if decay is None:
        raise RecipeError("method 'ema' needs a decay", field="ema.decay")
    return ema_weights(n, decay)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "uniform",
            "A uniform average",
            None,
            lambda n, w, d: uniform_weights(n),
            lambda d: "plain average, every source weighted equally",
        ),
        Method(
            "weighted",
            "A weighted average",
            "weights",
            _weighted,
            lambda d: "weighted average with the weights listed above",
        ),
        Method(
            "ema",
            "An exponential moving average",
            "ema",
            _ema,
            lambda d: f"exponential moving average, oldest to newest, decay {d} (newest weighted highest)",
        ),
    )
}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is a :class:`RecipeError` listing the known ones."""
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r}; use {', '.join(METHOD_NAMES)}", field="method")
    return METHODS[name]


def source_weights(
    method: str, n: int, weights: Sequence[float] | None = None, decay: float | None = None
) -> list[float]:
    """The weight of each of ``n`` sources (oldest first) under a recipe's method; they sum to 1."""
    return get_method(method).weigh(n, weights, decay)
