"""The arithmetic of checkpoint averaging, as pure functions (no I/O, no torch)."""

from __future__ import annotations

from collections.abc import Sequence


def uniform_weights(n: int) -> list[float]:
    if n < 1:
        raise ValueError("need at least one source")
    return [1.0 / n] * n


def normalised_weights(weights: Sequence[float]) -> list[float]:
    """Scale non-negative weights to sum to 1; the recipe's ``weights: [1, 1, 2, 4]`` means shares."""
    if not weights:
        raise ValueError("need at least one weight")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return [w / total for w in weights]


def ema_weights(n: int, decay: float) -> list[float]:
    """Weights of an exponential moving average over sources ordered oldest to newest.

    Source ``t`` (1 = oldest) gets ``decay ** (n - t)``, normalised: the newest is weighted highest and
    each step back in training multiplies the weight by ``decay``. (Seeding the average with the oldest
    checkpoint, as a training-time EMA does, would instead give the oldest the largest share.)
    """
    if not 0.0 < decay < 1.0:
        raise ValueError("decay must be strictly between 0 and 1")
    if n < 1:
        raise ValueError("need at least one source")
    return normalised_weights([decay ** (n - 1 - i) for i in range(n)])


def source_weights(
    method: str, n: int, weights: Sequence[float] | None = None, decay: float | None = None
) -> list[float]:
    """The weight of each of ``n`` sources (oldest first) under a recipe's method; they sum to 1."""
    if method == "uniform":
        return uniform_weights(n)
    if method == "weighted":
        if weights is None or len(weights) != n:
            raise ValueError(f"method 'weighted' needs {n} weights")
        return normalised_weights(weights)
    if method == "ema":
        if decay is None:
            raise ValueError("method 'ema' needs a decay")
        return ema_weights(n, decay)
    raise ValueError(f"unknown method {method!r}")
