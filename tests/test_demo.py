"""`hubmerge demo` end to end, in a short configuration."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hubmerge.cli import app


def test_demo_runs_end_to_end_through_the_local_hub(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        app, ["demo", "--out", str(out), "--steps", "30", "--save-every", "10", "--window", "2", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    merged = out / "merged-last2"
    prov = json.loads((merged / "hubmerge.json").read_text())
    assert [s["revision"] for s in prov["sources"]] == ["step20", "step30"]
    assert all(s["repo"] == "demo/tiny-grammar" and len(s["commit"]) == 40 for s in prov["sources"])
    # The trajectory and the merge live in the demo's own Hub store, which survives the demo.
    from hubmerge.devhub import HubServer

    with HubServer(out / "hub") as hub:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.url, token="x")
        branches = {b.name for b in api.list_repo_refs("demo/tiny-grammar").branches}
        assert {"step10", "step20", "step30", "main"} <= branches
        assert api.file_exists("demo/tiny-grammar-last2", "hubmerge.json")
        assert api.file_exists("demo/tiny-grammar-last2", "README.md")  # the card went up with the merge
    # Raw checkpoints vs merge vs ensemble were scored, the card and its plot written, and all of it named.
    card = (merged / "README.md").read_text()
    assert "step20" in card and "step30" in card and "ensemble" in card.lower()
    assert (merged / "stability.png").is_file()
    assert "ensemble of the 2" in res.output and "model card" in res.output and "plot" in res.output
    assert "merged model" in res.output and "done in" in res.output
    # The demo keeps its HF cache inside its folder.
    assert (out / "hf-cache" / "models--demo--tiny-grammar").is_dir()


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--steps", "10", "--save-every", "5"])
    assert res.exit_code == 4 and "not a hubmerge demo folder" in res.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_writes_no_cache_outside_its_folder(tmp_path, monkeypatch):
    """With HOME (and every cache variable) pointing at defaults under a fresh HOME, the demo writes nothing there;
    the environment and the client's cache constants are given back afterwards."""
    import os

    from huggingface_hub import constants

    from hubmerge.io.env import CACHE_VARIABLES

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in [*CACHE_VARIABLES, "HF_HUB_CACHE", "HF_HUB_OFFLINE"]:
        monkeypatch.delenv(key, raising=False)
    hf = home / ".cache" / "huggingface"  # what the client's constants would be, imported under this HOME
    for name, value in {"HF_HOME": hf, "HF_HUB_CACHE": hf / "hub", "HF_XET_CACHE": hf / "xet"}.items():
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(hf / "assets"))
    before = dict(os.environ)
    res = CliRunner().invoke(
        app, ["demo", "--out", str(tmp_path / "demo"), "--steps", "20", "--save-every", "10", "--window", "2", "-q"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []
    assert dict(os.environ) == before
    given_back = {name: getattr(constants, name) for name in ("HF_HOME", "HF_HUB_CACHE", "HF_XET_CACHE")}
    assert given_back == {"HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_XET_CACHE": str(hf / "xet")}
