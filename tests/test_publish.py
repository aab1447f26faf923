"""What a push publishes and what a card says of its license: no local path leaves the machine, every command in
a card runs as written from a clone of the repo it was pushed to, and the license is the Hub's word or says why not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from factories import save_trajectory, write_recipe
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.hub.client import HubClient
from hubmerge.workflows.card import sources_license

runner = CliRunner()


def text_files(folder: Path) -> dict[str, str]:
    """Every file of a folder that decodes as text, by relative path (weights and images are left out)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and ".cache" not in p.parts:
            try:
                out[p.relative_to(folder).as_posix()] = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
    return out


def test_push_without_a_card_publishes_no_local_path_and_keeps_the_folders_own(tmp_path, hub, hub_api):
    srcs = save_trajectory(tmp_path / "traj", 3)
    out = tmp_path / "out" / "merged"
    recipe = write_recipe(tmp_path / "my-recipe.yaml", srcs, out)
    assert runner.invoke(app, ["merge", str(recipe), "-q"]).exit_code == 0
    (out / ".notes").write_text(f"private notes in {tmp_path}")
    own = (out / "hubmerge.json").read_bytes()
    assert str(tmp_path).encode() in own  # the folder keeps what later commands (`hubmerge card`) need

    res = runner.invoke(app, ["push", str(out), "me/plain", "--endpoint", hub.url, "-q"], env={"HF_TOKEN": "x"})
    assert res.exit_code == 0, res.output
    files = {f.path for f in hub_api.list_repo_tree("me/plain")}
    assert ".notes" not in files and {"hubmerge.json", "model.safetensors", "config.json"} <= files
    published = Path(hub_api.hf_hub_download("me/plain", "hubmerge.json")).read_text()
    assert str(tmp_path) not in published and "/tmp" not in published
    prov = json.loads(published)
    assert [s["path"] for s in prov["sources"]] == [
        "step100",
        "step200",
        "step300",
    ]  # not beside the folder: named only
    assert prov["recipe"]["output"]["path"] == "merged" and prov["recipe_file"] == "my-recipe.yaml"
    assert prov["files"] == json.loads(own)["files"]  # the weights' hashes are published unchanged
    assert (out / "hubmerge.json").read_bytes() == own


def hub_source(repo: str, revision: str, commit: str | None) -> dict:
    return {"sources": [{"repo": repo, "revision": revision, "commit": commit}]}


def card_with(front_matter: str) -> bytes:
    return f"---\n{front_matter}\n---\n\n# a model\n".encode()


def test_the_license_is_the_hub_cards_at_the_commit_read_else_the_default_branch(tmp_path, hub, hub_api, client):
    hub_api.create_repo("org/licensed")
    hub_api.upload_file(
        path_or_fileobj=card_with("license: apache-2.0"), path_in_repo="README.md", repo_id="org/licensed"
    )
    hub_api.create_branch("org/licensed", branch="step1")
    commit = hub_api.upload_file(
        path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/licensed", revision="step1"
    ).oid
    found, note = sources_license(hub_source("org/licensed", "step1", commit), tmp_path, client)
    assert found == {"license": "apache-2.0"} and note is None

    other = "license: other\nlicense_name: pythia-terms\nlicense_link: https://example.org/terms"
    hub_api.create_repo("org/custom")
    hub_api.upload_file(path_or_fileobj=card_with(other), path_in_repo="README.md", repo_id="org/custom")
    found, _ = sources_license(hub_source("org/custom", "main", None), tmp_path, client)
    assert found == {"license": "other", "license_name": "pythia-terms", "license_link": "https://example.org/terms"}


def test_no_license_says_what_was_asked(tmp_path, hub, hub_api, client):
    hub_api.create_repo("org/silent")
    hub_api.upload_file(path_or_fileobj=card_with("tags: [x]"), path_in_repo="README.md", repo_id="org/silent")
    found, note = sources_license(hub_source("org/silent", "main", None), tmp_path, client)
    assert found == {} and "Neither the model card of `org/silent` on the Hub" in note

    offline = HubClient(endpoint=hub.url, token="x", offline=True)
    found, note = sources_license(hub_source("org/silent", "main", None), tmp_path, offline)
    assert found == {} and "not read from the Hub (HF_HUB_OFFLINE is set)" in note

    gone = HubClient(endpoint="http://127.0.0.1:9", token="x", offline=False, tries=1)  # nothing listens on port 9
    found, note = sources_license(hub_source("org/silent", "main", None), tmp_path, gone)
    assert found == {} and "could not be read from the Hub (could not reach the Hub" in note
    assert "--license" in note

    local = {"sources": [{"path": str(save_trajectory(tmp_path / "t", 1)[0])}]}
    assert sources_license(local, tmp_path, client) == ({}, None)  # the card's default note: files on disk only


def reproduce_block(card: str) -> list[str]:
    block = re.search(r"## Reproduce\n.*?```bash\n(.*?)```", card, re.S)
    assert block, "the card has a Reproduce block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_every_command_of_the_demos_card_runs_as_written_from_a_clone(tmp_path):
    """The card's Reproduce commands, run from a fresh download of the pushed repo (the demo's Hub started again on
    the port the card names), rebuild the published files and scores; nothing pushed names a local path."""
    from huggingface_hub import snapshot_download

    from hubmerge.devhub import HubServer
    from hubmerge.results.keys import model_key, weight_hashes_of_folder
    from hubmerge.results.store import ResultsStore

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "30", "--save-every", "10", "--window", "2", "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    card = (out / "merged-last2" / "README.md").read_text()
    endpoint = re.search(r"Hub sources were read from (http://127\.0\.0\.1:(\d+))\.", card)
    assert endpoint, card
    clone = tmp_path / "clone"
    with HubServer(out / "hub", port=int(endpoint.group(2))) as hub:
        snapshot_download("demo/tiny-grammar-last2", local_dir=clone, endpoint=hub.url, cache_dir=tmp_path / "c1")
        pushed = text_files(clone)
        assert {"README.md", "recipe.yaml", "hubmerge.json"} <= set(pushed)
        for name, text in pushed.items():
            assert str(tmp_path) not in text and str(Path.home()) + "/" not in text, name
        assert "Neither the model card of `demo/tiny-grammar` on the Hub" in pushed["README.md"]

        commands = reproduce_block(pushed["README.md"])
        assert commands[0].startswith("hubmerge merge recipe.yaml") and commands[1].startswith("hubmerge eval .")
        env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "c2"), "HUBMERGE_CACHE": str(tmp_path / "c3")}
        env.pop("HUBMERGE_RESULTS", None)
        hubmerge = str(Path(sys.executable).with_name("hubmerge"))
        for line in commands:
            argv = shlex.split(line)
            assert argv[0] == "hubmerge"
            run = subprocess.run([hubmerge, *argv[1:], "-q"], cwd=clone, env=env, capture_output=True, text=True)
            assert run.returncode == 0, f"{line}\n{run.stdout}\n{run.stderr}"

    rebuilt = clone / "merged-last2"
    recorded = json.loads(pushed["hubmerge.json"])["files"]
    for name in ("model.safetensors", "config.json"):
        assert hashlib.sha256((rebuilt / name).read_bytes()).hexdigest() == recorded[name], name
    # The clone's scores of the published model equal the demo's own, task by task.
    key = model_key(weight_hashes_of_folder(clone))
    mine = {
        s.task: s.acc for s in ResultsStore(clone / "hubmerge-results", read_only=True).scores() if s.model_key == key
    }
    theirs = {s.task: s.acc for s in ResultsStore(out / "results", read_only=True).scores() if s.model_key == key}
    assert mine and mine == {t: theirs[t] for t in mine}
