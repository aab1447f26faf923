"""Pure scoring and ensembling arithmetic against hand computations and lm-eval's definitions."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from hubmerge.errors import RecipeError
from hubmerge.results import scores as ens

NAN = np.nan


def lm_eval_predictions(lls: list[list[float]], choices: list[list[str]]) -> tuple[list[int], list[int]]:
    """lm-eval's multiple_choice process_results, one example at a time (its own numpy calls)."""
    pred, pred_norm = [], []
    for ll, ch in zip(lls, choices, strict=True):
        ll = np.array(ll)
        completion_len = np.array([float(len(c)) for c in ch])
        pred.append(int(np.argmax(ll)))
        with np.errstate(divide="ignore"):
            pred_norm.append(int(np.argmax(ll / completion_len)))
    return pred, pred_norm


def test_predictions_match_lm_eval_with_ragged_choices_and_ties():
    choices = [["a", "bbbb"], ["x", "yy", "zzz"], ["p", "q", "r", "s"], ["", "long answer"]]
    lls = [[-1.0, -2.0], [-3.0, -3.0, -6.0], [-2.0, -1.0, -1.0, -4.0], [-0.5, -3.0]]
    ll = ens.pad(lls)
    chars = ens.pad([[len(c) for c in ch] for ch in choices], fill=0)
    pred, pred_norm = ens.predictions(ll, chars)
    want, want_norm = lm_eval_predictions(lls, choices)
    assert pred.tolist() == want == [0, 0, 1, 0]  # ties go to the lowest index
    assert pred_norm.tolist() == want_norm == [1, 1, 1, 1]  # -1/1 < -2/4; -3/1 < -3/2; an empty choice is -inf
    gold = np.array([0, 1, 2, 1])
    assert ens.mc_accuracy(ll, chars, gold) == {"acc": 0.25, "acc_norm": 0.5}


def test_predictions_agree_with_lm_eval_on_random_examples():
    rng = np.random.default_rng(0)
    lls, choices = [], []
    for _ in range(200):
        k = int(rng.integers(2, 6))
        lls.append(list(np.round(-rng.random(k) * 20, 1)))  # rounding makes ties common
        choices.append(["w" * int(rng.integers(1, 30)) for _ in range(k)])
    pred, pred_norm = ens.predictions(ens.pad(lls), ens.pad([[len(c) for c in ch] for ch in choices], fill=0))
    want, want_norm = lm_eval_predictions(lls, choices)
    assert pred.tolist() == want
    assert pred_norm.tolist() == want_norm


def test_nan_where_a_choice_exists_is_refused():
    with pytest.raises(ens.ScoresError, match="row 1 .*choice 0"):
        ens.predictions(np.array([[-1.0, -2.0], [NAN, -1.0]]), np.ones((2, 2)))
    with pytest.raises(ens.ScoresError, match="row 0 .*choice 1 although choice 2 exists"):
        ens.predictions(np.array([[-1.0, NAN, -2.0]]), np.ones((1, 3)))
    with pytest.raises(ens.ScoresError, match="bad sentence"):
        ens.minimal_pairs_accuracy([-1.0, -2.0], [-1.5, NAN])
    with pytest.raises(ens.ScoresError, match="NaN"):
        ens.cloze_perplexity([-1.0, NAN])
    with pytest.raises(ens.ScoresError, match="NaN"):
        ens.perplexities([NAN], [1], [1])
    with pytest.raises(ens.ScoresError, match="choice 0"):
        ens.ensemble_probability([np.array([[-1.0, -2.0]]), np.array([[NAN, NAN]])])


def test_softmax_and_probability_ensemble_by_hand():
    # member A: p = [0.8, 0.2] on ex0; member B: [0.3, 0.7]; mean [0.55, 0.45] -> 0
    a = np.log(np.array([[0.8, 0.2], [0.1, 0.9]]))
    b = np.log(np.array([[0.3, 0.7], [0.6, 0.4]]))
    np.testing.assert_allclose(ens.softmax_choices(a), [[0.8, 0.2], [0.1, 0.9]])
    # ex1: mean [0.35, 0.65] -> 1
    assert ens.ensemble_probability([a, b]).tolist() == [0, 1]
    # log-likelihoods need not be normalised: softmax over choices removes a per-example constant
    assert ens.ensemble_probability([a - 5.0, b + 2.0]).tolist() == [0, 1]


def test_probability_ensemble_differs_from_majority_where_it_should():
    # two members barely prefer choice 1, one member is sure of choice 0
    sure0 = np.log(np.array([[0.98, 0.01, 0.01]]))
    weak1 = np.log(np.array([[0.30, 0.40, 0.30]]))
    assert ens.ensemble_probability([weak1, weak1, sure0]).tolist() == [0]  # mean p0 = 0.527
    votes = [ens.predictions(m, np.ones((1, 3)))[0] for m in (weak1, weak1, sure0)]
    assert ens.ensemble_majority(votes).tolist() == [1]


def test_probability_ensemble_ignores_absent_choices_and_ties_go_low():
    a = np.array([[-1.0, -1.0, NAN], [-2.0, -1.0, -3.0]])
    b = np.array([[-1.0, -1.0, NAN], [-1.0, -2.0, -3.0]])
    p = ens.softmax_choices(a)
    assert p[0, 2] == 0.0 and p[0].sum() == pytest.approx(1.0)
    assert ens.ensemble_probability([a, b]).tolist() == [0, 0]  # exact ties -> lowest index
    with pytest.raises(ens.ScoresError, match="member 1"):
        ens.ensemble_probability([a, np.array([[-1.0, -1.0, -1.0], [-2.0, -1.0, -3.0]])])


def test_majority_vote_ties_go_to_the_newest_member_voting_for_a_tied_choice():
    votes = np.array(
        [  # members oldest -> newest; columns are examples
            [0, 0, 0, 2, 1],
            [1, 1, 0, 2, 1],
            [2, 1, 1, 0, 1],
            [3, 0, 1, 1, 0],
            [4, 2, 2, 1, 0],
        ]
    )
    # ex0: all differ -> the newest's 4; ex1: 0 and 1 tie (2 each), newest voted 2 (not tied), next newest 0 -> 0
    # ex2: 0 and 1 tie, newest tied voter is member 3 with 1; ex3: 2 and 1 tie, newest voted 1 -> 1; ex4: 1 has 3
    assert ens.ensemble_majority(list(votes)).tolist() == [4, 0, 1, 1, 1]
    assert ens.ensemble_majority([np.array([3, 1])]).tolist() == [3, 1]
    with pytest.raises(ens.ScoresError, match="non-negative"):
        ens.ensemble_majority([np.array([0, -1])])


def test_windows_of_consecutive_members():
    assert ens.windows(["a", "b", "c", "d"], 2) == [["a", "b"], ["b", "c"], ["c", "d"]]
    assert ens.windows(["a", "b", "c"], 3) == [["a", "b", "c"]]
    assert ens.windows(["a", "b"], 1) == [["a"], ["b"]]
    for k in (0, 3):
        with pytest.raises(RecipeError, match=f"--ensemble {k}"):
            ens.windows(["a", "b"], k)


def test_minimal_pairs_cloze_and_perplexity_by_hand():
    # ties count as correct, as lm-eval's argmax over [good, bad] with gold 0 does
    assert ens.minimal_pairs_accuracy([-1.0, -5.0, -2.0, -3.0], [-2.0, -4.0, -2.0, -3.5]) == 0.75
    assert ens.cloze_accuracy([True, False, True, True]) == 0.75
    assert ens.cloze_perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    texts = ["The cat sat.", "  Un été à Paris\n", "x"]
    words = [ens.count_words(t) for t in texts]
    nbytes = [ens.count_bytes(t) for t in texts]
    assert words == [len(re.split(r"\s+", t)) for t in texts] == [3, 6, 1]
    assert nbytes == [12, 20, 1]  # é and à take two bytes each
    lp = [-20.0, -30.0, -4.0]
    got = ens.perplexities(lp, words, nbytes)
    assert got["word_perplexity"] == pytest.approx(math.exp(54.0 / 10))
    assert got["byte_perplexity"] == pytest.approx(math.exp(54.0 / 33))
    assert got["bits_per_byte"] == pytest.approx(54.0 / 33 / math.log(2))
