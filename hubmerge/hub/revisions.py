"""Checkpoint branches: parse their names, put them in training order, select some of them.

Public pretraining runs publish intermediate checkpoints as branches whose names encode the step,
sometimes the token count and the training stage. Averaging *neighbouring* checkpoints needs them in
training order, which is neither the Hub's listing order nor alphabetical (``step10000`` sorts before
``step2``). Everything here except :func:`list_revisions` is pure, and the module imports no
torch/transformers/huggingface_hub so that ``hubmerge revisions`` starts fast.

Understood names:

- Pythia: ``step0``, ``step1`` ... ``step143000``;
- OLMo: ``step1000-tokens4B`` (token units K, M, B, T; decimals allowed);
- OLMo 2: ``stage1-step1000-tokens5B``, ``stage2-ingredient2-step11931-tokens50B``. Each stage and
  ingredient is its own trajectory: ingredients all start from the end of stage 1, so their steps
  are not one sequence. Early OLMo 2 branches that lack ``stage1-`` join stage 1 when the repo has
  stage-1 branches (:func:`sort_revisions` does that).

Anything else is kept, sorted by name after the training steps, and flagged. ``main`` is listed last
and never treated as a step: on Pythia it duplicates the final step, elsewhere it may be anything.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hubmerge.errors import HubError, RecipeError, RepoIdError, RevisionError
from hubmerge.io.config import parse_yaml, validate

if TYPE_CHECKING:
    from hubmerge.hub.client import HubClient

Kind = Literal["pythia", "olmo", "olmo2", "other", "main"]

_TOKENS = r"(?:-tokens(?P<tokens>\d+(?:\.\d+)?)(?P<unit>[KMBTkmbt]?))"
_PYTHIA = re.compile(r"step(?P<step>\d+)")
_OLMO = re.compile(r"step(?P<step>\d+)" + _TOKENS)
# The part after the stage ("ingredient2") is kept general: a label without hyphens.
_OLMO2 = re.compile(r"(?P<stage>stage\d+)(?:-(?P<part>[A-Za-z][A-Za-z0-9_]*))?-step(?P<step>\d+)" + _TOKENS + "?")
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


@dataclass(frozen=True)
class Revision:
    """One branch of a checkpoint repo, with what its name says about its place in training.

    ``trajectory`` groups branches whose steps form one sequence: ``""`` for single-run repos
    (Pythia, OLMo), ``"stage1"`` or ``"stage2-ingredient2"`` for OLMo 2. ``step`` is None for
    ``main`` and for names hubmerge does not understand; those are never selected implicitly.
    """

    name: str
    trajectory: str = ""
    stage: str | None = None
    step: int | None = None
    tokens: int | None = None
    commit: str | None = None
    kind: Kind = "other"


def _parse_tokens(number: str | None, unit: str | None) -> int | None:
    if number is None:
        return None
    # Decimal, not float: "4.1B" must give exactly 4_100_000_000.
    return int(Decimal(number) * _UNITS[(unit or "").upper()])


def parse_revision(name: str, commit: str | None = None) -> Revision:
    """Parse one branch name; names that match no known scheme come back as kind ``"other"``."""
    if name == "main":
        return Revision(name, commit=commit, kind="main")
    if m := _PYTHIA.fullmatch(name):
        return Revision(name, step=int(m["step"]), commit=commit, kind="pythia")
    if m := _OLMO.fullmatch(name):
        tokens = _parse_tokens(m["tokens"], m["unit"])
        return Revision(name, step=int(m["step"]), tokens=tokens, commit=commit, kind="olmo")
    if m := _OLMO2.fullmatch(name):
        stage = m["stage"]
        trajectory = f"{stage}-{m['part']}" if m["part"] else stage
        tokens = _parse_tokens(m["tokens"], m["unit"])
        return Revision(name, trajectory, stage, int(m["step"]), tokens, commit, "olmo2")
    return Revision(name, commit=commit, kind="other")


def _natural(text: str) -> tuple[tuple[int, Any], ...]:
    """Sort key comparing digit runs as numbers, so ``ingredient10`` follows ``ingredient9``."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", text) if t)


def _trajectory_key(trajectory: str) -> tuple[Any, ...]:
    if not trajectory:
        return (0,)
    if m := re.fullmatch(r"stage(\d+)(?:-(.*))?", trajectory):
        # A bare stage precedes its ingredients: stage2 < stage2-ingredient1.
        return (1, int(m[1]), _natural(m[2] or ""))
    return (2, _natural(trajectory))


def _order_key(rev: Revision) -> tuple[Any, ...]:
    if rev.kind == "main":
        return (2,)
    if rev.step is None:
        return (1, _natural(rev.name), rev.name)
    return (0, _trajectory_key(rev.trajectory), rev.step, rev.tokens or 0, rev.name)


def _resolve_trajectories(revs: list[Revision]) -> list[Revision]:
    """Move prefix-less OLMo-style branches into stage 1 when the repo has stage-1 branches.

    Early OLMo 2 checkpoints were published as ``stepN-tokensXB``; without this they would form a
    separate trajectory and make every OLMo 2 selection ambiguous.
    """
    if not any(r.kind == "olmo2" and r.trajectory == "stage1" for r in revs):
        return revs
    return [replace(r, trajectory="stage1", stage="stage1", kind="olmo2") if r.kind == "olmo" else r for r in revs]


def sort_revisions(revs: Iterable[Revision]) -> list[Revision]:
    """Training order: trajectory by trajectory (stage1, stage2-ingredient1, ...), each by step;
    then names not understood, by name; ``main`` last.

    Also joins prefix-less early OLMo 2 branches to stage 1 (see :func:`_resolve_trajectories`), so
    the result may hold updated copies of the input revisions.
    """
    return sorted(_resolve_trajectories(list(revs)), key=_order_key)


def parse_revisions(names: Iterable[str | tuple[str, str | None]]) -> list[Revision]:
    """Parse branch names (or ``(name, commit)`` pairs) and return them in training order."""
    parsed = [parse_revision(n) if isinstance(n, str) else parse_revision(*n) for n in names]
    return sort_revisions(parsed)


# --------------------------------------------------------------------------------------------------
# Selection

_Count = Annotated[int, Field(strict=True, ge=1)]
_Name = Annotated[str, Field(min_length=1)]


class Selector(BaseModel):
    """Which revisions of a repo a recipe uses: an explicit list, or a window over one trajectory.

    The window is applied in this order: trajectory, since/until (or range, all inclusive), every
    (keep steps divisible by it), then first/last N. ``{last: 5, until: step143000, every: 1000}``
    is step139000 ... step143000.
    """

    model_config = ConfigDict(extra="forbid")

    last: _Count | None = None
    first: _Count | None = None
    until: _Name | None = None
    since: _Name | None = None
    every: _Count | None = None
    range: tuple[_Name, _Name] | None = None
    revisions: list[_Name] | None = None
    trajectory: str | None = None

    @model_validator(mode="after")
    def _check_combination(self) -> Selector:
        given = [f for f in type(self).model_fields if getattr(self, f) is not None]
        if not given:
            raise ValueError(
                "empty selector: give 'revisions: [...]', or a window such as "
                "'{last: 5, every: 1000}' or '{range: [step100000, step110000]}'"
            )
        if self.revisions is not None:
            others = [f for f in given if f != "revisions"]
            if others:
                raise ValueError(
                    f"'revisions' lists revisions explicitly and cannot be combined with {', '.join(others)}"
                )
            if not self.revisions:
                raise ValueError("'revisions' is empty: list at least one revision")
            dups = sorted(n for n, count in Counter(self.revisions).items() if count > 1)
            if dups:
                raise ValueError(f"'revisions' lists {', '.join(map(repr, dups))} more than once")
        if self.range is not None and (self.since is not None or self.until is not None):
            raise ValueError("'range' already sets both bounds: drop 'since'/'until' or use them instead")
        if self.last is not None and self.first is not None:
            raise ValueError("'last' and 'first' are exclusive: keep one")
        return self


def selector_from_data(data: Any, *, where: str = "select") -> Selector:
    """Validate an already-loaded mapping (a recipe's ``select:``), raising :class:`RecipeError`."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: a selector must be a mapping such as '{{last: 5, every: 1000}}', "
            f"got {type(data).__name__} {data!r}"
        )
    fields = ", ".join(Selector.model_fields)
    return validate(Selector, data, where=where, what="selector", reference=f"selector reference ({fields})")


def parse_selector(text: str, *, where: str = "--select") -> Selector:
    """Parse a YAML/JSON flow mapping such as ``'{last: 5, until: step143000}'``."""
    try:
        data = parse_yaml(text, where)
    except RecipeError as e:
        raise RecipeError(
            f"{e}; write a mapping such as '{{last: 5, every: 1000}}' or '{{revisions: [step1000, step2000]}}'"
        ) from None
    return selector_from_data(data, where=where)


def closest_revisions(name: str, revs: Iterable[Revision], n: int = 3) -> list[str]:
    """Names nearest to ``name``: by step distance when it parses (same trajectory first), else by
    spelling. Nearest first."""
    ordered = sort_revisions(revs)
    target = parse_revision(name)
    stepped = [r for r in ordered if r.step is not None]
    if target.step is not None and stepped:
        pool = [r for r in stepped if r.trajectory == target.trajectory] or stepped
        pool.sort(key=lambda r: (abs(r.step - target.step), r.step))  # type: ignore[operator]
        return [r.name for r in pool[:n]]
    return difflib.get_close_matches(name, [r.name for r in ordered], n=n, cutoff=0.6)


def _in_repo(repo: str | None) -> str:
    return f" in {repo}" if repo else ""


def _unknown(names: list[str], ordered: list[Revision], repo: str | None) -> RevisionError:
    parts = []
    for name in names:
        close = closest_revisions(name, ordered)
        hint = f" (closest: {', '.join(close)})" if close else ""
        parts.append(f"{name!r}{hint}")
    listing = f"`hubmerge revisions {repo}`" if repo else "`hubmerge revisions REPO`"
    what = "revision" if len(names) == 1 else "revisions"
    return RevisionError(
        f"unknown {what}{_in_repo(repo)}: {'; '.join(parts)}. "
        f"The repo has {len(ordered)} branches; list them with {listing}."
    )


def _steps_desc(revs: list[Revision]) -> str:
    if not revs:
        return "none"
    if len(revs) == 1:
        return revs[0].name
    return f"{revs[0].name} .. {revs[-1].name}"


def _traj_label(trajectory: str) -> str:
    return repr(trajectory) if trajectory else "'' (the single run)"


def select(revs: Iterable[Revision], selector: Selector, *, repo: str | None = None) -> list[Revision]:
    """Apply ``selector`` to a repo's revisions; the result is in training order, oldest first.

    Only understood training steps are candidates for a window; ``main`` and names not understood
    can be chosen only by listing them in ``revisions``. Raises :class:`RevisionError` for unknown
    names (naming the closest), an ambiguous trajectory, an empty selection, or ``last``/``first``
    asking for more than exists. ``repo`` is only used in messages.
    """
    ordered = sort_revisions(revs)
    by_name = {r.name: r for r in ordered}

    if selector.revisions is not None:
        missing = [n for n in selector.revisions if n not in by_name]
        if missing:
            raise _unknown(missing, ordered, repo)
        wanted = set(selector.revisions)
        return [r for r in ordered if r.name in wanted]

    steps = [r for r in ordered if r.step is not None]
    if not steps:
        raise RevisionError(
            f"no branch{_in_repo(repo)} is named like a training step (stepN, stepN-tokensXB, "
            "stageK-stepN-...), so a window cannot be applied; list the revisions explicitly "
            "with 'revisions: [...]'"
        )

    # Resolve named bounds first: they must exist and be steps, and they fix the trajectory.
    bounds: dict[str, Revision] = {}
    named = {"since": selector.since, "until": selector.until}
    if selector.range is not None:
        named = {"range start": selector.range[0], "range end": selector.range[1]}
    missing = [n for n in named.values() if n is not None and n not in by_name]
    if missing:
        raise _unknown(missing, ordered, repo)
    for field, name in named.items():
        if name is None:
            continue
        rev = by_name[name]
        if rev.step is None:
            why = "is the default branch" if rev.kind == "main" else "is not named like a training step"
            raise RevisionError(
                f"{field} {name!r} {why}, so it cannot bound a window; use a step branch "
                f"(the last one is {steps[-1].name!r}) or list revisions explicitly with 'revisions: [...]'"
            )
        bounds[field] = rev

    trajectories = list(dict.fromkeys(r.trajectory for r in steps))
    bound_trajs = list(dict.fromkeys(r.trajectory for r in bounds.values()))
    if selector.trajectory is not None:
        trajectory = selector.trajectory
        if trajectory not in trajectories:
            raise RevisionError(
                f"trajectory {trajectory!r} not found{_in_repo(repo)}; it has "
                f"{', '.join(_traj_label(t) for t in trajectories)}"
            )
        for field, rev in bounds.items():
            if rev.trajectory != trajectory:
                raise RevisionError(
                    f"{field} {rev.name!r} belongs to trajectory {_traj_label(rev.trajectory)}, "
                    f"not to the selected {trajectory!r}"
                )
    elif len(bound_trajs) > 1:
        spans = ", ".join(f"{f} {r.name!r} is in {_traj_label(r.trajectory)}" for f, r in bounds.items())
        raise RevisionError(
            f"the window's bounds lie in different trajectories ({spans}); a window runs within one "
            "trajectory: choose bounds from one, or list revisions explicitly with 'revisions: [...]'"
        )
    elif bound_trajs:
        trajectory = bound_trajs[0]
    elif len(trajectories) == 1:
        trajectory = trajectories[0]
    else:
        counts = []
        for t in trajectories:
            members = [r for r in steps if r.trajectory == t]
            counts.append(f"{_traj_label(t)} ({len(members)}: {_steps_desc(members)})")
        raise RevisionError(
            f"ambiguous selection: {repo or 'the repo'} has {len(trajectories)} trajectories whose "
            f"steps are separate sequences: {'; '.join(counts)}. Add 'trajectory: NAME' to the selector, "
            "or name a revision with since/until/range."
        )

    pool = [r for r in steps if r.trajectory == trajectory]
    where = f"trajectory {trajectory!r}" if trajectory else "the repo"
    lo = bounds.get("since") or bounds.get("range start")
    hi = bounds.get("until") or bounds.get("range end")
    if lo is not None and hi is not None and lo.step > hi.step:  # type: ignore[operator]
        raise RevisionError(
            f"the window is backwards: it starts at {lo.name!r} (step {lo.step}) and ends at "
            f"{hi.name!r} (step {hi.step}); swap the bounds"
        )
    if lo is not None:
        pool = [r for r in pool if r.step >= lo.step]  # type: ignore[operator]
        where += f" from {lo.name}"
    if hi is not None:
        pool = [r for r in pool if r.step <= hi.step]  # type: ignore[operator]
        where += f" up to {hi.name}"

    if selector.every is not None:
        kept = [r for r in pool if r.step % selector.every == 0]  # type: ignore[operator]
        if not kept:
            examples = ", ".join(str(r.step) for r in pool[:5])
            raise RevisionError(
                f"empty selection: none of the {len(pool)} revisions in {where} has a step divisible by "
                f"every={selector.every} (steps are {examples}{', ...' if len(pool) > 5 else ''})"
            )
        pool = kept
        where += f" with steps divisible by {selector.every}"

    for field, count in (("last", selector.last), ("first", selector.first)):
        if count is None:
            continue
        if count > len(pool):
            raise RevisionError(
                f"{field}: {count} asks for {count} revisions, but only {len(pool)} exist in {where} "
                f"({_steps_desc(pool)})"
            )
        pool = pool[-count:] if field == "last" else pool[:count]
    return pool


# --------------------------------------------------------------------------------------------------
# The Hub, and display


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub would accept it as ``owner/name``; else a one-line usage error, before any request."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).split(":")[0].strip()
        raise RepoIdError(
            f"{repo_id!r} is not a valid repo id: give 'owner/name' (letters, digits, '-', '_', '.'), e.g. "
            f"EleutherAI/pythia-160m ({reason})",
            repo=repo_id,
        ) from None
    return repo_id


def list_revisions(repo_id: str, client: HubClient) -> list[Revision]:
    """A repo's branches, parsed, in training order; offline (``HF_HUB_OFFLINE``), those the cache knows."""
    check_repo_id(repo_id)
    if client.offline:
        return cached_revisions(repo_id)
    return sort_revisions(parse_revision(name, commit) for name, commit in client.branches(repo_id))


def cached_revisions(repo: str, cache_dir: str | Path | None = None) -> list[Revision]:
    """Branches known to the local HF cache (its ``refs/`` folder), for ``HF_HUB_OFFLINE=1``."""
    if cache_dir is None:
        from huggingface_hub import constants

        cache_dir = constants.HF_HUB_CACHE
    root = Path(cache_dir) / f"models--{repo.replace('/', '--')}" / "refs"
    if not root.is_dir():
        raise HubError(
            f"{repo} is not in the local cache ({root.parent}) and HF_HUB_OFFLINE is set; pull it online", repo=repo
        )
    refs = [
        parse_revision(p.relative_to(root).as_posix(), p.read_text().strip())
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).as_posix().startswith("refs/")
    ]
    return sort_revisions(refs)


def resolve_selection(repo: str, selector: Selector, client: HubClient) -> tuple[list[Revision], list[Revision]]:
    """(the revisions ``selector`` chooses, in training order; every revision of the repo)."""
    everything = list_revisions(repo, client)
    return select(everything, selector, repo=repo), everything


def format_tokens(tokens: int | None) -> str:
    """``4_000_000_000`` -> ``"4B"``, ``2_460_000_000_000`` -> ``"2.46T"``; None -> ``""``."""
    if tokens is None:
        return ""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if tokens >= size:
            value = tokens / size
            # Three significant digits, but never scientific notation (999.9B, 5000T).
            return (f"{value:.3g}" if value < 999.5 else f"{value:.0f}") + unit
    return str(tokens)


def revisions_notice(revs: Iterable[Revision]) -> str | None:
    """One line for the user when some branch names were not understood, else None."""
    other = [r.name for r in revs if r.kind == "other"]
    if not other:
        return None
    examples = ", ".join(repr(n) for n in other[:3]) + (", ..." if len(other) > 3 else "")
    return (
        f"{len(other)} branch name{'s' if len(other) > 1 else ''} not understood as a training step "
        f"({examples}): listed after the steps, sorted by name, and selectable only with 'revisions: [...]'"
    )


def revisions_table_rows(revs: Iterable[Revision]) -> list[dict[str, str]]:
    """Rows of strings for ``hubmerge revisions``, in the order given (sort first)."""
    rows = []
    for r in revs:
        note = ""
        if r.kind == "main":
            note = "default branch, not a step"
        elif r.kind == "other":
            note = "name not understood; sorted by name"
        rows.append(
            {
                "name": r.name,
                "stage": r.stage or "",
                "trajectory": r.trajectory,
                "step": "" if r.step is None else str(r.step),
                "tokens": format_tokens(r.tokens),
                "commit": (r.commit or "")[:7],
                "note": note,
            }
        )
    return rows
