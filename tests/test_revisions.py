"""Branch-name parsing, training order and revision selection (hubmerge/revisions.py)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from pydantic import ValidationError

from hubmerge.errors import HubmergeError, RecipeError, RevisionError
from hubmerge.hub.revisions import (
    Revision,
    Selector,
    closest_revisions,
    format_tokens,
    parse_revision,
    parse_revisions,
    parse_selector,
    revisions_notice,
    revisions_table_rows,
    select,
    selector_from_data,
    sort_revisions,
)

# The real Pythia grid: step0, the log-spaced steps 1..512, then every 1000 steps to 143000.
PYTHIA_STEPS = [0] + [2**i for i in range(10)] + list(range(1000, 143001, 1000))
PYTHIA_NAMES = [f"step{s}" for s in PYTHIA_STEPS]
PYTHIA_REPO = "EleutherAI/pythia-160m"

OLMO_NAMES = [f"step{s}-tokens{s * 4 // 1000}B" for s in range(1000, 10001, 1000)] + [
    "step556000-tokens2460B",
]

# OLMo 2 as published: stage 1, a few early branches without the "stage1-" prefix, and
# stage-2 ingredients that each restart from the end of stage 1.
OLMO2_NAMES = (
    ["step1000-tokens5B", "step2000-tokens9B"]
    + [f"stage1-step{s}-tokens{s // 200}B" for s in range(3000, 8001, 1000)]
    + [f"stage2-ingredient{k}-step{s}-tokens{s // 250}B" for k in (1, 2, 3) for s in (1000, 2000, 11931)]
    + ["main"]
)


def pythia() -> list[Revision]:
    names = ["main", *PYTHIA_NAMES]
    random.Random(0).shuffle(names)  # the Hub's listing order is not training order
    return [parse_revision(n, commit=f"{i:040x}") for i, n in enumerate(names)]


def olmo2() -> list[Revision]:
    names = list(OLMO2_NAMES)
    random.Random(1).shuffle(names)
    return [parse_revision(n) for n in names]


def names(revs: list[Revision]) -> list[str]:
    return [r.name for r in revs]


def sel(revs: list[Revision], text: str, repo: str | None = PYTHIA_REPO) -> list[str]:
    return names(select(revs, parse_selector(text), repo=repo))


# ---------------------------------------------------------------------------------------------
# parse_revision


def test_pythia_grid_parses_and_sorts_into_training_order():
    assert len(PYTHIA_NAMES) == 154
    ordered = sort_revisions(pythia())
    assert names(ordered) == [*PYTHIA_NAMES, "main"]
    assert [r.step for r in ordered[:-1]] == PYTHIA_STEPS
    assert {r.kind for r in ordered[:-1]} == {"pythia"}
    assert {r.trajectory for r in ordered} == {""}
    assert all(r.tokens is None and r.stage is None for r in ordered)
    main = ordered[-1]
    assert main.kind == "main" and main.step is None
    # Alphabetical order would put step10000 before step2: make sure we did not do that.
    assert names(ordered).index("step2") < names(ordered).index("step1000") < names(ordered).index("step10000")


def test_commit_is_kept():
    assert parse_revision("step1000", commit="abc123").commit == "abc123"
    assert parse_revision("main").commit is None


@pytest.mark.parametrize(
    ("name", "step", "tokens"),
    [
        ("step1000-tokens4B", 1000, 4_000_000_000),
        ("step556000-tokens2460B", 556_000, 2_460_000_000_000),
        ("step1000000-tokens4T", 1_000_000, 4_000_000_000_000),
        ("step100-tokens500M", 100, 500_000_000),
        ("step10-tokens40K", 10, 40_000),
        ("step1000-tokens4.1B", 1000, 4_100_000_000),
        ("step1000-tokens4b", 1000, 4_000_000_000),
        ("step0-tokens0B", 0, 0),
        ("step7-tokens123", 7, 123),
    ],
)
def test_olmo_names(name, step, tokens):
    rev = parse_revision(name)
    assert (rev.kind, rev.trajectory, rev.stage, rev.step, rev.tokens) == ("olmo", "", None, step, tokens)


@pytest.mark.parametrize(
    ("name", "trajectory", "stage", "step", "tokens"),
    [
        ("stage1-step1000-tokens5B", "stage1", "stage1", 1000, 5_000_000_000),
        ("stage1-step928646-tokens3896B", "stage1", "stage1", 928_646, 3_896_000_000_000),
        ("stage2-ingredient2-step11931-tokens50B", "stage2-ingredient2", "stage2", 11931, 50_000_000_000),
        ("stage2-ingredient10-step1-tokens1M", "stage2-ingredient10", "stage2", 1, 1_000_000),
        ("stage3-step5", "stage3", "stage3", 5, None),
    ],
)
def test_olmo2_names(name, trajectory, stage, step, tokens):
    rev = parse_revision(name)
    assert (rev.kind, rev.trajectory, rev.stage, rev.step, rev.tokens) == (
        "olmo2",
        trajectory,
        stage,
        step,
        tokens,
    )


@pytest.mark.parametrize(
    "name",
    [
        "step-1000",
        "stepabc",
        "Step1000",
        "v1.0",
        "step1000-tokens",
        "step1000-tokens4X",
        "stage1-step",
        "master",
        "",
    ],
)
def test_names_not_understood_are_other(name):
    rev = parse_revision(name)
    assert (rev.kind, rev.step, rev.tokens, rev.trajectory) == ("other", None, None, "")


# ---------------------------------------------------------------------------------------------
# sort_revisions


def test_olmo2_order_groups_trajectories_and_joins_prefixless_branches_to_stage1():
    ordered = sort_revisions(olmo2())
    expected = (
        ["step1000-tokens5B", "step2000-tokens9B"]
        + [f"stage1-step{s}-tokens{s // 200}B" for s in range(3000, 8001, 1000)]
        + [f"stage2-ingredient{k}-step{s}-tokens{s // 250}B" for k in (1, 2, 3) for s in (1000, 2000, 11931)]
        + ["main"]
    )
    assert names(ordered) == expected
    early = ordered[0]
    assert (early.kind, early.trajectory, early.stage, early.step) == ("olmo2", "stage1", "stage1", 1000)


def test_prefixless_branches_stay_single_run_without_stage1():
    # A plain OLMo repo has no stage1 branches: its stepN-tokensXB names are one trajectory.
    ordered = sort_revisions(parse_revision(n) for n in reversed(OLMO_NAMES))
    assert names(ordered) == OLMO_NAMES
    assert {(r.kind, r.trajectory) for r in ordered} == {("olmo", "")}


def test_ingredients_sort_numerically_and_bare_stage_precedes_ingredients():
    revs = parse_revisions(
        [
            "stage2-ingredient10-step1",
            "stage2-ingredient9-step1",
            "stage2-step5",
            "stage1-step9",
            "stage10-step1",
        ]
    )
    assert [r.trajectory for r in revs] == [
        "stage1",
        "stage2",
        "stage2-ingredient9",
        "stage2-ingredient10",
        "stage10",
    ]


def test_unparseable_names_follow_steps_sorted_by_name_and_main_is_last():
    revs = parse_revisions(["main", "zeta", "ckpt-10", "step5", "ckpt-9", "alpha", "step1"])
    assert names(revs) == ["step1", "step5", "alpha", "ckpt-9", "ckpt-10", "zeta", "main"]


def test_sort_is_independent_of_input_order():
    a = sort_revisions(olmo2())
    b = sort_revisions(reversed(olmo2()))
    assert a == b


def test_parse_revisions_accepts_name_commit_pairs():
    revs = parse_revisions([("step2", "b" * 40), ("step1", "a" * 40)])
    assert [(r.name, r.commit) for r in revs] == [("step1", "a" * 40), ("step2", "b" * 40)]


# ---------------------------------------------------------------------------------------------
# select


def test_last_until_every_on_pythia():
    assert sel(pythia(), "{last: 5, until: step143000, every: 1000}") == [
        "step139000",
        "step140000",
        "step141000",
        "step142000",
        "step143000",
    ]


def test_last_alone_never_picks_main():
    assert sel(pythia(), "{last: 2}") == ["step142000", "step143000"]


def test_until_is_inclusive_and_every_drops_the_log_spaced_steps():
    assert sel(pythia(), "{last: 3, until: step100000, every: 2000}") == [
        "step96000",
        "step98000",
        "step100000",
    ]
    # every=4 keeps 0, 4..512 and the thousands from the log-spaced start.
    assert sel(pythia(), "{first: 4, every: 4}") == ["step0", "step4", "step8", "step16"]


def test_range_is_inclusive():
    assert sel(pythia(), "{range: [step100000, step103000]}") == [
        "step100000",
        "step101000",
        "step102000",
        "step103000",
    ]
    assert sel(pythia(), "{range: [step512, step512]}") == ["step512"]


def test_since_with_first_and_with_until():
    assert sel(pythia(), "{since: step64, first: 4}") == ["step64", "step128", "step256", "step512"]
    assert sel(pythia(), "{since: step141000}") == ["step141000", "step142000", "step143000"]
    assert sel(pythia(), "{since: step1000, until: step3000}") == ["step1000", "step2000", "step3000"]


def test_explicit_revisions_come_back_in_training_order_and_may_include_main():
    picked = select(pythia(), Selector(revisions=["main", "step143000", "step0", "step2"]))
    assert names(picked) == ["step0", "step2", "step143000", "main"]
    assert all(r.commit for r in picked)


def test_explicit_revisions_are_the_only_way_to_pick_other_names():
    revs = parse_revisions(["step1", "step2", "custom-ckpt"])
    assert sel(revs, "{last: 2}") == ["step1", "step2"]
    assert sel(revs, "{revisions: [custom-ckpt, step2]}") == ["step2", "custom-ckpt"]


def test_unknown_revision_names_closest_by_step():
    with pytest.raises(RevisionError) as info:
        select(pythia(), parse_selector("{last: 3, until: step143500}"), repo=PYTHIA_REPO)
    msg = str(info.value)
    assert "'step143500'" in msg and "closest: step143000, step142000, step141000" in msg
    assert PYTHIA_REPO in msg and "hubmerge revisions" in msg
    assert closest_revisions("step143500", pythia(), n=1) == ["step143000"]
    assert closest_revisions("step3", pythia(), n=2) == ["step2", "step4"]


def test_unknown_explicit_revisions_are_all_reported():
    with pytest.raises(RevisionError) as info:
        select(pythia(), Selector(revisions=["step1500", "step2000", "mian"]))
    msg = str(info.value)
    assert "'step1500' (closest: step1000, step2000" in msg
    assert "'mian' (closest: main)" in msg
    assert "step2000'" not in msg.split("closest")[0]  # the existing name is not reported as unknown


def test_unknown_olmo_name_with_wrong_tokens_suggests_the_same_step():
    revs = [parse_revision(n) for n in OLMO_NAMES]
    with pytest.raises(RevisionError, match=r"closest: step2000-tokens8B"):
        select(revs, Selector(revisions=["step2000-tokens9B"]))


def test_unknown_name_in_other_trajectory_falls_back_to_all_steps():
    # "step11931" names no trajectory of an OLMo 2 repo; suggest the ingredients' step11931.
    close = closest_revisions("step11931", olmo2())
    assert close == [f"stage2-ingredient{k}-step11931-tokens47B" for k in (1, 2, 3)]


def test_unknown_name_without_steps_uses_spelling():
    assert closest_revisions("step1000-tokens4", parse_revisions(["step1000-tokens4B", "zzz"])) == ["step1000-tokens4B"]
    assert closest_revisions("completely-different", pythia()) == []


def test_olmo2_without_trajectory_is_ambiguous_and_names_trajectories():
    with pytest.raises(RevisionError) as info:
        select(olmo2(), Selector(last=2), repo="allenai/OLMo-2-1124-7B")
    msg = str(info.value)
    assert "ambiguous" in msg and "trajectory: NAME" in msg
    for t in ("'stage1' (8:", "'stage2-ingredient1' (3:", "'stage2-ingredient2'", "'stage2-ingredient3'"):
        assert t in msg


def test_olmo2_trajectory_selects_one_ingredient():
    assert sel(olmo2(), "{trajectory: stage2-ingredient2, last: 2}") == [
        "stage2-ingredient2-step2000-tokens8B",
        "stage2-ingredient2-step11931-tokens47B",
    ]
    # Prefix-less early branches are part of stage 1.
    assert sel(olmo2(), "{trajectory: stage1, first: 3}") == [
        "step1000-tokens5B",
        "step2000-tokens9B",
        "stage1-step3000-tokens15B",
    ]


def test_named_bound_fixes_the_trajectory():
    assert sel(olmo2(), "{until: stage2-ingredient3-step2000-tokens8B, last: 2}") == [
        "stage2-ingredient3-step1000-tokens4B",
        "stage2-ingredient3-step2000-tokens8B",
    ]


def test_unknown_trajectory_lists_the_existing_ones():
    with pytest.raises(RevisionError, match=r"'stage2-ingredient4' not found.*'stage1', 'stage2-ingredient1'"):
        select(olmo2(), Selector(trajectory="stage2-ingredient4", last=1))


def test_bound_from_another_trajectory_is_refused():
    with pytest.raises(
        RevisionError, match=r"belongs to trajectory 'stage1', not to the selected 'stage2-ingredient1'"
    ):
        select(olmo2(), Selector(trajectory="stage2-ingredient1", since="stage1-step3000-tokens15B"))
    with pytest.raises(RevisionError, match=r"different trajectories"):
        select(olmo2(), Selector(range=("stage1-step3000-tokens15B", "stage2-ingredient1-step2000-tokens8B")))


def test_last_larger_than_available_says_how_many_exist():
    with pytest.raises(RevisionError, match=r"last: 200 asks for 200 revisions, but only 154 exist"):
        select(pythia(), Selector(last=200))
    with pytest.raises(RevisionError, match=r"only 3 exist .*from step141000.*\(step141000 \.\. step143000\)"):
        select(pythia(), Selector(since="step141000", last=4))


def test_empty_selection_says_why():
    with pytest.raises(
        RevisionError,
        match=r"none of the 2 revisions .* divisible by every=5000 \(steps are 142000, 143000\)",
    ):
        select(pythia(), Selector(since="step142000", every=5000))


def test_backwards_window_and_non_step_bounds_are_refused():
    with pytest.raises(RevisionError, match="backwards"):
        select(pythia(), Selector(range=("step2000", "step1000")))
    with pytest.raises(RevisionError, match=r"'main' is the default branch.*'step143000'"):
        select(pythia(), Selector(until="main", last=2))
    revs = parse_revisions(["step1", "custom"])
    with pytest.raises(RevisionError, match=r"'custom' is not named like a training step"):
        select(revs, Selector(since="custom"))


def test_repo_without_step_names_needs_explicit_revisions():
    revs = parse_revisions(["main", "v1", "v2"])
    with pytest.raises(RevisionError, match=r"revisions: \[\.\.\.\]"):
        select(revs, Selector(last=1))
    assert sel(revs, "{revisions: [v2, main]}") == ["v2", "main"]


def test_errors_are_hubmerge_errors_with_usage_exit_codes():
    with pytest.raises(HubmergeError) as info:
        select(pythia(), Selector(last=500))
    assert info.value.exit_code == 2
    with pytest.raises(HubmergeError) as info:
        parse_selector("{lats: 5}")
    assert info.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Selector and parse_selector


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({}, "empty selector"),
        ({"revisions": ["step1"], "last": 2}, "cannot be combined with last"),
        ({"revisions": ["step1"], "trajectory": "stage1"}, "cannot be combined with trajectory"),
        ({"revisions": []}, "'revisions' is empty"),
        ({"revisions": ["step1", "step2", "step1"]}, "'step1' more than once"),
        ({"range": ["step1", "step2"], "until": "step3"}, "'range' already sets both bounds"),
        ({"last": 2, "first": 2}, "'last' and 'first' are exclusive"),
        ({"last": 0}, "greater than or equal to 1"),
        ({"every": -1000}, "greater than or equal to 1"),
        ({"last": True}, "valid integer"),
        ({"last": "5"}, "valid integer"),
        ({"until": 143000}, "valid string"),
        ({"until": ""}, "at least 1 character"),
        ({"range": ["step1"]}, "range.1"),
        ({"lats": 5}, "did you mean 'last'"),
    ],
)
def test_selector_validation(data, fragment):
    with pytest.raises(ValidationError):
        Selector.model_validate(data)
    with pytest.raises(RecipeError, match=r"^sources\.select: ") as info:
        selector_from_data(data, where="sources.select")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{last: 5}", Selector(last=5)),
        ('{"last": 5, "every": 1000}', Selector(last=5, every=1000)),
        ("{last: 5, until: step143000, every: 1000}", Selector(last=5, until="step143000", every=1000)),
        ("{range: [step100000, step110000]}", Selector(range=("step100000", "step110000"))),
        ("{revisions: [step1000, main]}", Selector(revisions=["step1000", "main"])),
        ("{trajectory: stage2-ingredient2, first: 1}", Selector(trajectory="stage2-ingredient2", first=1)),
        ("last: 3", Selector(last=3)),
    ],
)
def test_parse_selector_good(text, expected):
    assert parse_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{last: 5", "not valid YAML"),
        ("[1, 2]", "must be a mapping"),
        ("", "must be a mapping"),
        ("step1000", "must be a mapping"),
        ("{last: five}", "valid integer"),
        ("{revisions: step1000}", "valid list"),
    ],
)
def test_parse_selector_bad(text, fragment):
    with pytest.raises(RecipeError, match=r"^--select: ") as info:
        parse_selector(text)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------
# display


@pytest.mark.parametrize(
    ("tokens", "text"),
    [
        (None, ""),
        (0, "0"),
        (999, "999"),
        (40_000, "40K"),
        (500_000_000, "500M"),
        (4_000_000_000, "4B"),
        (4_100_000_000, "4.1B"),
        (50_000_000_000, "50B"),
        (999_900_000_000, "1000B"),
        (2_460_000_000_000, "2.46T"),
        (4_000_000_000_000, "4T"),
        (5_000_000_000_000_000, "5000T"),
    ],
)
def test_format_tokens(tokens, text):
    assert format_tokens(tokens) == text


def test_table_rows_and_notice():
    revs = parse_revisions(
        [
            ("stage1-step1000-tokens5B", "0123456789abcdef" * 2 + "01234567"),
            ("weird", None),
            ("main", "f" * 40),
        ]
    )
    rows = revisions_table_rows(revs)
    assert rows[0] == {
        "name": "stage1-step1000-tokens5B",
        "stage": "stage1",
        "trajectory": "stage1",
        "step": "1000",
        "tokens": "5B",
        "commit": "0123456",
        "note": "",
    }
    assert rows[1]["note"] == "name not understood; sorted by name" and rows[1]["step"] == ""
    assert rows[2]["note"] == "default branch, not a step" and rows[2]["commit"] == "fffffff"
    notice = revisions_notice(revs)
    assert notice is not None and "1 branch name" in notice and "'weird'" in notice
    assert revisions_notice(pythia()) is None


def test_import_is_light():
    code = (
        "import sys, hubmerge.hub.revisions\n"
        "heavy = {'torch', 'transformers', 'huggingface_hub', 'yaml'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
