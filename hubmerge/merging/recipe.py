"""Merge recipes: YAML files validated by pydantic models that reject unknown keys, parsed once.

A recipe file is read and validated exactly once, into a :class:`RecipeDocument` (the validated
:class:`Recipe`, the mapping as the user wrote it, the file's name and text). That object flows from the CLI
through the workflow to the plan, and ``hubmerge.json`` records its mapping: a recipe edited while a long merge
runs changes nothing that merge does, evaluates or pushes.

Relative paths in a recipe are resolved against the current working directory, as with mergekit and
most command-line tools; ``hubmerge demo`` writes absolute paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hubmerge.errors import InvalidValueError, RecipeError
from hubmerge.hub.revisions import Selector
from hubmerge.io.config import parse_yaml, read_text, validate
from hubmerge.io.sizes import parse_size
from hubmerge.merging.methods import METHOD_NAMES, normalised_weights


def check_shares(shares: list[float], what: str) -> None:
    """Refuse weights that cannot be normalised: negative, NaN, infinite, all zero, or summing to infinity."""
    try:
        normalised_weights(shares)
    except InvalidValueError:
        raise ValueError(
            f"{what} must be finite, non-negative and not all zero, with a finite sum (got {shares})"
        ) from None


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
    ``fetch`` says how the weights are read: ``cache`` (pulled into the HF cache first) or ``stream``.
    """

    repo: str = Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")
    revisions: list[str] | None = Field(default=None, min_length=1)
    select: Selector | None = None
    on_anomaly: Literal["refuse", "drop_duplicates", "skip"] = "refuse"
    # cache: pull every revision into the HF cache, then merge from disk. stream: read the weights by HTTP range
    # requests as the merge consumes them; nothing but the output is written (see hubmerge.hub.stream).
    fetch: Literal["cache", "stream"] = "cache"
    # fetch: stream: HTTP connections reading ranges at once (more hide a slow link's latency; on a fast local
    # link two or three are fastest, as every byte also passes through Python).
    connections: int = Field(default=4, ge=1, le=64)

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
    lm_eval_include: str | list[str] | None = None  # folders of lm-eval task YAMLs, for lm_eval:NAME tasks
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

    @property
    def include_list(self) -> list[str]:
        inc = self.lm_eval_include
        return [inc] if isinstance(inc, str) else list(inc or [])

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
    # method 'weighted': one list of shares per averaged window size (oldest position first).
    weights: dict[int, list[float]] | None = None

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("window sizes must be at least 1")
        return sorted(set(v))

    @model_validator(mode="after")
    def _weights_per_size(self) -> SweepConfig:
        if self.weights is None:
            return self
        averaged = [w for w in self.sizes if w > 1]
        extra = sorted(set(self.weights) - set(averaged))
        if extra:
            raise ValueError(f"'weights' gives shares for window size {extra[0]}, which 'sizes' does not average")
        for size, shares in sorted(self.weights.items()):
            if len(shares) != size:
                raise ValueError(f"'weights' for window size {size} has {len(shares)} shares; give {size}")
            check_shares(shares, f"'weights' for window size {size}")
        return self


class Recipe(_Strict):
    """A merge: which checkpoints, how to weight them, and where the result goes."""

    name: str = Field(min_length=1)
    sources: list[LocalSource] | HubSources
    method: Literal[METHOD_NAMES] = "uniform"  # type: ignore[valid-type]
    weights: list[float] | None = None
    ema: EmaConfig | None = None
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    # NaN or Inf in a source, or a float16 cast that overflows: refuse (exit 3, naming source, tensor, count)
    # or warn (write it, say so, and record the counts in hubmerge.json).
    nonfinite: Literal["refuse", "warn"] = "refuse"
    # Local folders: the same weights listed twice (a folder, or a copy of it) refuse | drop_duplicates | skip.
    # Hub sources say it as sources.on_anomaly, beside the rest of their integrity check.
    on_anomaly: Literal["refuse", "drop_duplicates", "skip"] = "refuse"
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
        if isinstance(self.sources, HubSources) and "on_anomaly" in self.model_fields_set:
            raise ValueError("'on_anomaly' of a Hub recipe goes under 'sources' (sources.on_anomaly)")
        sweep_weights = self.sweep.weights if self.sweep is not None else None
        if self.method == "weighted" and self.sweep is not None:
            if self.weights is not None:
                raise ValueError(
                    "'weights' gives one share per source, but a sweep averages windows of several sizes: "
                    "give 'sweep.weights: {size: [shares...]}' for each window size instead"
                )
            missing = [w for w in self.sweep.sizes if w > 1 and w not in (sweep_weights or {})]
            if missing:
                raise ValueError(
                    f"'sweep.weights' needs the shares of window size {missing[0]} (method 'weighted' in a sweep "
                    "weights each window size separately)"
                )
        elif self.method == "weighted":
            if self.weights is None:
                raise ValueError("method 'weighted' needs 'weights', one per source")
            n = self.source_count
            if n is not None and len(self.weights) != n:
                raise ValueError(f"'weights' has {len(self.weights)} entries but there are {n} sources")
            check_shares(self.weights, "'weights'")
        elif self.weights is not None:
            raise ValueError(f"'weights' is only used with method 'weighted' (method is '{self.method}')")
        if sweep_weights is not None and self.method != "weighted":
            raise ValueError(f"'sweep.weights' is only used with method 'weighted' (method is '{self.method}')")
        if self.method == "ema" and self.ema is None:
            raise ValueError("method 'ema' needs 'ema: {decay: ...}'")
        if self.method != "ema" and self.ema is not None:
            raise ValueError(f"'ema' is only used with method 'ema' (method is '{self.method}')")
        return self

    @property
    def decay(self) -> float | None:
        return self.ema.decay if self.ema is not None else None


def _union_branch(label: Any) -> type | None:
    """The input type a pydantic union-branch label in an error location stands for."""
    if not isinstance(label, str):
        return None
    return dict if "HubSources" in label else list if label.startswith("list[") else None


SOURCES_HINT = (
    "field 'sources': must be a list of local folders ([{path: ...}]) or a Hub repo "
    "({repo: owner/name, select: {...}} or {repo: ..., revisions: [...]})"
)


def parse_recipe(data: Any, where: str = "<recipe>") -> Recipe:
    """Validate an already-parsed mapping; ``where`` names it in error messages."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping with 'name', 'sources' and 'output'", path=where)
    sources = data.get("sources")

    def keep(e: dict[str, Any]) -> bool:
        """Only the errors of the union branch the user wrote (a list of folders, or a Hub mapping)."""
        loc = list(e["loc"])
        if len(loc) > 1 and loc[0] == "sources" and (branch := _union_branch(loc[1])) is not None:
            return isinstance(sources, branch)
        return not (loc == ["sources"] and e["type"] in ("list_type", "model_type", "dict_type"))

    return validate(
        Recipe,
        data,
        where=where,
        what="recipe",
        reference="recipe reference",
        keep=keep,
        labels=("HubSources",),
        fallback=SOURCES_HINT,
    )


@dataclass(frozen=True)
class RecipeDocument:
    """A recipe as read once: the validated :class:`Recipe`, the mapping the user wrote, and where it came from.

    ``raw`` is what ``hubmerge.json`` records (verbatim, so a card can show the recipe as written); ``text`` is
    the file's content when it came from a file. Nothing downstream reads the file again.
    """

    recipe: Recipe
    raw: dict[str, Any]
    where: str = "<recipe>"
    text: str | None = None

    @classmethod
    def from_data(cls, data: Any, where: str = "<recipe>") -> RecipeDocument:
        return cls(parse_recipe(data, where), data, where)

    @property
    def file(self) -> str | None:
        """The recipe file's name as given, when the recipe came from a file."""
        return self.where if self.text is not None else None

    @property
    def is_hub(self) -> bool:
        return isinstance(self.recipe.sources, HubSources)

    def local_sources(self) -> list[Path]:
        """Resolve every local source, refusing a missing folder by its field, before anything is read."""
        if not isinstance(self.recipe.sources, list):
            raise RecipeError(f"{self.where}: field 'sources': a Hub repo, not local folders", path=self.where)
        resolved = []
        for i, src in enumerate(self.recipe.sources):
            p = Path(src.path).expanduser()
            field = f"sources.{i}.path"
            if not p.exists():
                raise RecipeError(f"{self.where}: field '{field}': {src.path!r} does not exist", field=field)
            if not p.is_dir():
                raise RecipeError(f"{self.where}: field '{field}': {src.path!r} is not a folder", field=field)
            resolved.append(p.resolve())
        self.check_output(resolved)
        return resolved

    def check_output(self, sources: list[Path]) -> None:
        """The output must not be, contain or sit inside a source folder."""
        out = Path(self.recipe.output.path).expanduser().resolve()
        for i, p in enumerate(sources):
            if out == p or p in out.parents or out in p.parents:
                raise RecipeError(
                    f"{self.where}: field 'output.path': {self.recipe.output.path!r} overlaps source {i} ({p}); "
                    "write the merge somewhere else",
                    field="output.path",
                )


def load_recipe(path: str | Path) -> RecipeDocument:
    """Read and validate a recipe file, once; a bad file is a :class:`RecipeError` naming it and the field."""
    where = str(path)
    text = read_text(path, "recipe")
    data = parse_yaml(text, where)
    return RecipeDocument(parse_recipe(data, where), data, where, text)
