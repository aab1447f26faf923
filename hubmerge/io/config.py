"""YAML configuration (recipes, selectors, task definitions) into validated pydantic models, with one-line errors.

One home for what every config file needs: reading the file, parsing YAML with the line and column of a syntax
error, and turning pydantic's list of errors into one line that names each field (``field 'output.path':
required field is missing``), suggests the spelling of an unknown key, and hides pydantic's union bookkeeping.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hubmerge.errors import RecipeError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound="BaseModel")

# Location parts pydantic adds for union branches and constrained types, not keys a user wrote.
_UNION_LABEL = re.compile(r"^(?:literal\[|list\[|dict\[|tuple\[|str$|int$|float$|bool$|function-|constrained-)")


def read_text(path: str | Path, what: str) -> str:
    """A config file's text; a missing or unreadable file is a :class:`RecipeError` naming it."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: {what} file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RecipeError(f"{path}: cannot read {what} ({reason})", path=path) from None


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with a syntax error reported as ``WHERE: line L, column C: not valid YAML: ...``."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}:{at} not valid YAML: {problem}", path=where) from None


def _known_fields(model: type[BaseModel] | None, loc: list[Any]) -> list[str]:
    """Field names of the (nested) pydantic model a location points into, for spelling hints."""
    fields: dict[str, Any] = getattr(model, "model_fields", {})
    for part in loc[:-1]:
        if isinstance(part, int) or part not in fields:
            return []
        annotation = fields[part].annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")]
        if not nested:
            return []
        fields = nested[0].model_fields
    return list(fields)


def describe_validation_error(
    err: ValidationError,
    *,
    where: str,
    what: str,
    reference: str,
    model: type[BaseModel] | None = None,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    labels: Collection[str] = (),
    fallback: str | None = None,
) -> str:
    """One line for a pydantic ``ValidationError``: ``WHERE: invalid WHAT: field 'a.b': message; ...``.

    ``model`` (the validated class) lets an unknown key suggest the nearest known one. ``keep`` drops errors of
    union branches the user did not write; ``labels`` names more union branches to leave out of locations. A
    cross-field check (no location) is filed under the field its message starts with (``'weights' has ...``,
    ``method 'ema' needs ...``). ``fallback`` is the line given when every error was dropped.
    """
    parts = []
    for e in err.errors():
        if keep is not None and not keep(e):
            continue
        loc = [p for p in e["loc"] if not (isinstance(p, str) and (_UNION_LABEL.match(p) or p in labels))]
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if not loc:
            named = re.match(r"(?:method )?'([\w.]+)'", msg)
            if named:
                loc = ["method" if named.group(0).startswith("method") else named.group(1)]
        name = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _known_fields(model, loc), n=1) if model else []
            hint = f"did you mean '{close[0]}'? " if close else ""
            msg = f"unknown key ({hint}check its spelling; see the {reference} in the README)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif not e["type"].startswith("value_error") and "got " not in msg and _scalar(e.get("input")):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"field '{name}': {msg}" if name else msg)
    if not parts and fallback:
        parts.append(fallback)
    return f"{where}: invalid {what}: " + "; ".join(dict.fromkeys(parts))


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def validate(model: type[M], data: Any, *, where: str, what: str, reference: str, **options: Any) -> M:
    """``model.model_validate(data)``, a failure becoming one :class:`RecipeError` line."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as e:
        message = describe_validation_error(e, where=where, what=what, reference=reference, model=model, **options)
        raise RecipeError(message, path=where) from None
