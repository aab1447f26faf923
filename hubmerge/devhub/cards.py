"""The Hub's checks of a repo card's YAML metadata, for the keys hubmerge writes (``validate-yaml``)."""

from __future__ import annotations

import re
from typing import Any

_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")

_STR, _STRS, _STR_OR_STRS = "a string", "a list of strings", "a string or a list of strings"
_CARD_KEYS = {
    "license": _STR,
    "license_name": _STR,
    "license_link": _STR,
    "library_name": _STR,
    "pipeline_tag": _STR,
    "thumbnail": _STR,
    "pretty_name": _STR,
    "base_model_relation": _STR,
    "new_version": _STR,
    "tags": _STRS,
    "task_categories": _STRS,
    "size_categories": _STRS,
    "datasets": _STR_OR_STRS,
    "metrics": _STR_OR_STRS,
    "language": _STR_OR_STRS,
    "base_model": _STR_OR_STRS,
}


def _is_type(value: Any, expected: str) -> bool:
    strs = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return {_STR: isinstance(value, str), _STRS: strs, _STR_OR_STRS: isinstance(value, str) or strs}[expected]


def _model_index_errors(index: Any) -> list[str]:
    """The shape the Hub's model-index parser needs: name, results[].task.type, dataset.{type,name}, metrics[]."""
    if not isinstance(index, list) or not all(isinstance(entry, dict) for entry in index):
        return ['"model-index" must be a list of mappings with "name" and "results"']
    errors: list[str] = []
    kinds = {str: "a string", list: "a list", dict: "a mapping"}

    def need(obj: dict | None, key: str, where: str, kind: type = str) -> Any:
        """The value if it has the right type; otherwise record an error and return None."""
        if obj is None:
            return None
        if isinstance(value := obj.get(key), kind):
            return value
        errors.append(f'"{where}.{key}" must be {kinds[kind]}')
        return None

    def mappings(items: list | None, where: str) -> list[tuple[str, dict]]:
        out = [(f"{where}[{i}]", item) for i, item in enumerate(items or [])]
        errors.extend(f'"{w}" must be a mapping' for w, item in out if not isinstance(item, dict))
        return [(w, item) for w, item in out if isinstance(item, dict)]

    for i, entry in enumerate(index):
        where = f"model-index[{i}]"
        need(entry, "name", where)
        for rw, result in mappings(need(entry, "results", where, list), f"{where}.results"):
            need(need(result, "task", rw, dict), "type", f"{rw}.task")
            dataset = need(result, "dataset", rw, dict)
            need(dataset, "type", f"{rw}.dataset")
            need(dataset, "name", f"{rw}.dataset")
            for mw, metric in mappings(need(result, "metrics", rw, list), f"{rw}.metrics"):
                need(metric, "type", mw)
                if "value" not in metric:
                    errors.append(f'"{mw}.value" is required')
    return errors


def card_metadata(content: str) -> Any:
    """The YAML front matter of a repo card (None when absent); raises ``yaml.YAMLError`` when malformed."""
    import yaml

    match = _YAML_BLOCK.match(content)
    return yaml.safe_load(match.group(2)) if match else None


def validate_card(content: str) -> tuple[list[str], list[str]]:
    """Check a README's YAML metadata the way the Hub does for the keys hubmerge writes: ``(errors, warnings)``."""
    import yaml

    try:
        data = card_metadata(content)
    except yaml.YAMLError as err:
        return [f"Invalid YAML in the card metadata: {str(err).splitlines()[0]}"], []
    if data is None or data == {}:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["The card metadata must be a YAML mapping (key: value pairs)"], []
    errors = [
        f'"{key}" must be {expected}'
        for key, expected in _CARD_KEYS.items()
        if key in data and not _is_type(data[key], expected)
    ]
    if "model-index" in data:
        errors += _model_index_errors(data["model-index"])
    return errors, []
