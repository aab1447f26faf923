"""Scores and checkpoint ensembles from per-choice log-likelihoods: pure numpy, no model, no I/O.

Everything downstream of scoring is arithmetic on a matrix ``ll[n_examples, n_choices]`` of summed
log-likelihoods, so the results store, the ``evaluate`` modules in :mod:`hubmerge.metrics`, the stability series
and the CLI all call these functions instead of re-deriving a prediction in each. The module sits beside the store
because the store derives every stored prediction with it, in the same transaction as the log-likelihoods.
Definitions follow lm-evaluation-harness exactly (``acc``, ``acc_norm``, LAMBADA ``acc``, weighted perplexities)
so numbers compare one to one.

Examples with fewer choices than the widest one are padded at the end with NaN. A NaN anywhere else (a hole
before a present choice, an example with no choice at all) is a scoring failure, e.g. a float16 overflow, and
is refused rather than silently read as "absent".
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from hubmerge.errors import RecipeError, ScoresError

T = TypeVar("T")


def _matrix(ll: np.ndarray | Sequence[Sequence[float]], what: str = "log-likelihoods") -> np.ndarray:
    """A float64 ``[n, c]`` matrix whose NaNs only pad the end of rows; raises on holes and empty rows."""
    ll = np.asarray(ll, dtype=np.float64)
    if ll.ndim != 2:
        raise ScoresError(f"{what}: expected a 2-d array [examples, choices], got shape {ll.shape}")
    absent = np.isnan(ll)
    if ll.shape[1] == 0 or absent[:, 0].any():
        row = int(np.argmax(absent[:, 0])) if ll.shape[1] else 0
        raise ScoresError(f"{what}: example row {row} has a NaN log-likelihood for choice 0 (every example needs one)")
    holes = absent[:, :-1] & ~absent[:, 1:]  # NaN followed by a number: not end padding
    if holes.any():
        row, choice = (int(i) for i in np.argwhere(holes)[0])
        raise ScoresError(
            f"{what}: example row {row} has a NaN log-likelihood for choice {choice} although choice {choice + 1} "
            "exists; a NaN may only pad absent trailing choices (scoring produced NaN: check the model's dtype)"
        )
    return ll


def pad(rows: Sequence[Sequence[float]], fill: float = np.nan) -> np.ndarray:
    """Ragged per-example lists (one value per choice) as a ``[n, max_choices]`` float matrix padded with ``fill``."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def normalised(ll: np.ndarray, choice_chars: np.ndarray) -> np.ndarray:
    """``ll / len(choice)`` as lm-eval's ``acc_norm`` ranks choices (absent choices stay NaN).

    A zero-length choice divides by zero exactly as lm-eval's numpy code does (``-inf`` for a negative
    log-likelihood), so even that corner agrees with the harness.
    """
    ll = _matrix(ll)
    chars = np.asarray(choice_chars, dtype=np.float64)
    if chars.shape != ll.shape:
        raise ScoresError(f"choice lengths have shape {chars.shape} but log-likelihoods have shape {ll.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = ll / chars
    norm[np.isnan(ll)] = np.nan
    return norm


def _argmax(scores: np.ndarray, absent: np.ndarray) -> np.ndarray:
    """Row-wise argmax with absent choices excluded; ties go to the lowest index, as ``np.argmax`` in lm-eval."""
    scores = np.where(absent, -np.inf, scores)
    return np.argmax(scores, axis=1)


def predictions(ll: np.ndarray, choice_chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example predicted choice for ``acc`` (argmax of ll) and ``acc_norm`` (argmax of ll / chars)."""
    ll = _matrix(ll)
    absent = np.isnan(ll)
    return _argmax(ll, absent), _argmax(normalised(ll, choice_chars), absent)


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Share of examples whose prediction is the gold index (NaN for no examples)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.shape != gold.shape:
        raise ScoresError(f"{pred.shape[0]} predictions but {gold.shape[0]} gold labels")
    return float(np.mean(pred == gold)) if pred.size else math.nan


def mc_accuracy(ll: np.ndarray, choice_chars: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """lm-eval's multiple-choice ``acc`` and ``acc_norm``."""
    pred, pred_norm = predictions(ll, choice_chars)
    return {"acc": accuracy(pred, gold), "acc_norm": accuracy(pred_norm, gold)}


def minimal_pairs_accuracy(good: np.ndarray, bad: np.ndarray) -> float:
    """BLiMP accuracy: share of pairs where the good sentence is the more likely one.

    lm-eval scores a pair as a two-choice question with gold 0 and takes ``np.argmax``, so an exact tie counts
    as correct (``good >= bad``); we keep that so per-example predictions match the harness.
    """
    pair = _matrix(np.stack([np.asarray(good, dtype=np.float64), np.asarray(bad, dtype=np.float64)], axis=1))
    if np.isnan(pair).any():
        row = int(np.argwhere(np.isnan(pair))[0, 0])
        raise ScoresError(f"minimal pair row {row}: NaN log-likelihood for the bad sentence")
    return accuracy(np.argmax(pair, axis=1), np.zeros(len(pair), dtype=np.int64))


def cloze_accuracy(is_greedy: np.ndarray) -> float:
    """LAMBADA-style ``acc``: share of examples whose target is the model's greedy continuation."""
    is_greedy = np.asarray(is_greedy, dtype=bool)
    return float(is_greedy.mean()) if is_greedy.size else math.nan


def cloze_perplexity(logprobs: np.ndarray) -> float:
    """LAMBADA's ``perplexity``: ``exp(-mean(logprob of the target))``, lm-eval's unweighted aggregation."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if np.isnan(logprobs).any():
        raise ScoresError(f"cloze row {int(np.argwhere(np.isnan(logprobs))[0, 0])}: NaN log-likelihood")
    return math.exp(-float(logprobs.mean())) if logprobs.size else math.nan


def count_words(text: str) -> int:
    """Words as lm-eval counts them for ``word_perplexity``: ``len(re.split(r"\\s+", text))``."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes, lm-eval's weight for ``byte_perplexity`` and ``bits_per_byte``."""
    return len(text.encode("utf-8"))


def perplexities(logprobs: np.ndarray, words: np.ndarray, n_bytes: np.ndarray) -> dict[str, float]:
    """lm-eval's rolling-loglikelihood metrics, weighted by words and bytes over the whole corpus."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if np.isnan(logprobs).any():
        raise ScoresError(f"text row {int(np.argwhere(np.isnan(logprobs))[0, 0])}: NaN log-likelihood")
    total, n_words, total_bytes = float(logprobs.sum()), float(np.sum(words)), float(np.sum(n_bytes))
    if n_words <= 0 or total_bytes <= 0:
        raise ScoresError("perplexity needs at least one word and one byte of text")
    return {
        "word_perplexity": math.exp(-total / n_words),
        "byte_perplexity": math.exp(-total / total_bytes),
        "bits_per_byte": -total / total_bytes / math.log(2),
    }


def softmax_choices(ll: np.ndarray) -> np.ndarray:
    """Each example's probability distribution over its choices (absent choices get probability 0)."""
    ll = _matrix(ll)
    shifted = ll - np.nanmax(ll, axis=1, keepdims=True)
    p = np.exp(np.nan_to_num(shifted, nan=-np.inf))
    return p / p.sum(axis=1, keepdims=True)


def ensemble_probability(lls: Sequence[np.ndarray]) -> np.ndarray:
    """Probability averaging: argmax of the members' mean softmax over choices (ties: lowest index).

    For ``acc_norm`` pass each member's :func:`normalised` scores instead of raw log-likelihoods.
    """
    if not lls:
        raise ScoresError("an ensemble needs at least one member")
    mats = [_matrix(m, f"member {i}") for i, m in enumerate(lls)]
    shape, absent = mats[0].shape, np.isnan(mats[0])
    for i, m in enumerate(mats[1:], 1):
        if m.shape != shape or not np.array_equal(np.isnan(m), absent):
            raise ScoresError(
                f"ensemble member {i} has different examples or choices than member 0 ({m.shape} vs {shape})"
            )
    mean = np.mean([softmax_choices(m) for m in mats], axis=0)
    return _argmax(mean, absent)


def ensemble_majority(preds: Sequence[np.ndarray]) -> np.ndarray:
    """Majority vote over members' predicted indices, members ordered oldest to newest.

    Ties: among the choices with the most votes, take the one predicted by the newest member that voted for
    any of them. The newest checkpoint has seen the most data, so it is the natural arbiter; the rule is
    deterministic and reduces to "the newest member's vote" when every member disagrees.
    """
    if not preds:
        raise ScoresError("an ensemble needs at least one member")
    votes = np.stack([np.asarray(p, dtype=np.int64) for p in preds])  # [members, examples]
    if votes.ndim != 2 or (votes < 0).any():
        raise ScoresError("majority vote needs one non-negative predicted index per example from every member")
    n_members, n = votes.shape
    rows = np.arange(n)
    counts = np.zeros((n, int(votes.max(initial=0)) + 1), dtype=np.int64)
    for v in votes:
        np.add.at(counts, (rows, v), 1)
    tied = counts == counts.max(axis=1, keepdims=True)
    out = np.full(n, -1, dtype=np.int64)
    for v in votes[::-1]:  # newest first: the first tied choice met decides
        pick = (out < 0) & tied[rows, v]
        out[pick] = v[pick]
    return out


def windows(members: Sequence[T], k: int) -> list[list[T]]:
    """Every run of ``k`` consecutive members, oldest first: the ensembles ``--ensemble k`` evaluates."""
    if not 1 <= k <= len(members):
        raise RecipeError(f"--ensemble {k}: needs 1 <= k <= the number of selected revisions ({len(members)})")
    return [list(members[i : i + k]) for i in range(len(members) - k + 1)]
