"""Minimal-pairs accuracy (BLiMP): the share of pairs whose good sentence is at least as likely as the bad one.

Inputs, one entry per pair: ``good`` and ``bad``, the total log-probability of each sentence. An exact tie
counts as correct, as in lm-evaluation-harness (a two-choice argmax with gold 0).
"""

import datasets
import evaluate

from hubmerge.results.scores import minimal_pairs_accuracy

_KWARGS = """
Args:
    good (list of float): log-probability of each pair's acceptable sentence.
    bad (list of float): log-probability of each pair's unacceptable sentence.
Returns:
    acc: share of pairs with good >= bad.
"""


class MinimalPairsAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"good": datasets.Value("float64"), "bad": datasets.Value("float64")}),
        )

    def _compute(self, good, bad):
        return {"acc": minimal_pairs_accuracy(good, bad)}
