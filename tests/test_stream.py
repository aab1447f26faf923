"""``fetch: stream``: merges read straight from the dev Hub by range requests, against cached merges.

The dev Hub redirects LFS resolves to its storage host (another port), as the Hub does; every test below goes
through the real ``huggingface_hub`` client and session. ``PART_BYTES`` is shrunk so that the tiny models' files
are cut into many ranges, as a real model's are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from factories import save_trajectory, terminate_mid_merge
from test_hub_flow import REPO, invoke, seed

from hubmerge.errors import HubError, SourceError, StreamError
from hubmerge.hub import stream as stream_mod
from hubmerge.hub.client import HubClient
from hubmerge.io.writer import TEMP_SUFFIX
from hubmerge.merging.recipe import load_recipe
from hubmerge.workflows.merge import merge_recipe, plan_merge

NAMES = [f"step{i * 1000}" for i in range(1, 5)]


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(stream_mod, "PART_BYTES", 4096)


def seeded(tmp_path: Path, hub, hub_api, fmt: str = "single", repo: str = REPO) -> dict[str, Path]:
    folders = save_trajectory(tmp_path / f"ckpts-{fmt}", len(NAMES), fmt=fmt)
    seed(hub_api, repo, folders, NAMES)
    return dict(zip(NAMES, folders, strict=True))


def recipe(tmp_path: Path, out: str, fetch: str, repo: str = REPO, **extra) -> Path:
    data = {
        "name": "streamed",
        "sources": {"repo": repo, "select": {"last": 3}, "fetch": fetch},
        "output": {"path": str(tmp_path / out), **extra.pop("output", {})},
        **extra,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def cached_weights(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and (p.suffix in (".safetensors", ".bin") or "blobs" in p.parts)]


@pytest.mark.parametrize(
    ("fmt", "extra"),
    [
        ("single", {}),
        ("sharded", {"output": {"max_shard_size": "30KB"}, "dtype": "bfloat16"}),
        ("single", {"method": "ema", "ema": {"decay": 0.5}, "dtype": "float32"}),
    ],
)
def test_stream_and_cache_merges_are_bit_identical(tmp_path, hub, hub_api, client, hf_cache, fmt, extra):
    seeded(tmp_path, hub, hub_api, fmt)
    streamed = merge_recipe(recipe(tmp_path, "streamed", "stream", **extra), client)
    # Nothing but config, tokenizer and indexes went through the cache: no weight file, no blob of one.
    assert not [p for p in hf_cache.rglob("*") if p.is_file() and p.name.endswith(".safetensors")]
    blobs = [p for p in hf_cache.rglob("blobs/*") if p.is_file()]
    assert all(p.stat().st_size < 5000 for p in blobs), [(p.name, p.stat().st_size) for p in blobs]
    cached = merge_recipe(recipe(tmp_path, "cached", "cache", **extra), client)
    assert weight_files(streamed.output) and weight_files(streamed.output) == weight_files(cached.output)
    assert {k: v for k, v in streamed.files.items() if k != "hubmerge.json"} == {
        k: v for k, v in cached.files.items() if k != "hubmerge.json"
    }
    prov = json.loads((streamed.output / "hubmerge.json").read_text())
    assert prov["fetch"] == "stream"
    assert json.loads((cached.output / "hubmerge.json").read_text())["fetch"] == "cache"
    listed = {f.path: f.lfs.sha256 for f in hub_api.list_repo_tree(REPO, revision=NAMES[-1]) if f.lfs}
    assert prov["sources"][-1]["sha256"] == {k: v for k, v in listed.items() if k.endswith(".safetensors")}
    assert prov["sources"][-1]["sha256"]
    assert streamed.plan.stream.files == sum(len(ck.files) for ck in streamed.plan.checkpoints)
    if fmt == "sharded":
        assert len(weight_files(streamed.output)) > 1 and streamed.plan.stream.files > 3


def test_ranges_go_to_the_storage_host_without_the_token(tmp_path, hub, hub_api, client):
    seeded(tmp_path, hub, hub_api)
    start = len(hub.requests)
    merge_recipe(recipe(tmp_path, "out", "stream"), client)
    traffic = list(hub.requests)[start:]
    storage = [r for r in traffic if r.port != hub.port]
    resolves = [r for r in traffic if "/resolve/" in r.path and r.path.endswith(".safetensors")]
    assert storage and all(r.path.startswith("/lfs/") and r.range for r in storage)
    assert not any(r.authorized for r in storage)  # another origin: the token stays with the Hub
    assert resolves and all(r.authorized and r.method == "HEAD" for r in resolves)  # resolved once per file
    assert len(resolves) == 3
    # every range is a single range, and the weights were never fetched whole
    assert all("," not in r.range for r in storage)


def test_dry_run_shows_the_stream_and_downloads_no_weights(tmp_path, hub, hub_api, hf_cache):
    seeded(tmp_path, hub, hub_api)
    res = invoke(hub, "merge", str(recipe(tmp_path, "out", "cache")), "--dry-run", "--stream", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["fetch"] == "stream" and plan["stream"]["connections"] == 4
    assert plan["stream"]["files"] == sum(len(s["files"]) for s in plan["sources"]) == 3
    assert plan["stream"]["bytes"] > plan["bytes_written"]
    assert not (tmp_path / "out").exists()
    assert not [p for p in hf_cache.rglob("*.safetensors")]
    text = invoke(hub, "merge", str(recipe(tmp_path, "out", "stream")), "--dry-run")
    assert text.exit_code == 0 and "streamed from the Hub" in text.output and "in flight" in text.output


def test_a_dropped_connection_resumes_and_the_merge_is_identical(tmp_path, hub, hub_api, client):
    seeded(tmp_path, hub, hub_api)
    reference = merge_recipe(recipe(tmp_path, "ref", "stream"), client)
    hub.inject_drop(REPO, "model.safetensors", after_bytes=1500, times=3)
    start = len(hub.requests)
    again = merge_recipe(recipe(tmp_path, "again", "stream"), client)
    assert weight_files(again.output) == weight_files(reference.output)
    ranges = [r.range for r in list(hub.requests)[start:] if r.port != hub.port]
    # a range that dropped after 1500 bytes was asked again from where it stopped
    firsts = [int(r.split("=")[1].split("-")[0]) for r in ranges]
    assert any(b - a == 1500 for a, b in zip(sorted(firsts), sorted(firsts)[1:], strict=False))


def test_a_connection_that_keeps_dropping_is_one_line_and_nothing_is_committed(tmp_path, hub, hub_api):
    seeded(tmp_path, hub, hub_api)
    hub.inject_drop(REPO, "model.safetensors", after_bytes=0, times=10_000)
    quick = HubClient(endpoint=hub.url, token="hf_test", offline=False, tries=2)
    with pytest.raises(StreamError, match="dropped 2 times.*fetch: cache"):
        merge_recipe(recipe(tmp_path, "out", "stream"), quick)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(f".out.*{TEMP_SUFFIX}"))


def test_corrupted_bytes_are_refused_and_nothing_is_committed(tmp_path, hub, hub_api, client):
    seeded(tmp_path, hub, hub_api)
    hub.inject_corrupt(REPO, "model.safetensors")
    with pytest.raises(HubError, match=r"step\d000: model.safetensors does not match the sha256"):
        merge_recipe(recipe(tmp_path, "out", "stream"), client)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(f".out.*{TEMP_SUFFIX}"))
    res = invoke(hub, "merge", str(recipe(tmp_path, "out", "stream")), "-q")
    assert res.exit_code == 5 and "sha256" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(("kind", "message"), [("ignore", "HTTP 200"), ("shifted", "Content-Range")])
def test_a_server_that_gets_range_wrong_is_a_clear_error(tmp_path, hub, hub_api, client, kind, message):
    seeded(tmp_path, hub, hub_api)
    hub.inject_range_fault(REPO, "model.safetensors", kind)
    with pytest.raises(StreamError, match=f"{message}.*fetch: cache"):
        merge_recipe(recipe(tmp_path, "out", "stream"), client)
    assert not (tmp_path / "out").exists()


def test_a_private_repo_without_a_token_is_the_hub_error_users_know(tmp_path, hub, hub_api):
    seeded(tmp_path, hub, hub_api)
    hub.set_private(REPO)
    anonymous = HubClient(endpoint=hub.url, token=False, offline=False)  # type: ignore[arg-type]
    with pytest.raises(HubError, match="private.*hf auth login"):
        merge_recipe(recipe(tmp_path, "out", "stream"), anonymous)


def test_bin_sources_are_refused_with_a_line_naming_the_file(tmp_path, hub, hub_api, client):
    seeded(tmp_path, hub, hub_api, fmt="bin")
    with pytest.raises(SourceError, match=r"step\d000: pytorch_model.bin is a PyTorch .bin.*fetch: cache"):
        plan_merge(load_recipe(recipe(tmp_path, "out", "stream")), client)


def test_sources_stored_in_another_order_are_refused_before_any_weight_is_read(tmp_path, hub, hub_api, client):
    import torch
    from safetensors.torch import load_file, save_file

    folders = seeded(tmp_path, hub, hub_api)
    odd = folders[NAMES[1]]
    state = load_file(odd / "model.safetensors")
    # safetensors sorts by dtype, then name: a float32 tensor goes first, so the byte order changes
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.float32)
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    hub_api.upload_folder(repo_id=REPO, folder_path=odd, revision=NAMES[1], commit_message="reordered")
    start = len(hub.requests)
    with pytest.raises(SourceError, match="another order.*fetch: cache"):
        plan_merge(load_recipe(recipe(tmp_path, "out", "stream")), client)
    assert all(r.range and r.range.startswith("bytes=0-") for r in list(hub.requests)[start:] if r.port != hub.port)


def test_local_recipes_refuse_the_stream_flag(tmp_path, hub):
    local = save_trajectory(tmp_path / "local", 2)
    path = tmp_path / "local.yaml"
    path.write_text(
        yaml.safe_dump({"name": "l", "sources": [{"path": str(p)} for p in local], "output": {"path": "x"}})
    )
    res = invoke(hub, "merge", str(path), "--stream")
    assert res.exit_code == 2 and "Hub sources" in res.output


@pytest.fixture(scope="module")
def grammar(tmp_path_factory) -> tuple[list[Path], Path]:
    """Five checkpoints of the demo's tiny grammar model (safetensors, with a tokenizer), and its task."""
    from hubmerge.demo.grammar import write_minimal_pairs
    from hubmerge.demo.train import train_trajectory

    root = tmp_path_factory.mktemp("grammar")
    ckpts = train_trajectory(root / "ckpts", steps=20, save_every=4, d_model=32, n_layers=1, n_heads=2, batch_size=8)
    return ckpts, write_minimal_pairs(root / "pairs.jsonl", 6, seed=3)


def sweep_recipe(tmp_path: Path, tag: str, fetch: str, pairs: Path) -> Path:
    data = {
        "name": "hub-sweep",
        "sources": {"repo": "org/grammar", "select": {"last": 4}, "fetch": fetch},
        "output": {"path": str(tmp_path / f"sweep-{tag}")},
        "evaluate": {"tasks": "blimp", "data": str(pairs), "results": str(tmp_path / f"res-{tag}")},
        "sweep": {"sizes": [1, 2, 3], "stride": 1},
    }
    path = tmp_path / f"sweep-{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_streamed_sweep_equals_the_sweep_from_disk(tmp_path, hub, hub_api, client, hf_cache, grammar):
    from hubmerge.results.store import ResultsStore
    from hubmerge.workflows.sweep import run_sweep_recipe

    ckpts, pairs = grammar
    seed(hub_api, "org/grammar", ckpts, [p.name for p in ckpts])
    streamed = run_sweep_recipe(sweep_recipe(tmp_path, "stream", "stream", pairs), client)
    assert not [p for p in hf_cache.rglob("*") if p.is_file() and p.name.endswith(".safetensors")]
    cached = run_sweep_recipe(sweep_recipe(tmp_path, "cache", "cache", pairs), client)
    assert streamed.windows == cached.windows == 5
    assert streamed.comparison.to_dict() == cached.comparison.to_dict()
    assert streamed.recommendation == cached.recommendation

    def rows(tag: str) -> list[tuple]:
        scores = ResultsStore(tmp_path / f"res-{tag}").scores()
        return sorted((s.model_key, s.task_key, s.n, s.acc) for s in scores)

    assert rows("stream") == rows("cache")
    assert len({r[0] for r in rows("stream")}) == 4 + 5  # 4 raw checkpoints, 5 windows
    # the raw checkpoints' copies were scored and removed; only the report is left
    assert sorted(p.name for p in (tmp_path / "sweep-stream").iterdir() if not p.name.endswith(".json")) == ["report"]
    # a rerun finds every score in the store: it streams nothing
    start = len(hub.requests)
    again = run_sweep_recipe(sweep_recipe(tmp_path, "stream", "stream", pairs), client)
    assert again.comparison.to_dict() == streamed.comparison.to_dict()
    assert not [r for r in list(hub.requests)[start:] if r.port != hub.port and r.range != "bytes=0-99999"]


def test_the_dev_hub_redirects_lfs_files_to_a_storage_host_that_serves_ranges(tmp_path, hub, hub_api):
    import httpx2

    seeded(tmp_path, hub, hub_api)
    sha = hub_api.list_repo_refs(REPO).branches[0].target_commit
    head = httpx2.head(f"{hub.url}/{REPO}/resolve/{sha}/model.safetensors", follow_redirects=False)
    assert head.status_code == 302
    assert head.headers["X-Repo-Commit"] == sha and head.headers["X-Linked-Size"].isdigit()
    location = head.headers["Location"]
    assert location.startswith(hub.storage_url + "/lfs/") and location.endswith("path=model.safetensors")
    part = httpx2.get(location, headers={"Range": "bytes=8-15"})
    size = int(head.headers["X-Linked-Size"])
    assert part.status_code == 206 and part.headers["Content-Range"] == f"bytes 8-15/{size}"
    assert part.headers["Accept-Ranges"] == "bytes" and part.headers["ETag"] == head.headers["X-Linked-Etag"]
    assert len(part.content) == 8
    assert httpx2.get(location.replace("signature=", "signature=0")).status_code == 403  # tampered
    assert httpx2.get(f"{hub.url}/lfs/{location.split('/lfs/')[1]}").status_code == 404  # not on the Hub's port
    small = httpx2.head(f"{hub.url}/{REPO}/resolve/{sha}/config.json")
    assert small.status_code == 200  # small, non-LFS files are served in place


def test_an_expired_storage_url_is_resolved_again(tmp_path, hub, hub_api, client):
    """The Hub's presigned URLs expire; one that dies mid-merge is resolved again, and the merge completes."""
    import secrets

    seeded(tmp_path, hub, hub_api)
    reference = merge_recipe(recipe(tmp_path, "ref", "stream"), client)
    plan = plan_merge(load_recipe(recipe(tmp_path, "again", "stream")), client)
    hub.storage_secret = secrets.token_bytes(32)  # every URL the plan resolved is now refused (403)
    from hubmerge.merging.executor import execute

    again = execute(plan)
    assert weight_files(again.output) == weight_files(reference.output)
    hub.storage_ttl = -1  # every new URL is born expired: a clear error, not a loop
    with pytest.raises(StreamError, match="refused the range even after resolving the file again"):
        merge_recipe(recipe(tmp_path, "never", "stream"), client)
    assert not (tmp_path / "never").exists()


def test_the_bandwidth_limit_paces_every_connection_together(tmp_path, hub, hub_api):
    import time

    import httpx2

    from hubmerge.devhub import HubServer

    seeded(tmp_path, hub, hub_api)
    sha = hub_api.list_repo_refs(REPO).branches[0].target_commit
    with HubServer(hub.store.root, max_bandwidth=200_000) as slow:  # 0.2 MB/s
        url = f"{slow.url}/{REPO}/resolve/{sha}/model.safetensors"
        start = time.perf_counter()
        body = httpx2.get(url, headers={"Range": "bytes=0-39999"}, follow_redirects=True).content
        took = time.perf_counter() - start
    assert len(body) == 40_000
    assert 0.15 <= took < 2.0  # 40 kB at 0.2 MB/s: 0.2 s, less the first burst


def test_sigterm_mid_stream_leaves_nothing(tmp_path, hub, hub_api):
    import subprocess
    import sys

    from hubmerge.devhub import HubServer

    seeded(tmp_path, hub, hub_api)
    with HubServer(hub.store.root, max_bandwidth=20_000) as slow:  # the stream takes seconds
        path = recipe(tmp_path, "out", "stream")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hubmerge", "merge", str(path), "--endpoint", slow.url, "-q"],
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        stderr = terminate_mid_merge(proc, tmp_path)
    assert proc.returncode == 130, stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert "Traceback" not in stderr


def test_offline_with_fetch_stream_says_so_before_anything(tmp_path, hub, hub_api):
    from typer.testing import CliRunner

    from hubmerge.cli import app

    seeded(tmp_path, hub, hub_api)
    start = len(hub.requests)
    args = ["merge", str(recipe(tmp_path, "out", "stream")), "--endpoint", hub.url]
    res = CliRunner().invoke(app, args, env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.output and "fetch: cache" in res.output
    assert len(hub.requests) == start  # not one request
