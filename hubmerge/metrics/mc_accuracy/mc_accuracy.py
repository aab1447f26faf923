"""Multiple-choice accuracy from per-choice log-likelihoods: lm-evaluation-harness's ``acc`` and ``acc_norm``.

Inputs, one entry per example: ``predictions`` is the list of summed log-likelihoods of each answer option
(examples may have different numbers of options), ``references`` the gold option's index, ``choice_lengths``
each option's length in characters without the target delimiter (what ``acc_norm`` divides by).
The arithmetic lives in :mod:`hubmerge.results.scores`, shared with the results store.
"""

import datasets
import evaluate
import numpy as np

from hubmerge.results.scores import mc_accuracy, pad

_CITATION = """\
@software{eval-harness,
  author = {Gao, Leo and others},
  title = {A framework for few-shot language model evaluation},
  publisher = {Zenodo},
  doi = {10.5281/zenodo.5371628},
}
"""

_KWARGS = """
Args:
    predictions (list of list of float): per example, the log-likelihood of each answer option.
    references (list of int): per example, the index of the correct option.
    choice_lengths (list of list of int): per example, each option's length in characters.
Returns:
    acc: share of examples whose most likely option is the correct one.
    acc_norm: the same after dividing each log-likelihood by its option's length in characters.
Example:
    >>> m = evaluate.load("hubmerge/metrics/mc_accuracy")
    >>> m.compute(predictions=[[-1.0, -2.0]], references=[0], choice_lengths=[[1, 4]])
    {'acc': 1.0, 'acc_norm': 0.0}
"""


class McAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                    "choice_lengths": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, choice_lengths):
        return mc_accuracy(pad(predictions), pad(choice_lengths, fill=0), np.asarray(references))
