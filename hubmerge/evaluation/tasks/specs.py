"""What a task is: its definition (:class:`TaskSpec`, read from YAML), and the requests the scorer sees.

A task definition says what kind of evaluation it is and where its data comes from. Loading one
(:func:`hubmerge.evaluation.tasks.registry.load_task`) gives :class:`Example` objects holding the
``loglikelihood(context, continuation)`` requests lm-evaluation-harness sends for the same data, so
that predictions can be compared with lm-eval's example for example.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["multiple_choice", "minimal_pairs", "cloze", "perplexity"]
Format = Literal["olmo_requests", "blimp", "jsonl", "rows", "text"]

UNCONDITIONAL_OFFSET = 1_000_000  # OLMo-eval's uncond_docid_offset
METRICS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("acc", "acc_norm", "acc_mutual_info"),
    "minimal_pairs": ("acc",),
    "cloze": ("acc", "perplexity"),
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {**METRICS, "multiple_choice": ("acc", "acc_norm")}


# --- what the scorer sees ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One ``loglikelihood(context, continuation)`` call, strings exactly as lm-eval sends them."""

    doc_id: int
    choice: int  # answer option index; minimal pairs: 0 = sentence_good, 1 = sentence_bad
    context: str  # "" for BLiMP (the scorer conditions on the prefix token)
    continuation: str  # includes the target delimiter, e.g. " Paris"


@dataclass(frozen=True)
class Example:
    """One document: its requests in choice order and what a correct answer is.

    ``choices`` are the option strings as lm-eval's ``doc_to_choice`` gives them (no delimiter):
    their length in characters normalises ``acc_norm``. Perplexity examples have no requests, only
    ``text``; word and byte counts for perplexity are taken from ``count_text`` when it is set
    (lm-eval's wikitext counts them on the page before detokenising), else from ``text``.
    """

    doc_id: int
    gold: int  # index of the correct choice; -1 for perplexity texts
    choices: tuple[str, ...]
    requests: tuple[Request, ...]
    text: str | None = None
    count_text: str | None = None
    unconditional: tuple[Request, ...] = ()  # OLMo-eval's no-question requests, when kept
    counts: tuple[int, int] | None = None  # perplexity: (words, bytes) as the task's own code counts them


# --- task definitions ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HFDataset(_Strict):
    """A Hugging Face dataset, loaded with ``datasets.load_dataset(path, name, split=split)``."""

    path: str = Field(min_length=1)
    name: str | None = None
    split: str = Field(min_length=1)
    revision: str | None = None

    def describe(self) -> str:
        return f"hf:{self.path}" + (f"/{self.name}" if self.name else "") + f":{self.split}"


class Source(_Strict):
    """Where a task's data comes from when no ``--data`` is given, and how to read a file."""

    path: str | None = None  # a local file; relative paths are relative to the task's YAML file
    hf: HFDataset | None = None
    format: Format | None = None  # detected from the first line when omitted
    unconditional: bool = False  # request files: keep doc_id >= 1000000 lines as Example.unconditional
    documents: Literal["paragraphs", "lines", "file"] = "paragraphs"  # how a .txt file splits into texts
    uid: str | None = None  # minimal pairs: keep only lines whose UID is this (lines without UID are kept)

    @model_validator(mode="after")
    def _one_place(self) -> Source:
        if self.path is not None and self.hf is not None:
            raise ValueError("'source' takes 'path' (a local file) or 'hf' (a Hugging Face dataset), not both")
        return self


TEMPLATE_FIELD = re.compile(r"\{([A-Za-z_]\w*(?:\.\w+)*)((?:\|\w+)*)\}")
FILTERS: dict[str, Callable[[str], str]] = {
    "strip": str.strip,
    "lstrip": str.lstrip,
    "rstrip": str.rstrip,
    "lower": str.lower,
    "capitalize": str.capitalize,
}


class Fields(_Strict):
    """How a data set row becomes an example.

    Templates insert row fields: ``"Question: {question}\\nAnswer:"``, dotted paths (``{a.b}``) and
    filters (``{support|lstrip}``: strip, lstrip, rstrip, lower, capitalize); other braces are
    literal. ``choices``/``contexts`` are either one field path holding a list (``choices.text``) or a
    list of templates (``["{sol1}", "{sol2}"]``). ``gold`` is a constant index, or a field path whose
    value is an index, or, with ``gold_in``, a value looked up in a list (a field path or a literal
    list). ``preprocess`` runs one of lm-eval's task-specific functions first, adding fields.
    """

    preprocess: Literal["hellaswag", "winogrande", "lambada", "wikitext"] | None = None
    context: str | None = None
    choices: str | list[str] | None = None
    contexts: str | list[str] | None = None  # partial evaluation: each option completes the context
    target: str | None = None  # cloze target; the fixed continuation of a partial evaluation
    gold: int | str | None = None
    gold_in: str | list[str] | None = None
    text: str | None = None  # perplexity
    count_text: str | None = None  # perplexity: the text whose words and bytes are counted

    @model_validator(mode="after")
    def _known_filters(self) -> Fields:
        templates = [self.context, self.target, self.text, self.count_text]
        for many in (self.choices, self.contexts):
            if isinstance(many, list):
                templates += many
        for template in filter(None, templates):
            for m in TEMPLATE_FIELD.finditer(template):
                unknown = [f for f in m.group(2).split("|")[1:] if f not in FILTERS]
                if unknown:
                    raise ValueError(
                        f"template {template!r} uses unknown filter(s) {unknown}; known: {sorted(FILTERS)}"
                    )
        return self


class TaskSpec(_Strict):
    """A task definition, as read from YAML."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    kind: Kind
    description: str = ""
    lm_eval_task: str | None = None  # the lm-evaluation-harness task this reproduces
    metrics: list[str] | None = None  # default: DEFAULT_METRICS[kind]
    target_delimiter: str = " "  # put between context and each choice (or cloze target), as lm-eval does
    source: Source = Source()
    fields: Fields | None = None
    paradigms: list[str] | None = None  # built-in groups only: one task "<name>_<paradigm>" per entry

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(self.metrics) if self.metrics else DEFAULT_METRICS[self.kind]

    @property
    def is_group(self) -> bool:
        return self.paradigms is not None

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        bad = [m for m in self.metrics or () if m not in METRICS[self.kind]]
        if bad:
            raise ValueError(
                f"'metrics' {bad} do not apply to kind {self.kind}; choose from {list(METRICS[self.kind])}"
            )
        f = self.fields
        if f is None:
            if self.source.hf is not None and self.kind != "minimal_pairs":
                raise ValueError("'fields' is needed to map the rows of the Hugging Face dataset in 'source.hf'")
            return self
        if self.kind == "minimal_pairs":
            raise ValueError("'fields' is not used by minimal_pairs tasks: rows need sentence_good and sentence_bad")
        if self.kind == "multiple_choice":
            if f.gold is None:
                raise ValueError("'fields.gold' is needed: the index of the correct choice, or where to find it")
            if (f.choices is None) == (f.contexts is None):
                raise ValueError("'fields' takes 'choices' (options as continuations) or 'contexts' + 'target'")
            if f.contexts is not None and f.target is None:
                raise ValueError("'fields.contexts' needs 'fields.target', the continuation scored after each context")
        elif self.kind == "cloze" and f.target is None:
            raise ValueError("'fields.target' is needed for a cloze task")
        elif self.kind == "perplexity" and f.text is None:
            raise ValueError("'fields.text' is needed for a perplexity task")
        return self


@dataclass
class TaskData:
    """A loaded task: its examples (after ``limit``) and the hash of the whole data set."""

    spec: TaskSpec
    examples: list[Example]
    data_hash: str  # sha256 over every example's content (not file bytes), before limit
    source: str  # the file it came from, or "hf:path/name:split"
    n_total: int = 0  # examples in the whole data set; len(examples) is less under a limit
    doc_hashes: tuple[str, ...] | None = None  # lm-eval tasks: each example's lm-eval ``doc_hash``
    groups: tuple[str, ...] = ()  # lm-eval tasks: the lm-eval groups this task is a leaf of
    notes: tuple[str, ...] = ()  # what a user should know about how it is scored

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def requests(self) -> list[Request]:
        return [r for ex in self.examples for r in ex.requests]

    @property
    def mutual_info(self) -> bool:
        """Whether the task's ``acc_mutual_info`` is asked for and its examples carry unconditional requests."""
        return "acc_mutual_info" in self.spec.metric_names and any(ex.unconditional for ex in self.examples)


def data_hash(examples: Iterable[Example]) -> str:
    """sha256 over the examples' content, so the same requests hash alike whatever file they came from."""
    h = hashlib.sha256(b"hubmerge-task-data-v1\n")
    for ex in examples:
        record = [
            ex.doc_id,
            ex.gold,
            list(ex.choices),
            [[r.choice, r.context, r.continuation] for r in ex.requests],
            ex.text,
            ex.count_text,
            [[r.choice, r.context, r.continuation] for r in ex.unconditional],
        ]
        if ex.counts is not None:
            record.append(list(ex.counts))
        h.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
    return h.hexdigest()
