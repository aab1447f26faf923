"""Every command, given bad input, answers one ``error:`` line on stderr and its documented exit code; plus the small
things a user notices in help texts and outputs (brackets, metavars, ``push --json``, ``--kind``, ensembles per
trajectory, the metrics a task defines, the demo's paths, the pull bar)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from factories import make_models, save_trajectory, write_recipe
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.errors import EXIT_HUB, EXIT_OUTPUT, EXIT_SOURCE, EXIT_USAGE

runner = CliRunner()
TEXTS = ["the cat sat on the mat .", "dogs run in the park .", "a man is here ."] * 8
PAIRS = [("the cat sat .", "the cat sit ."), ("dogs run .", "dogs runs ."), ("a man is here .", "a man are here .")]


def error_line(res, code: int) -> str:
    """The one stderr line of a failed command; no traceback, nothing on stdout, the exit code asked for."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.stdout.strip() == "", res.stdout
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny loadable models (weights and a tokenizer)."""
    return make_models(tmp_path_factory.mktemp("models"), 2, TEXTS)


@pytest.fixture
def pairs(tmp_path) -> Path:
    path = tmp_path / "my_pairs.jsonl"
    path.write_text("".join(json.dumps({"good": g, "bad": b}) + "\n" for g, b in PAIRS))
    return path


def eval_args(target: str | Path, tmp_path: Path, *more: str) -> list[str]:
    return ["eval", str(target), *more, "--results", str(tmp_path / "results"), "-q"]


# --- one line and the documented exit code, command by command --------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["merge"],
        ["merge", "r.yaml", "--no-such-flag"],
        ["merge", "r.yaml", "--threads", "many"],
        ["plan"],
        ["revisions", "--select"],
        ["check"],
        ["pull", "org/x"],  # no --select
        ["push", "only-a-folder"],
        ["eval", "x", "--tasks", "a", "--limit", "abc"],
        ["stability", "--stride", "x"],
        ["card"],
        ["sweep"],
        ["demo", "--steps", "abc"],
        ["hub", "serve"],  # no --root
        ["hub", "serve", "--root", "r", "--max-bandwidth", "0"],
        ["results", "--bogus"],
        ["results", "import"],
    ],
)
def test_a_command_line_that_does_not_parse_is_one_line_and_exit_2(args):
    line = error_line(runner.invoke(app, args), EXIT_USAGE)
    assert line.startswith("error: hubmerge") and "--help" in line


def test_missing_recipes_are_one_line(tmp_path):
    for cmd in ("merge", "plan", "sweep"):
        line = error_line(runner.invoke(app, [cmd, str(tmp_path / "missing.yaml")]), EXIT_USAGE)
        assert "missing.yaml" in line


def test_a_device_hubmerge_cannot_use_is_a_usage_error(tmp_path):
    paths = save_trajectory(tmp_path / "ckpts", 2)
    recipe = write_recipe(tmp_path / "r.yaml", paths, tmp_path / "out")
    assert "--device tpu" in error_line(runner.invoke(app, ["merge", str(recipe), "-q", "--device", "tpu"]), 2)
    assert not (tmp_path / "out").exists()
    line = error_line(runner.invoke(app, eval_args(paths[0], tmp_path, "--tasks", "piqa", "--device", "tpu")), 2)
    assert "--device tpu" in line


@pytest.mark.parametrize(
    ("cmd", "offline"),
    [(cmd, offline) for cmd in ("revisions", "check", "pull", "eval") for offline in (False, True)] + [("push", False)],
)
def test_a_repo_id_that_is_not_owner_name_is_exit_2(cmd, offline, tmp_path, hub, monkeypatch):
    """``../etc`` is refused as a usage error before any request, online and offline (it was exit 5)."""
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {
        "revisions": ["revisions", "../etc"],
        "check": ["check", "../etc"],
        "pull": ["pull", "../etc", "--select", "{last: 1}"],
        "eval": eval_args("../etc", tmp_path, "--select", "{last: 1}", "--tasks", "piqa"),
        "push": ["push", str(save_trajectory(tmp_path / "c", 1)[0]), "../etc"],
    }[cmd]
    line = error_line(runner.invoke(app, [*args, "--endpoint", hub.url]), EXIT_USAGE)
    assert "'../etc' is not a valid repo id" in line


def test_a_repo_that_is_not_found_is_exit_5_and_names_no_option_that_does_not_exist(hub):
    for args in (["revisions", "org/missing"], ["check", "org/missing"], ["pull", "org/missing", "-s", "{last: 1}"]):
        line = error_line(runner.invoke(app, [*args, "--endpoint", hub.url]), EXIT_HUB)
        assert "org/missing" in line and "repo-type" not in line and "repo_type" not in line


def test_push_of_a_missing_folder_is_exit_3(tmp_path, hub):
    res = runner.invoke(app, ["push", str(tmp_path / "missing"), "org/x", "--endpoint", hub.url])
    assert "missing: not a model folder" in error_line(res, EXIT_SOURCE)


@pytest.mark.parametrize("made", [False, True])
def test_card_of_a_folder_that_is_not_a_merge_is_exit_3(tmp_path, made):
    folder = save_trajectory(tmp_path / "c", 1)[0] if made else tmp_path / "missing"
    res = runner.invoke(app, ["card", str(folder), "--results", str(tmp_path / "results")])
    assert "no hubmerge.json" in error_line(res, EXIT_SOURCE)


def test_eval_of_a_truncated_safetensors_file_is_one_line(tmp_path, models, pairs):
    folder = tmp_path / "truncated"
    shutil.copytree(models[0], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    res = runner.invoke(
        app, eval_args(folder, tmp_path, "--tasks", "p", "--data", str(pairs), "--kind", "minimal_pairs")
    )
    line = error_line(res, EXIT_SOURCE)
    assert str(folder) in line and "weight files are complete" in line


class Payload:
    """A pickle that runs code when unpickled: torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_eval_of_a_pickle_that_holds_more_than_tensors_is_refused_unexecuted(tmp_path, models, pairs):
    folder = tmp_path / "pickled"
    shutil.copytree(models[0], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "the-pickle-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload(marker)}))
    res = runner.invoke(
        app, eval_args(folder, tmp_path, "--tasks", "p", "--data", str(pairs), "--kind", "minimal_pairs")
    )
    line = error_line(res, EXIT_SOURCE)
    assert "weights_only=True" in line and str(folder) in line
    assert not marker.exists()


def test_eval_of_a_folder_with_only_a_pkl_is_exit_3(tmp_path, pairs):
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps({"a": 1}))
    res = runner.invoke(
        app, eval_args(folder, tmp_path, "--tasks", "p", "--data", str(pairs), "--kind", "minimal_pairs")
    )
    assert "not a model folder" in error_line(res, EXIT_SOURCE)


def test_an_error_message_with_line_breaks_is_still_one_line(tmp_path):
    """A message carrying a library's multi-line text is folded onto one line."""
    from hubmerge.cli.app import command
    from hubmerge.errors import SourceError

    @command
    def boom() -> None:
        raise SourceError("first\n(1) second\n\n(2) third")

    import typer

    one = typer.Typer()
    one.command()(boom)
    res = runner.invoke(one, [])
    assert error_line(res, EXIT_SOURCE) == "error: first (1) second (2) third"


def test_the_demo_refusing_a_foreign_folder_is_one_line(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    res = runner.invoke(app, ["demo", "--out", str(tmp_path), "--steps", "10", "--save-every", "5"])
    assert "not a hubmerge demo folder" in error_line(res, EXIT_OUTPUT)


# --- help texts --------------------------------------------------------------------------------------------------


def all_commands() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    out = [[]]
    for name, cmd in root.commands.items():
        out.append([name])
        out += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return out


def test_help_texts_show_brackets_as_written_and_flags_without_a_metavar():
    res = runner.invoke(app, ["pull", "--help"])
    assert res.exit_code == 0
    assert "[step100000, step110000]" in " ".join(res.output.split())
    for args in all_commands():
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, (args, res.output)
        assert "<bool>" not in res.output, (args, res.output)


# --- push --json / -q ----------------------------------------------------------------------------------------------


def test_push_has_json_and_quiet(tmp_path, hub):
    folder = save_trajectory(tmp_path / "c", 1)[0]
    token = {"HF_TOKEN": "hf_test"}
    res = runner.invoke(app, ["push", str(folder), "me/x", "--json", "--endpoint", hub.url], env=token)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["repo"] == "me/x" and len(data["commit"]) == 40 and data["commit_url"].startswith(hub.url)
    res = runner.invoke(
        app, ["push", str(folder), "me/x", "-q", "--message", "again", "--endpoint", hub.url], env=token
    )
    assert res.exit_code == 0 and res.stdout == "", res.output


# --- your own data: --kind, or a four-line YAML --------------------------------------------------------------------


def scores_json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_eval_scores_a_custom_minimal_pairs_file_by_kind_with_acc_only(tmp_path, models, pairs):
    args = eval_args(models[0], tmp_path, "--tasks", "my_pairs", "--data", str(pairs), "--kind", "minimal_pairs")
    data = scores_json(runner.invoke(app, [*args, "--json"]))
    (score,) = data["scores"]
    assert score["task"] == "my_pairs" and score["kind"] == "minimal_pairs" and score["n"] == len(PAIRS)
    assert 0 <= score["acc"] <= 1
    assert "acc_norm" not in score and "acc_mutual_info" not in score  # lm-eval's BLiMP defines acc only


def test_eval_scores_a_custom_multiple_choice_file_by_kind(tmp_path, models):
    data_file = tmp_path / "quiz.jsonl"
    rows = [{"context": "the cat", "choices": [" sat", " park", " man"], "gold": 0}] * 3
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = eval_args(models[0], tmp_path, "--tasks", "quiz", "--data", str(data_file), "--kind", "multiple_choice")
    (score,) = scores_json(runner.invoke(app, [*args, "--json"]))["scores"]
    assert score["task"] == "quiz" and score["n"] == 3 and {"acc", "acc_norm"} <= set(score)


def test_a_four_line_task_yaml_works(tmp_path, models, pairs):
    yaml_file = tmp_path / "my_pairs.yaml"
    yaml_file.write_text(f"name: my_pairs\nkind: minimal_pairs\nsource:\n  path: {pairs.name}\n")
    (score,) = scores_json(runner.invoke(app, [*eval_args(models[0], tmp_path, "--tasks", str(yaml_file)), "--json"]))[
        "scores"
    ]
    assert score["task"] == "my_pairs" and score["n"] == len(PAIRS) and "acc_norm" not in score


@pytest.mark.parametrize(
    ("more", "fragment"),
    [
        (["--kind", "bogus"], "field 'kind'"),
        (["--kind", "multiple_choice"], None),  # the data are pairs: a line that is no multiple-choice example
        (["--kind", "minimal_pairs", "--tasks", "arc_easy"], "arc_easy is a built-in multiple_choice task"),
    ],
)
def test_bad_kinds_are_one_line(tmp_path, models, pairs, more, fragment):
    args = eval_args(models[0], tmp_path, "--tasks", "mine", "--data", str(pairs), *more)
    line = error_line(runner.invoke(app, args), EXIT_USAGE)
    assert fragment is None or fragment in line


def test_kind_needs_data(tmp_path, models):
    line = error_line(runner.invoke(app, eval_args(models[0], tmp_path, "--tasks", "m", "--kind", "cloze")), 2)
    assert "--data" in line


def test_winogrande_reports_acc_only(tmp_path, models):
    rows = [
        {"sentence": "The cat sat on the mat because _ was tired.", "option1": "the cat", "option2": "the mat",
         "answer": "1"},
        {"sentence": "The dog ran to the man because _ called.", "option1": "the dog", "option2": "the man",
         "answer": "2"},
    ]  # fmt: skip
    data_file = tmp_path / "winogrande.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = eval_args(models[0], tmp_path, "--tasks", "winogrande", "--data", str(data_file))
    (score,) = scores_json(runner.invoke(app, [*args, "--json"]))["scores"]
    assert score["task"] == "winogrande" and score["n"] == 2 and "acc" in score and "acc_norm" not in score


# --- ensembles within one trajectory -----------------------------------------------------------------------------


def test_ensembles_are_formed_within_one_trajectory(tmp_path, models, pairs, client, hub):
    from hubmerge.hub.push import push_checkpoints

    push_checkpoints("org/traj", models, client)
    local = tmp_path / "merged"
    shutil.copytree(models[0], local)
    base = ["--select", "{last: 2}", str(local), "--tasks", "p", "--data", str(pairs), "--kind", "minimal_pairs"]
    args = [*eval_args("org/traj", tmp_path, *base), "--endpoint", hub.url]
    data = scores_json(runner.invoke(app, [*args, "--ensemble", "2", "--json"]))
    assert [e["member_labels"] for e in data["ensembles"]] == [["step100", "step200"]]
    assert all("probability_norm" not in e for e in data["ensembles"])  # minimal pairs: acc only
    line = error_line(runner.invoke(app, [*args, "--ensemble", "3"]), EXIT_USAGE)
    assert "--ensemble 3" in line and "one trajectory" in line


# --- the demo's paths and the pull bar --------------------------------------------------------------------------


def test_the_demo_summary_prints_paths_whole_on_a_narrow_terminal(tmp_path, monkeypatch, capsys):
    from hubmerge.demo.pipeline import DemoConfig, run_demo

    long_path = str(tmp_path / "a-rather-long-folder-name" / "and-another-one" / "results.duckdb")

    def probe(ctx):
        ctx.summary.append(("results store", long_path))

    monkeypatch.setenv("COLUMNS", "40")
    run_demo(DemoConfig(out=tmp_path / "demo", quiet=True), stages=[("probe", probe)])
    printed = capsys.readouterr().out
    assert any(long_path in line for line in printed.splitlines()), printed


def test_the_pull_bar_reaches_its_total_when_a_blob_is_already_cached(tmp_path, client):
    """A revision whose files are another's (the cache links the blob, streaming nothing) still fills the bar."""
    from hubmerge.hub.pull import pull
    from hubmerge.hub.push import push_checkpoints
    from hubmerge.hub.revisions import list_revisions
    from hubmerge.io.progress import Display

    class Recording(Display):
        def __init__(self) -> None:
            super().__init__(quiet=True)
            self.bars: list[dict] = []

        @contextmanager
        def bytes(self, description, total):
            bar = {"total": total, "done": 0}
            self.bars.append(bar)

            class Reporter:
                def advance(self, n=1):
                    bar["done"] += n

                def update(self, **kwargs):
                    pass

            yield Reporter()

    ckpts = save_trajectory(tmp_path / "c", 2)
    twin = shutil.copytree(ckpts[-1], tmp_path / "c" / "step300")  # step300's weights are step200's
    push_checkpoints("org/t", [*ckpts, twin], client)
    revs = [r for r in list_revisions("org/t", client) if r.name != "main"]
    display = Recording()
    pull("org/t", revs[:2], client, display=display)
    display = Recording()
    pull("org/t", revs, client, display=display)
    ((bar),) = display.bars
    assert bar["done"] == bar["total"] > 0
