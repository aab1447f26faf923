"""Merge recipes: YAML files validated by pydantic models that reject unknown keys.

Relative paths in a recipe are resolved against the current working directory, as with mergekit and
most command-line tools; ``hubmerge demo`` writes absolute paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .revisions import Selector
from .sizes import parse_size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSource(_Strict):
    """A Hugging Face model folder on disk."""

    path: str = Field(min_length=1)


class HubSources(_Strict):
    """Revisions (branches) of one Hub repo, listed or chosen by a selector, oldest to newest.

    ``on_anomaly`` says what to do when the integrity check finds a problem in the window: ``refuse``
    (default), ``drop_duplicates`` (leave out revisions whose weights are another revision's), or
    ``skip`` (leave out every anomalous revision). The choice is recorded in ``hubmerge.json``.
    """

    repo: str = Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")
    revisions: list[str] | None = Field(default=None, min_length=1)
    select: Selector | None = None
    on_anomaly: Literal["refuse", "drop_duplicates", "skip"] = "refuse"

    @model_validator(mode="after")
    def _one_way(self) -> HubSources:
        if (self.revisions is None) == (self.select is None):
            raise ValueError("give exactly one of 'revisions' (a list of branch names) or 'select' (a selector)")
        return self

    @property
    def selector(self) -> Selector:
        return self.select or Selector(revisions=self.revisions)


class EmaConfig(_Strict):
    """Exponential moving average over the sources, oldest to newest.

    Source ``t`` of ``n`` (oldest ``t = 1``) gets weight proportional to ``decay ** (n - t)``, so the
    newest checkpoint is weighted highest and the weights sum to 1.
    """

    decay: float

    @field_validator("decay")
    @classmethod
    def _in_unit_interval(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"must be strictly between 0 and 1 (got {v})")
        return v


class PushConfig(_Strict):
    """Upload the merged folder after the merge, as ``hubmerge push`` does."""

    repo: str = Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")
    branch: str | None = None
    private: bool = False
    create_pr: bool = False
    message: str | None = None


class OutputConfig(_Strict):
    path: str = Field(min_length=1)
    max_shard_size: int | str = "5GB"
    push: PushConfig | None = None

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        parse_size(v)
        return v

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)


class EvaluateConfig(_Strict):
    """Tasks to score after a merge (the merge, its sources and their ensemble) or along a sweep."""

    tasks: list[str] | str
    data: str | dict[str, str] | None = None  # one file/folder for all tasks, or task -> file
    # First N examples of every task, or task -> N (a group's N applies to each of its paradigms).
    limit: int | dict[str, int] | None = None
    batch_size: int | None = Field(default=None, ge=1)
    results: str | None = None  # results folder; default ./hubmerge-results or HUBMERGE_RESULTS

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | dict[str, int] | None) -> int | dict[str, int] | None:
        for n in [v] if isinstance(v, int) else (v or {}).values():
            if n < 1:
                raise ValueError(f"a limit is a positive number of examples (got {n})")
        return v

    @property
    def task_list(self) -> list[str]:
        names = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks
        return [n.strip() for n in names if n.strip()]

    def limit_for(self, name: str) -> int | None:
        """The limit of task ``name`` as listed in ``tasks`` (a group name covers its paradigms)."""
        return self.limit.get(name) if isinstance(self.limit, dict) else self.limit

    @model_validator(mode="after")
    def _limits_name_tasks(self) -> EvaluateConfig:
        if isinstance(self.limit, dict):
            unknown = sorted(set(self.limit) - set(self.task_list))
            if unknown:
                raise ValueError(f"limit names {', '.join(unknown)}, not in 'tasks'; use the names listed there")
        return self


class SweepConfig(_Strict):
    """Window sizes and stride for ``hubmerge sweep``; size 1 is the raw checkpoint."""

    sizes: list[int] = Field(default=[1, 2, 4, 8], min_length=1)
    stride: int = Field(default=1, ge=1)
    keep: bool = False  # keep every window's merged folder (by default each is deleted once scored)
    max_windows_on_disk: int | None = Field(default=None, ge=1)
    # Compare every series over the same window ends (those the largest window reaches), so raw
    # checkpoints are not charged for the early steps that the long windows never cover.
    align: bool = True

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("window sizes must be at least 1")
        return sorted(set(v))


class Recipe(_Strict):
    """A merge: which checkpoints, how to weight them, and where the result goes."""

    name: str = Field(min_length=1)
    sources: list[LocalSource] | HubSources
    method: Literal["uniform", "weighted", "ema"] = "uniform"
    weights: list[float] | None = None
    ema: EmaConfig | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    output: OutputConfig
    evaluate: EvaluateConfig | None = None
    sweep: SweepConfig | None = None

    @property
    def source_count(self) -> int | None:
        """How many sources, when known before asking the Hub."""
        if isinstance(self.sources, list):
            return len(self.sources)
        sel = self.sources.selector
        return len(sel.revisions) if sel.revisions else None

    @model_validator(mode="after")
    def _method_options(self) -> Recipe:
        if isinstance(self.sources, list) and not self.sources:
            raise ValueError("'sources' is empty: list at least one checkpoint folder")
        if self.method == "weighted":
            if self.weights is None:
                raise ValueError("method 'weighted' needs 'weights', one per source")
            n = self.source_count
            if n is not None and len(self.weights) != n:
                raise ValueError(f"'weights' has {len(self.weights)} entries but there are {n} sources")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("'weights' must be non-negative and not all zero")
        elif self.weights is not None:
            raise ValueError(f"'weights' is only used with method 'weighted' (method is '{self.method}')")
        if self.method == "ema" and self.ema is None:
            raise ValueError("method 'ema' needs 'ema: {decay: ...}'")
        if self.method != "ema" and self.ema is not None:
            raise ValueError(f"'ema' is only used with method 'ema' (method is '{self.method}')")
        return self


def _union_branch(label: Any) -> type | None:
    """The input type a pydantic union-branch label in an error location stands for."""
    if not isinstance(label, str):
        return None
    return dict if "HubSources" in label else list if label.startswith("list[") else None


def _format_validation_error(err: ValidationError, where: str, data: Any = None) -> str:
    """One line: each problem as ``field 'a.b': message``, hiding pydantic's union bookkeeping."""
    sources = data.get("sources") if isinstance(data, dict) else None
    parts = []
    for e in err.errors():
        loc = list(e["loc"])
        if len(loc) > 1 and loc[0] == "sources" and (branch := _union_branch(loc[1])) is not None:
            if not isinstance(sources, branch):
                continue  # the error of the union branch the user did not write
            del loc[1]
        elif loc == ["sources"] and e["type"] in ("list_type", "model_type", "dict_type"):
            continue
        if not loc:  # a cross-field check: name the field its message starts with
            named = re.match(r"(?:method )?'([\w.]+)'", e["msg"].removeprefix("Value error, "))
            loc = ["method" if named and named.group(0).startswith("method") else named.group(1)] if named else []
        loc = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see the recipe reference in the README)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"field '{loc}': {msg}")
    if not parts:
        parts.append(
            "field 'sources': must be a list of local folders ([{path: ...}]) or a Hub repo "
            "({repo: owner/name, select: {...}} or {repo: ..., revisions: [...]})"
        )
    return f"{where}: invalid recipe: " + "; ".join(dict.fromkeys(parts))


def parse_recipe(data: Any, where: str = "<recipe>") -> Recipe:
    """Validate an already-parsed mapping; ``where`` names it in error messages."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping with 'name', 'sources' and 'output'")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e, where, data)) from None


def load_recipe(path: str | Path) -> tuple[Recipe, dict[str, Any]]:
    """Read and validate a recipe file; return the model and the raw mapping (kept verbatim for provenance)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}:{at}: not valid YAML: {problem}") from None
    return parse_recipe(data, str(path)), data


def check_local_paths(recipe: Recipe, where: str) -> list[Path]:
    """Resolve every local source, refusing a missing folder by its field, before anything is read."""
    assert isinstance(recipe.sources, list)
    resolved = []
    for i, src in enumerate(recipe.sources):
        p = Path(src.path).expanduser()
        if not p.exists():
            raise RecipeError(f"{where}: field 'sources.{i}.path': {src.path!r} does not exist")
        if not p.is_dir():
            raise RecipeError(f"{where}: field 'sources.{i}.path': {src.path!r} is not a folder")
        resolved.append(p.resolve())
    check_output_path(recipe, where, resolved)
    return resolved


def check_output_path(recipe: Recipe, where: str, sources: list[Path]) -> None:
    """The output must not be, contain or sit inside a source folder."""
    out = Path(recipe.output.path).expanduser().resolve()
    for i, p in enumerate(sources):
        if out == p or p in out.parents or out in p.parents:
            raise RecipeError(
                f"{where}: field 'output.path': {recipe.output.path!r} overlaps source {i} ({p}); "
                "write the merge somewhere else"
            )
