"""Target-word cloze accuracy (LAMBADA-style), as lm-evaluation-harness reports it.

Inputs, one entry per example: ``is_greedy``, whether every target token was the model's argmax, and
``logprobs``, the target's total log-probability. ``acc`` is the share of greedy targets, ``perplexity``
is ``exp(-mean(logprobs))``.
"""

import datasets
import evaluate

from hubmerge.results.scores import cloze_accuracy, cloze_perplexity

_KWARGS = """
Args:
    is_greedy (list of bool): whether greedy decoding would have produced the target.
    logprobs (list of float): the target's total log-probability given its context.
Returns:
    acc: share of examples with is_greedy.
    perplexity: exp of the negative mean log-probability of the targets.
"""


class ClozeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"is_greedy": datasets.Value("bool"), "logprobs": datasets.Value("float64")}),
        )

    def _compute(self, is_greedy, logprobs):
        return {"acc": cloze_accuracy(is_greedy), "perplexity": cloze_perplexity(logprobs)}
