"""Instability score (IS): the share of examples whose predicted choice changes between consecutive checkpoints.

``predictions`` holds one row per example with its predicted choice index at each checkpoint in training order,
``None`` where a checkpoint lacks the example. ``IS = 1/(m-1) Σ_t (1 - sim(pred(θ_t), pred(θ_{t+1})))`` with
sim the exact-match rate over the examples present at both ends of the step (Nishida, Isonuma & Oda 2025).
Reference-free: it needs no gold labels, and counts a switch between two wrong answers too. One checkpoint
gives NaN.
"""

import datasets
import evaluate

from hubmerge.stability.metrics import from_example_rows, instability_score

_CITATION = """\
@inproceedings{nishida2025instability,
  title = {Instability in Downstream Task Performance During {LLM} Pretraining},
  author = {Nishida, Yuto and Isonuma, Masaru and Oda, Yusuke},
  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2025},
  year = {2025},
  note = {arXiv:2510.04848},
}
"""

_KWARGS = """
Args:
    predictions (list of list of int): per example, its predicted choice at each checkpoint (None: missing).
Returns:
    instability_score: the mean share of examples whose answer changes from one checkpoint to the next.
Example:
    >>> m = evaluate.load("hubmerge/metrics/instability_score")
    >>> m.compute(predictions=[[0, 0, 1], [2, 1, 1]])
    {'instability_score': 0.5}
"""


class InstabilityScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            reference_urls=["https://arxiv.org/abs/2510.04848"],
        )

    def _compute(self, predictions):
        return {"instability_score": instability_score(*from_example_rows(predictions))}
