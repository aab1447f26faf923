"""Revisions, integrity check, pull, Hub-sourced merges and push, through the real client and the local Hub."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from factories import load_state, save_trajectory, write_recipe
from test_merge import assert_within_rounding, reference
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.errors import HubError, RevisionError
from hubmerge.hub.integrity import check
from hubmerge.hub.pull import pull
from hubmerge.hub.push import push
from hubmerge.hub.revisions import Selector, resolve_selection

runner = CliRunner()
REPO = "org/tiny-pythia"


def seed(hub_api, repo: str, folders: list[Path], names: list[str], main: Path | None = None) -> None:
    """One branch per checkpoint, like Pythia, uploaded with the client's own calls."""
    hub_api.create_repo(repo, exist_ok=True)
    hub_api.upload_folder(repo_id=repo, folder_path=main or folders[-1], commit_message="final model")
    for name, folder in zip(names, folders, strict=True):
        hub_api.create_branch(repo, branch=name)
        hub_api.upload_folder(
            repo_id=repo, folder_path=folder, revision=name, commit_message=f"checkpoint {name}", delete_patterns="*"
        )


@pytest.fixture
def trajectory(tmp_path, hub, hub_api):
    folders = save_trajectory(tmp_path / "ckpts", 5)
    names = [f"step{i * 1000}" for i in range(1, 6)]
    seed(hub_api, REPO, folders, names)
    return dict(zip(names, folders, strict=True))


def invoke(hub, *args: str):
    return runner.invoke(app, [*args, "--endpoint", hub.url], env={"HF_TOKEN": "hf_test"})


def test_revisions_lists_training_order_and_previews_selection(hub, trajectory):
    res = invoke(hub, "revisions", REPO, "--json")
    assert res.exit_code == 0, res.output
    names = [r["name"] for r in json.loads(res.output)]
    assert names == ["step1000", "step2000", "step3000", "step4000", "step5000", "main"]
    res = invoke(hub, "revisions", REPO, "--select", "{last: 2, until: step4000}", "--json")
    assert [r["name"] for r in json.loads(res.output)] == ["step3000", "step4000"]
    res = invoke(hub, "revisions", REPO, "--select", "{revisions: [step3500]}")
    assert res.exit_code == 2 and "step3500" in res.output and "step3000" in res.output


def test_unknown_repo_and_private_repo_say_how_to_log_in(hub, hub_api, trajectory):
    res = invoke(hub, "revisions", "org/nope")
    assert res.exit_code == 5 and "not found" in res.output and "hf auth login" in res.output
    hub.set_private(REPO)
    res = runner.invoke(app, ["revisions", REPO, "--endpoint", hub.url], env={"HF_TOKEN": ""})
    assert res.exit_code == 5 and "hf auth login" in res.output


def test_gated_repo_download_says_how_to_log_in(hub, trajectory, hub_api, client):
    hub.set_gated(REPO)
    revs, _ = resolve_selection(REPO, Selector(last=2), client)
    with pytest.raises(HubError, match="gated.*hf auth login"):
        pull(REPO, revs, client)


def test_pull_downloads_only_what_a_merge_needs_into_the_hf_cache(hub, trajectory, hf_cache, client):
    revs, _ = resolve_selection(REPO, Selector(last=3), client)
    refs = pull(REPO, revs, client)
    assert [r.revision for r in refs] == ["step3000", "step4000", "step5000"]
    for ref, rev in zip(refs, revs, strict=True):
        assert ref.commit == rev.commit and hf_cache in ref.path.parents
        assert ref.path.name == rev.commit  # the standard snapshots/<commit> layout
        assert (ref.path / "model.safetensors").read_bytes() == (
            trajectory[rev.name] / "model.safetensors"
        ).read_bytes()
    assert (refs[-1].path / "config.json").exists()
    assert not (refs[0].path / "config.json").exists()  # config and tokenizer once, from the newest

    # A second pull is served from the cache: only header range reads, no whole-file GET of weights.
    def weight_gets() -> int:
        return sum(1 for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors") and r.range is None)

    before = weight_gets()
    assert before == 3
    pull(REPO, revs, client)
    assert weight_gets() == before


def test_pull_checks_remote_headers_before_downloading(tmp_path, hub, hub_api, client):
    good = save_trajectory(tmp_path / "a", 2)
    odd = save_trajectory(tmp_path / "b", 1)[0]
    from safetensors.torch import load_file, save_file

    state = load_file(odd / "model.safetensors")
    state["model.norm.weight"] = torch.ones(8, dtype=torch.float16)
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    seed(hub_api, "org/odd", [*good, odd], ["step1", "step2", "step3"])
    revs, _ = resolve_selection("org/odd", Selector(last=3), client)
    with pytest.raises(Exception, match="model.norm.weight.*step3.*nothing downloaded"):
        pull("org/odd", revs, client)
    assert not any(r.method == "GET" and r.path.endswith("model.safetensors") and r.range is None for r in hub.requests)


def test_dropped_download_is_resumed_and_the_partial_file_never_used(hub, trajectory, client):
    revs, _ = resolve_selection(REPO, Selector(last=1), client)
    hub.inject_drop(REPO, "model.safetensors", after_bytes=5000, times=1)
    refs = pull(REPO, revs, client)
    assert (refs[0].path / "model.safetensors").read_bytes() == (
        trajectory["step5000"] / "model.safetensors"
    ).read_bytes()


def test_corrupted_download_is_detected_and_not_kept(hub, trajectory, hf_cache, client):
    revs, _ = resolve_selection(REPO, Selector(last=1), client)
    hub.inject_corrupt(REPO, "model.safetensors")
    with pytest.raises(HubError, match="does not match the sha256"):
        pull(REPO, revs, client)
    blobs = list(hf_cache.rglob("blobs/*"))
    sizes = {p.stat().st_size for p in blobs}
    assert (trajectory["step5000"] / "model.safetensors").stat().st_size not in sizes


def write_hub_recipe(path: Path, out: Path, sources: dict, **extra) -> Path:
    data = {"name": "hub-merge", "sources": sources, "output": {"path": str(out)}, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_merge_from_hub_equals_local_reference_and_records_commits(tmp_path, hub, trajectory, client):
    recipe = write_hub_recipe(tmp_path / "r.yaml", tmp_path / "out", {"repo": REPO, "select": {"last": 3}})
    res = invoke(hub, "merge", str(recipe), "--quiet")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    ref = reference([trajectory[n] for n in ("step3000", "step4000", "step5000")], [1 / 3] * 3)
    assert_within_rounding(load_state(out), ref, torch.float16)
    prov = json.loads((out / "hubmerge.json").read_text())
    revs, _ = resolve_selection(REPO, Selector(last=3), client)
    assert [(s["repo"], s["revision"], s["commit"]) for s in prov["sources"]] == [
        (REPO, r.name, r.commit) for r in revs
    ]
    assert prov["integrity"]["policy"] == "refuse" and prov["integrity"]["dropped"] == []


def test_hub_dry_run_downloads_no_weights(tmp_path, hub, trajectory):
    recipe = write_hub_recipe(tmp_path / "r.yaml", tmp_path / "out", {"repo": REPO, "select": {"last": 2}})
    res = invoke(hub, "merge", str(recipe), "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["kept"] == ["step4000", "step5000"] and summary["headers_checked"] == 2
    assert summary["download_bytes"] > 2 * (trajectory["step5000"] / "model.safetensors").stat().st_size
    assert not any(r.method == "GET" and r.path.endswith("model.safetensors") and r.range is None for r in hub.requests)
    assert not (tmp_path / "out").exists()


def test_offline_merge_from_the_cache(tmp_path, hub, trajectory, monkeypatch):
    recipe = write_hub_recipe(tmp_path / "r.yaml", tmp_path / "out", {"repo": REPO, "select": {"last": 2}})
    assert invoke(hub, "merge", str(recipe), "--quiet").exit_code == 0
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = runner.invoke(app, ["merge", str(recipe), "--quiet", "--force"])
    assert res.exit_code == 0, res.output
    prov = json.loads((tmp_path / "out" / "hubmerge.json").read_text())
    assert prov["integrity"]["checked"].startswith("offline")
    assert [s["revision"] for s in prov["sources"]] == ["step4000", "step5000"]


@pytest.fixture
def anomalous(tmp_path, hub, hub_api):
    """A trajectory with each anomaly the check must find."""
    folders = save_trajectory(tmp_path / "ckpts", 5, fmt="sharded")
    final = folders[-1]
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folders[1], incomplete)
    index = json.loads((incomplete / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    (incomplete / shards[-1]).unlink()
    mixed = tmp_path / "mixed"
    shutil.copytree(folders[2], mixed)
    shutil.copyfile(final / shards[0], mixed / shards[0])  # serves the final model's first shard
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    names = ["step100", "step200", "step300", "step400", "step500", "step600"]
    seed(hub_api, "org/odd", [folders[0], incomplete, mixed, final, empty, final], names, main=final)
    return names


def test_check_finds_every_anomaly(hub, anomalous, client):
    report = check(
        "org/odd",
        [r for r in resolve_selection("org/odd", Selector(since="step100"), client)[0]],
        client,
        all_revisions=resolve_selection("org/odd", Selector(last=1), client)[1],
    )
    kinds = {(f.revision, f.kind) for f in report.findings}
    assert ("step200", "incomplete") in kinds
    assert ("step300", "shared_shards") in kinds
    assert ("step400", "duplicate") in kinds  # bit-identical to main and to the final step
    assert ("step500", "no_weights") in kinds
    assert not any(r == "step600" for r, _ in kinds)  # the final step equals main: expected
    assert not any(r == "step100" for r, _ in kinds)
    res = invoke(hub, "check", "org/odd", "--json")
    assert res.exit_code == 6
    data = json.loads(res.output)
    assert {f["revision"] for f in data["findings"]} == {"step200", "step300", "step400", "step500"}


def test_merge_refuses_anomalous_window_unless_the_recipe_allows(tmp_path, hub, anomalous):
    recipe = write_hub_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        {"repo": "org/odd", "select": {"revisions": ["step100", "step400", "step600"]}},
    )
    res = invoke(hub, "merge", str(recipe), "--quiet")
    assert res.exit_code == 6 and "step400: duplicate" in res.output and "on_anomaly" in res.output
    assert not (tmp_path / "out").exists()
    recipe = write_hub_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        {
            "repo": "org/odd",
            "select": {"revisions": ["step100", "step400", "step600"]},
            "on_anomaly": "drop_duplicates",
        },
    )
    res = invoke(hub, "merge", str(recipe), "--quiet")
    assert res.exit_code == 0, res.output
    prov = json.loads((tmp_path / "out" / "hubmerge.json").read_text())
    assert [s["revision"] for s in prov["sources"]] == ["step100", "step600"]
    assert prov["integrity"]["policy"] == "drop_duplicates"
    assert [d["revision"] for d in prov["integrity"]["dropped"]] == ["step400"]


@pytest.mark.parametrize("dry_run", [False, True])
def test_hub_weights_that_sum_to_zero_once_anomalies_are_dropped_are_one_clear_line(tmp_path, hub, anomalous, dry_run):
    """The only revision with a share is dropped as a duplicate: exit 2 naming the field, nothing written."""
    recipe = write_hub_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        {
            "repo": "org/odd",
            "select": {"revisions": ["step100", "step400", "step600"]},
            "on_anomaly": "drop_duplicates",
        },
        method="weighted",
        weights=[0, 1, 0],
    )
    res = invoke(hub, "merge", str(recipe), "--quiet", *(["--dry-run"] if dry_run else []))
    assert res.exit_code == 2, res.output
    assert f"{recipe}: field 'weights'" in res.output and "sum to zero once step400 was dropped" in res.output
    errors = [line for line in res.output.splitlines() if "error" in line.lower()]
    assert "Traceback" not in res.output and len(errors) == 1 and errors[0].startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_unknown_revision_in_recipe_names_closest(tmp_path, hub, trajectory, client):
    with pytest.raises(RevisionError, match="step6000.*step5000"):
        resolve_selection(REPO, Selector(revisions=["step6000"]), client)


def test_push_creates_repo_and_branch_in_one_commit_and_never_shows_the_token(
    tmp_path, hub, hub_api, trajectory, client
):
    recipe = write_hub_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        {"repo": REPO, "select": {"last": 2}},
        method="ema",
        ema={"decay": 0.5},
    )
    assert invoke(hub, "merge", str(recipe), "--quiet").exit_code == 0
    secret = "hf_secretsecret"
    res = runner.invoke(
        app,
        ["push", str(tmp_path / "out"), "me/merged", "--branch", "ema", "--endpoint", hub.url],
        env={"HF_TOKEN": secret},
    )
    assert res.exit_code == 0, res.output
    assert "/me/merged/commit/" in res.output and secret not in res.output
    commits = hub_api.list_repo_commits("me/merged", revision="ema")
    assert commits[0].title.startswith(
        "hubmerge: hub-merge (ema of 2 checkpoints of org/tiny-pythia, step4000..step5000)"
    )
    files = {f.path for f in hub_api.list_repo_tree("me/merged", revision="ema")}
    assert {"model.safetensors", "config.json", "hubmerge.json"} <= files
    for p in (tmp_path / "out").iterdir():
        assert secret not in p.read_bytes().decode("latin-1")
    pr = push(tmp_path / "out", "me/merged", client, create_pr=True)
    assert pr.pr_url and "refs/pr/" in pr.pr_url or "discussions" in pr.pr_url


def test_recipe_output_push(tmp_path, hub, hub_api, trajectory):
    recipe = write_hub_recipe(
        tmp_path / "r.yaml",
        tmp_path / "out",
        {"repo": REPO, "select": {"last": 2}},
    )
    data = yaml.safe_load(recipe.read_text())
    data["output"]["push"] = {"repo": "me/auto", "branch": "last2"}
    recipe.write_text(yaml.safe_dump(data))
    res = invoke(hub, "merge", str(recipe), "--quiet")
    assert res.exit_code == 0, res.output
    assert hub_api.file_exists("me/auto", "hubmerge.json", revision="last2")


def test_editing_the_recipe_during_a_merge_changes_nothing_the_merge_does(
    tmp_path, hub, hub_api, trajectory, client, monkeypatch
):
    """The recipe is read once: what is pushed and recorded is the recipe as the merge read it."""
    import hubmerge.workflows.merge as workflow

    sources = [trajectory["step4000"], trajectory["step5000"]]
    recipe = write_recipe(tmp_path / "r.yaml", sources, tmp_path / "out")
    data = yaml.safe_load(recipe.read_text())
    data["output"]["push"] = {"repo": "me/as-planned"}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    original = dict(data)
    real_execute = workflow.execute

    def execute_while_editing(plan, **kwargs):
        edited = {**data, "name": "edited", "output": {**data["output"], "push": {"repo": "me/edited"}}}
        recipe.write_text(yaml.safe_dump(edited, sort_keys=False))
        return real_execute(plan, **kwargs)

    monkeypatch.setattr(workflow, "execute", execute_while_editing)
    outcome = workflow.merge_recipe(recipe, client)
    assert outcome.pushed is not None and outcome.pushed.repo == "me/as-planned"
    assert hub_api.repo_exists("me/as-planned") and not hub_api.repo_exists("me/edited")
    prov = json.loads((tmp_path / "out" / "hubmerge.json").read_text())
    assert prov["recipe"] == original and prov["name"] == "test-merge"
    assert yaml.safe_load(recipe.read_text())["name"] == "edited"  # the file did change under the merge


def test_pull_of_a_revision_the_hub_does_not_have(hub, trajectory, client):
    from hubmerge.hub.revisions import parse_revision

    with pytest.raises(RevisionError, match="revision 'step999' not found in org/tiny-pythia"):
        pull(REPO, [parse_revision("step999")], client)


def test_hub_serve_command_serves_the_client(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from huggingface_hub import HfApi

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubmerge", "hub", "serve", "--root", str(tmp_path / "store"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        api = HfApi(endpoint=f"http://127.0.0.1:{port}", token="hf_test")
        deadline = time.time() + 30
        while True:
            try:
                api.whoami()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        api.create_repo("me/served")
        api.upload_file(repo_id="me/served", path_or_fileobj=b"hello", path_in_repo="a.txt")
        assert api.file_exists("me/served", "a.txt")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (tmp_path / "store").is_dir()


def _flip_bytes_keeping_mtime(path: Path, offset: int) -> None:
    blob = path.resolve()
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    for i in range(offset, offset + 4):
        data[i] ^= 0xFF
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("where", ["tensor", "tail"])
def test_a_cached_blob_with_flipped_bytes_is_refused_by_the_merge_that_reads_it(tmp_path, hub, trajectory, where):
    """Same size, same mtime: only the bytes tell. The merge hashes each file as it reads it (exit 5, named)."""
    recipe = write_hub_recipe(tmp_path / "r.yaml", tmp_path / "out", {"repo": REPO, "select": {"last": 2}})
    assert invoke(hub, "merge", str(recipe), "--quiet").exit_code == 0
    good = (tmp_path / "out" / "model.safetensors").read_bytes()
    cached = next(p for p in Path(os.environ["HF_HUB_CACHE"]).rglob("snapshots/*/model.safetensors"))
    size = cached.stat().st_size
    _flip_bytes_keeping_mtime(cached, size // 2 if where == "tensor" else size - 4)
    res = invoke(hub, "merge", str(recipe), "--quiet", "--force")
    assert res.exit_code == 5, res.output
    assert "model.safetensors" in res.output and "does not match the sha256" in res.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == good  # the old output is untouched
    # `hubmerge pull` hashes every byte too (no size/mtime shortcut) and replaces the corrupt blob
    assert invoke(hub, "pull", REPO, "--select", "{last: 2}", "-q").exit_code == 0
    assert invoke(hub, "merge", str(recipe), "--quiet", "--force").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == good


def test_a_cached_merge_is_bit_identical_to_a_local_one(tmp_path, hub, trajectory):
    """Read in byte order so that it can be hashed in the same read, it still writes the layout a local merge does."""
    recipe = write_hub_recipe(tmp_path / "r.yaml", tmp_path / "hub-out", {"repo": REPO, "select": {"last": 3}})
    assert invoke(hub, "merge", str(recipe), "--quiet").exit_code == 0
    local = write_recipe(
        tmp_path / "l.yaml", [trajectory[n] for n in ("step3000", "step4000", "step5000")], tmp_path / "l"
    )
    assert runner.invoke(app, ["merge", str(local), "--quiet"]).exit_code == 0
    assert (tmp_path / "hub-out" / "model.safetensors").read_bytes() == (
        tmp_path / "l" / "model.safetensors"
    ).read_bytes()
