"""Perplexity of texts from their rolling log-likelihoods, weighted as lm-evaluation-harness does.

Inputs, one entry per text: ``logprobs`` (total log-probability of the text under rolling windows),
``words`` (``len(re.split(r"\\s+", text))``) and ``bytes`` (UTF-8 length); ``hubmerge.results.scores.count_words``
and ``count_bytes`` compute them. Corpus-level: word and byte perplexity ``exp(-sum(logprobs) / sum(weights))``
and ``bits_per_byte = -sum(logprobs) / sum(bytes) / ln 2``.
"""

import datasets
import evaluate

from hubmerge.results.scores import perplexities

_KWARGS = """
Args:
    logprobs (list of float): each text's total log-probability.
    words (list of int): each text's word count.
    bytes (list of int): each text's length in UTF-8 bytes.
Returns:
    word_perplexity, byte_perplexity, bits_per_byte.
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {
                    "logprobs": datasets.Value("float64"),
                    "words": datasets.Value("int64"),
                    "bytes": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, logprobs, words, bytes):  # the input is called "bytes", as users pass it
        return perplexities(logprobs, words, bytes)
