"""Flip rate: the share of examples whose correctness changes between consecutive checkpoints.

``predictions`` holds one row per example with its correctness (0 or 1) at each checkpoint in training order,
``None`` where a checkpoint lacks the example. Flip rate is the example-level mean total variation of
correctness (Nishida, Isonuma & Oda 2025): ``1/(m-1) Σ_t mean_i |c_i(θ_{t+1}) - c_i(θ_t)|``, each step averaged
over the examples present at both of its ends. One checkpoint gives NaN; NaN values are refused.
"""

import datasets
import evaluate

from hubmerge.stability.metrics import flip_rate, from_example_rows

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
    predictions (list of list of int): per example, its correctness (0/1) at each checkpoint (None: missing).
Returns:
    flip_rate: the mean share of examples whose correctness changes from one checkpoint to the next.
Example:
    >>> m = evaluate.load("hubmerge/metrics/flip_rate")
    >>> m.compute(predictions=[[1, 0, 0], [0, 0, 1]])
    {'flip_rate': 0.5}
"""


class FlipRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            reference_urls=["https://arxiv.org/abs/2510.04848"],
        )

    def _compute(self, predictions):
        return {"flip_rate": flip_rate(*from_example_rows(predictions))}
