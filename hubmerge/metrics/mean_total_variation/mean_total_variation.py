"""Mean total variation (MTV) of scores along a pretraining trajectory (Nishida, Isonuma & Oda 2025).

Two input forms. Task level: ``predictions`` is the task score of each checkpoint, in training order, and
``MTV = 1/(m-1) Σ_t |s_{t+1} - s_t|``. Example level: ``predictions`` holds one row per example with its value
(correctness 0/1 or the gold choice's probability) at each checkpoint in training order, ``None`` where a
checkpoint lacks the example; MTV is averaged over the examples present at both ends of each step. One
checkpoint gives NaN (undefined); NaN values are refused. The arithmetic is :mod:`hubmerge.stability.metrics`'s.
"""

import datasets
import evaluate

from hubmerge.stability.metrics import example_mean_total_variation, from_example_rows, mean_total_variation

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
    predictions (list of float): the task score at each checkpoint, in training order; or
    predictions (list of list of float): per example, its value at each checkpoint (None: missing there).
Returns:
    mean_total_variation: the mean absolute change from one checkpoint to the next.
Example:
    >>> m = evaluate.load("hubmerge/metrics/mean_total_variation")
    >>> m.compute(predictions=[0.5, 0.75, 0.25])
    {'mean_total_variation': 0.375}
"""


class MeanTotalVariation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("float64")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
            ],
            reference_urls=["https://arxiv.org/abs/2510.04848"],
        )

    def _compute(self, predictions):
        if predictions and isinstance(predictions[0], (list, tuple)):
            values, present = from_example_rows(predictions)
            return {"mean_total_variation": example_mean_total_variation(values, present)}
        return {"mean_total_variation": mean_total_variation(predictions)}
