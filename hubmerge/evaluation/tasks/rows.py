"""Records to examples: data set rows (Hugging Face ``datasets`` rows, or JSONL exports of them), minimal pairs.

A task's ``fields`` say how rows map: templates that insert row fields, choices from a field or a list of
templates, the gold index from a constant, a field or a lookup, and one of lm-eval's task-specific preprocessors.
Minimal pairs need no mapping (``sentence_good``/``sentence_bad``, or ``good``/``bad``). The file readers
(:mod:`.readers`) use the same field access and pair building.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hubmerge.errors import RecipeError, TaskDataError
from hubmerge.evaluation.tasks.specs import FILTERS, TEMPLATE_FIELD, Example, Fields, Request, TaskSpec


def get_field(obj: Any, key: str, kind: type, where: str) -> Any:
    """``obj[key]`` (dotted for nested objects), checked to be of ``kind``; booleans are not integers."""
    value = obj
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TaskDataError(f"{where}: missing field '{key}'")
        value = value[part]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        want = {int: "an integer", str: "a string", list: "a list"}.get(kind, kind.__name__)
        raise TaskDataError(f"{where}: field '{key}' must be {want}, got {json.dumps(value)[:80]}")
    return value


def check_gold(gold: int, n: int, where: str) -> int:
    if not 0 <= gold < n:
        raise TaskDataError(f"{where}: gold index {gold} is out of range for {n} choices")
    return gold


def _pair(doc_id: int, good: str, bad: str, delimiter: str) -> Example:
    """A minimal pair as lm-eval's blimp sends it: empty context, the delimiter before each sentence."""
    requests = (Request(doc_id, 0, "", delimiter + good), Request(doc_id, 1, "", delimiter + bad))
    return Example(doc_id, 0, (good, bad), requests)


def pairs_from_lines(spec: TaskSpec, source: str, lines: Iterable[tuple[str, dict]]) -> list[Example]:
    uid, others, examples = spec.source.uid, set(), []
    for where, obj in lines:
        line_uid = obj.get("UID")
        if uid is not None and line_uid is not None and str(line_uid) != uid:
            others.add(str(line_uid))
            continue
        good_key, bad_key = (
            ("good", "bad") if "good" in obj and "sentence_good" not in obj else ("sentence_good", "sentence_bad")
        )
        good, bad = get_field(obj, good_key, str, where), get_field(obj, bad_key, str, where)
        examples.append(_pair(len(examples), good, bad, spec.target_delimiter))
    if not examples and others:
        raise TaskDataError(f"{source}: no pairs of paradigm {uid!r} (field UID); the data has {sorted(others)}")
    return examples


def _lookup(row: Mapping[str, Any], path: str, where: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            fields = sorted(row)[:20]
            raise TaskDataError(f"{where}: no field '{path}' in this row (its fields: {', '.join(fields)})")
    return value


def _render(template: str, row: Mapping[str, Any], where: str) -> str:
    def insert(m: re.Match) -> str:
        value = _lookup(row, m.group(1), where)
        if isinstance(value, Mapping | list | tuple):
            raise TaskDataError(f"{where}: field '{m.group(1)}' is a {type(value).__name__}; a template inserts text")
        text = str(value)
        for name in m.group(2).split("|")[1:]:
            text = FILTERS[name](text)
        return text

    return TEMPLATE_FIELD.sub(insert, template)


def _render_many(spec: str | list[str], row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if isinstance(spec, list):
        return tuple(_render(t, row, where) for t in spec)
    values = _lookup(row, spec, where)
    if not isinstance(values, list | tuple) or not values or isinstance(values[0], Mapping | list):
        raise TaskDataError(f"{where}: field '{spec}' must be a non-empty list of strings")
    return tuple(str(v) for v in values)


def _need(value: Any, field: str) -> Any:
    """A ``fields`` entry the task's kind requires (TaskSpec validation guarantees it; a hand-built spec may not)."""
    if value is None:
        raise RecipeError(
            f"task definition: field 'fields.{field}' is needed to map these rows", field=f"fields.{field}"
        )
    return value


def _gold_index(fields: Fields, row: Mapping[str, Any], where: str) -> int:
    if isinstance(fields.gold, int):
        return fields.gold
    value = _lookup(row, _need(fields.gold, "gold"), where)
    if fields.gold_in is not None:
        labels = fields.gold_in if isinstance(fields.gold_in, list) else _lookup(row, fields.gold_in, where)
        options = [str(x).strip() for x in labels] if isinstance(labels, list | tuple) else []
        if str(value).strip() not in options:
            raise TaskDataError(f"{where}: gold {value!r} (field '{fields.gold}') is not one of {options}")
        return options.index(str(value).strip())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise TaskDataError(f"{where}: gold {value!r} (field '{fields.gold}') is not a choice index; map it with 'gold_in'")


def _hellaswag(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's hellaswag process_docs: adds ``query`` and ``choices`` with WikiHow artefacts removed."""

    def clean(text: str) -> str:
        text = text.strip().replace(" [title]", ". ")
        text = re.sub(r"\[.*?\]", "", text)
        return text.replace("  ", " ")

    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        **row,
        "query": clean(row["activity_label"] + ": " + context),
        "choices": [clean(e) for e in row["endings"]],
    }


def _winogrande(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's winogrande: each option completes the sentence up to the blank (``contexts``), and what follows
    the blank is the fixed continuation (``target``)."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return {**row, "contexts": contexts, "target": sentence[blank + 1 :].strip()}


def _lambada(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's lambada_openai: the text up to its last space-separated word (``prefix``), and that word."""
    words = row["text"].split(" ")
    return {**row, "prefix": " ".join(words[:-1]), "last_word": words[-1]}


def _wikitext(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's wikitext_detokenizer on ``page`` (as ``detokenized``), undoing WikiText's tokenisation."""
    s = row["page"]
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        s = s.replace(a, b)
    for p in ":;.!?,":
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0")):
        s = s.replace(a, b)
    for a, b in ((" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return {**row, "detokenized": s}


_PREPROCESS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "lambada": _lambada,
    "wikitext": _wikitext,
}


def examples_from_rows(spec: TaskSpec, rows: Iterable[Mapping[str, Any]], where: str = "row") -> list[Example]:
    """Map data set rows (a ``datasets.Dataset``, or dicts) to examples through the task's ``fields``."""
    return from_rows(spec, ((f"{where} {i}", dict(row)) for i, row in enumerate(rows)))


def from_rows(spec: TaskSpec, rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Example]:
    if spec.kind == "minimal_pairs":
        return pairs_from_lines(spec, spec.source.hf.describe() if spec.source.hf else spec.name, rows)
    f = spec.fields
    if f is None:
        raise RecipeError(f"task {spec.name} has no 'fields' to map data set rows")
    prepare = _PREPROCESS[f.preprocess] if f.preprocess else None
    delim, examples = spec.target_delimiter, []
    for d, (where, raw) in enumerate(rows):
        row = raw
        if prepare is not None:
            try:
                row = prepare(raw)
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                raise TaskDataError(
                    f"{where}: preprocess {f.preprocess!r} cannot use this row ({type(e).__name__}: {e}); "
                    f"its fields: {', '.join(sorted(raw))}"
                ) from None
        if spec.kind == "perplexity":
            count = _render(f.count_text, row, where) if f.count_text else None
            text = _render(_need(f.text, "text"), row, where)
            examples.append(Example(d, -1, (), (), text=text, count_text=count))
        elif spec.kind == "cloze":
            context, target = _render(f.context or "", row, where), _render(_need(f.target, "target"), row, where)
            examples.append(Example(d, 0, (target,), (Request(d, 0, context, delim + target),)))
        elif f.contexts is not None:
            contexts = _render_many(f.contexts, row, where)
            target = _render(_need(f.target, "target"), row, where)
            gold = check_gold(_gold_index(f, row, where), len(contexts), where)
            requests = tuple(Request(d, i, c, delim + target) for i, c in enumerate(contexts))
            examples.append(Example(d, gold, contexts, requests))
        else:
            context = _render(f.context or "", row, where)
            choices = _render_many(_need(f.choices, "choices"), row, where)
            gold = check_gold(_gold_index(f, row, where), len(choices), where)
            requests = tuple(Request(d, i, context, delim + c) for i, c in enumerate(choices))
            examples.append(Example(d, gold, choices, requests))
    return examples
