"""The local Hub answers the real huggingface_hub client the way huggingface.co does.

Every check goes through the client's own calls (no mocks), so a client upgrade that changes what it
expects from the Hub shows up here first.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_hf_file_metadata,
    hf_api,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from safetensors.numpy import save_file

from hubmerge.devhub import HubServer

REPO = "org/tiny"
TOKEN = "hf_test"


def sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def seeded(hub_api: HfApi, tmp_path: Path) -> Path:
    """A model repo with a config, a safetensors file and a nested file, uploaded by the client itself."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 4}))
    weights = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(64, dtype=np.float32)}
    save_file(weights, str(src / "model.safetensors"))
    (src / "sub" / "notes.txt").write_text("hello")
    hub_api.create_repo(REPO)
    hub_api.upload_folder(folder_path=src, repo_id=REPO, commit_message="Add step 1000")
    return src


def download(hub: HubServer, filename: str, cache: Path, **kwargs) -> str:
    kwargs.setdefault("token", TOKEN)
    return hf_hub_download(REPO, filename, endpoint=hub.url, cache_dir=cache, **kwargs)


def raw(hub: HubServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """An HTTP request the client would refuse to send (bad paths), straight to the server."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_create_repo_and_whoami(hub_api: HfApi):
    assert hub_api.whoami()["name"] == "hubmerge-user"
    url = hub_api.create_repo(REPO)
    assert url.repo_id == REPO and url.endswith(f"/{REPO}")
    with pytest.raises(HfHubHTTPError) as err:
        hub_api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert hub_api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert hub_api.repo_exists(REPO) and not hub_api.repo_exists("org/missing")
    hub_api.delete_repo(REPO)
    assert not hub_api.repo_exists(REPO)


def test_tree_reports_weights_as_lfs_with_sha256(hub_api: HfApi, seeded: Path):
    entries = {e.path: e for e in hub_api.list_repo_tree(REPO, recursive=True, expand=True)}
    assert set(entries) == {".gitattributes", "config.json", "model.safetensors", "sub", "sub/notes.txt"}
    weights = entries["model.safetensors"]
    assert isinstance(weights, RepoFile) and weights.lfs is not None
    assert weights.lfs.sha256 == sha256(seeded / "model.safetensors")
    assert weights.size == weights.lfs.size == (seeded / "model.safetensors").stat().st_size
    config = entries["config.json"]
    assert config.lfs is None and config.blob_id == git_sha1((seeded / "config.json").read_bytes())
    assert isinstance(entries["sub"], RepoFolder)
    assert weights.last_commit is not None and weights.last_commit.title == "Add step 1000"
    top = {e.path for e in hub_api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "config.json", "model.safetensors", "sub"}
    assert [e.path for e in hub_api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/notes.txt"]


def test_repo_info_paths_info_and_commits(hub_api: HfApi, seeded: Path):
    info = hub_api.model_info(REPO, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["model.safetensors"].lfs.sha256 == sha256(seeded / "model.safetensors")
    assert info.private is False and info.gated is False
    commits = hub_api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["Add step 1000", "initial commit"]
    assert info.sha == commits[0].commit_id
    first = hub_api.repo_info(REPO, revision=commits[1].commit_id)
    assert first.sha == commits[1].commit_id and [s.rfilename for s in first.siblings] == [".gitattributes"]
    assert hub_api.model_info(REPO, revision=info.sha[:7]).sha == info.sha
    paths = hub_api.get_paths_info(REPO, ["model.safetensors", "sub", "missing.bin"], expand=True)
    assert [type(p) for p in paths] == [RepoFile, RepoFolder]
    assert paths[0].lfs.sha256 == sha256(seeded / "model.safetensors")
    assert paths[1].last_commit.oid == info.sha


def test_downloads_snapshot_and_safetensors_metadata(hub: HubServer, hub_api: HfApi, seeded: Path, tmp_path):
    path = download(hub, "model.safetensors", tmp_path / "cache")
    assert sha256(path) == sha256(seeded / "model.safetensors")
    assert Path(download(hub, "sub/notes.txt", tmp_path / "cache")).read_text() == "hello"
    snap = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "snap"))
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
        "sub/notes.txt",
    ]
    meta = hub_api.get_safetensors_metadata(REPO)
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert tensors["w"].shape == [64, 64] and tensors["w"].dtype == "F32"
    assert hub_api.file_exists(REPO, "config.json") and not hub_api.file_exists(REPO, "nope.bin")

    head = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors", endpoint=hub.url), token=TOKEN)
    assert head.etag == sha256(seeded / "model.safetensors") and head.commit_hash == hub_api.model_info(REPO).sha
    status, headers, body = raw(hub, "GET", f"/{REPO}/resolve/main/config.json", headers={"Range": "bytes=2-5"})
    assert status == 206 and headers["Content-Range"].startswith("bytes 2-5/")
    assert body == (seeded / "config.json").read_bytes()[2:6]


def test_branches_tags_and_pull_requests(hub: HubServer, hub_api: HfApi, seeded: Path, tmp_path):
    main_sha = hub_api.model_info(REPO).sha
    hub_api.create_branch(REPO, branch="step-2000")
    with pytest.raises(HfHubHTTPError) as err:
        hub_api.create_branch(REPO, branch="step-2000")
    assert err.value.response.status_code == 409
    hub_api.create_tag(REPO, tag="v1.0", revision="step-2000")
    hub_api.upload_file(path_or_fileobj=b"v2", path_in_repo="version.txt", repo_id=REPO, revision="step-2000")
    commit = hub_api.create_commit(
        REPO, [CommitOperationAdd("pr.txt", b"proposal")], commit_message="Propose", create_pr=True
    )
    assert commit.pr_revision == "refs/pr/1" and commit.pr_num == 1

    refs = hub_api.list_repo_refs(REPO, include_pull_requests=True)
    branches = {b.name: b.target_commit for b in refs.branches}
    assert branches["main"] == main_sha and branches["step-2000"] != main_sha
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": main_sha}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]

    assert hub_api.revision_exists(REPO, "refs/pr/1") and not hub_api.revision_exists(REPO, "refs/pr/2")
    assert hub_api.file_exists(REPO, "pr.txt", revision="refs/pr/1") and not hub_api.file_exists(REPO, "pr.txt")
    assert Path(download(hub, "pr.txt", tmp_path / "c", revision="refs/pr/1")).read_bytes() == b"proposal"
    hub_api.create_commit(REPO, [CommitOperationAdd("more.txt", b"+")], commit_message="More", revision="refs/pr/1")
    pr_files = {s.rfilename for s in hub_api.model_info(REPO, revision="refs/pr/1").siblings}
    assert {"pr.txt", "more.txt"} <= pr_files and "version.txt" not in pr_files
    hub_api.delete_file("sub/notes.txt", REPO)
    hub_api.delete_folder("sub", REPO, revision="refs/pr/1")
    assert "sub/notes.txt" not in hub_api.list_repo_files(REPO)
    assert "sub/notes.txt" not in hub_api.list_repo_files(REPO, revision="refs/pr/1")
    hub_api.delete_branch(REPO, branch="step-2000")
    assert not hub_api.revision_exists(REPO, "step-2000")


def test_stale_parent_commit_is_refused(hub_api: HfApi, seeded: Path):
    old = hub_api.list_repo_commits(REPO)[-1].commit_id
    with pytest.raises(HfHubHTTPError) as err:
        hub_api.create_commit(REPO, [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=old)
    assert err.value.response.status_code == 412


def test_typed_errors(hub: HubServer, hub_api: HfApi, seeded: Path, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hub_api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        download(hub, "config.json", tmp_path, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        download(hub, "missing.json", tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hub_api.list_repo_tree(REPO, revision="nope").__next__()


def test_private_repo_needs_a_token(hub: HubServer, hub_api: HfApi, tmp_path):
    hub_api.create_repo("org/secret", private=True)
    hub_api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/secret")
    assert hub_api.model_info("org/secret").private is True
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError) as err:
        anonymous.model_info("org/secret")
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download("org/secret", "config.json", endpoint=hub.url, token=False, cache_dir=tmp_path)
    assert err.value.response.status_code == 401


def test_gated_repo_refuses_downloads(hub: HubServer, hub_api: HfApi, seeded: Path, tmp_path):
    hub.set_gated(REPO)
    assert hub_api.model_info(REPO).gated == "manual"  # metadata stays visible, as on the Hub
    with pytest.raises(GatedRepoError) as err:
        download(hub, "config.json", tmp_path)
    assert err.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as err:
        download(hub, "config.json", tmp_path, token=False)
    assert err.value.response.status_code == 401
    hub_api.update_repo_settings(REPO, gated=False)
    assert Path(download(hub, "config.json", tmp_path)).exists()


def test_restricted_tokens(tmp_path):
    with HubServer(tmp_path / "hub", tokens={"hf_good"}) as hub:
        assert HfApi(endpoint=hub.url, token="hf_good").whoami()["name"] == "hubmerge-user"
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=hub.url, token="hf_bad").whoami()
        assert err.value.response.status_code == 401


def test_data_survives_a_restart(tmp_path):
    root = tmp_path / "hub"
    with HubServer(root) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo("org/data", repo_type="dataset")
        api.upload_file(
            path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="org/data", repo_type="dataset"
        )
        api.create_tag("org/data", tag="v1", repo_type="dataset")
        sha = api.dataset_info("org/data").sha
    with HubServer(root) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        assert api.dataset_info("org/data").sha == sha
        assert [t.name for t in api.list_repo_refs("org/data", repo_type="dataset").tags] == ["v1"]
        path = hf_hub_download(
            "org/data", "train.csv", repo_type="dataset", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c"
        )
        assert Path(path).read_bytes() == b"a,b\n1,2\n"


@pytest.mark.parametrize(
    "path",
    [
        f"/{REPO}/resolve/main/..%2F..%2Fetc%2Fpasswd",
        f"/{REPO}/resolve/main/sub/../config.json",
        f"/{REPO}/resolve/main/sub%5Cnotes.txt",
        f"/{REPO}/resolve/main/config.json%00",
        f"/{REPO}/resolve/main/%2Fetc%2Fpasswd",
        "/api/models/org/..%2F..%2Fetc/tree/main",
        "/org/..%2Ftiny/resolve/main/config.json",
    ],
)
def test_path_traversal_is_rejected(hub: HubServer, seeded: Path, path: str):
    status, headers, _ = raw(hub, "GET", path)
    assert status == 400, headers


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs.txt", "a\\b.txt", "a/\x00.txt", "a//b.txt"])
def test_commit_with_bad_path_is_rejected(hub: HubServer, seeded: Path, bad: str):
    lines = [
        {"key": "header", "value": {"summary": "evil"}},
        {"key": "file", "value": {"path": bad, "content": "eA==", "encoding": "base64"}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, _ = raw(hub, "POST", f"/api/models/{REPO}/commit/main", body, {"Content-Type": "application/x-ndjson"})
    assert status == 400


def test_dropped_download_is_retried(hub: HubServer, seeded: Path, tmp_path, caplog):
    """A small file cut mid-body is fetched again from the start (the client keeps only whole 10 MiB chunks)."""
    size = (seeded / "model.safetensors").stat().st_size
    hub.inject_drop(REPO, "model.safetensors", after_bytes=size // 3)
    with caplog.at_level(logging.WARNING, logger="huggingface_hub"):
        path = download(hub, "model.safetensors", tmp_path / "cache")
    assert "Trying to resume download" in caplog.text
    assert sha256(path) == sha256(seeded / "model.safetensors")
    gets = [r for r in hub.requests if r.method == "GET" and "model.safetensors" in r.path]
    assert [r.range for r in gets] == [None, None]


def test_dropped_large_download_resumes_with_a_range(hub: HubServer, hub_api: HfApi, tmp_path):
    """Past the client's first 10 MiB chunk, the retry asks only for the rest (Range: bytes=10485760-)."""
    data = np.random.default_rng(0).integers(0, 256, size=12 * 2**20, dtype=np.uint8).tobytes()
    hub_api.create_repo(REPO)
    hub_api.upload_file(path_or_fileobj=data, path_in_repo="shard.bin", repo_id=REPO)
    hub.inject_drop(REPO, "shard.bin", after_bytes=11 * 2**20)
    path = download(hub, "shard.bin", tmp_path / "cache")
    assert Path(path).read_bytes() == data
    gets = [r.range for r in hub.requests if r.method == "GET" and "shard.bin" in r.path]
    assert gets == [None, f"bytes={10 * 2**20}-"]


def test_corruption_is_detectable(hub: HubServer, hub_api: HfApi, seeded: Path, tmp_path):
    hub.inject_corrupt(REPO, "model.safetensors")
    path = download(hub, "model.safetensors", tmp_path / "cache")
    advertised = next(iter(hub_api.get_paths_info(REPO, ["model.safetensors"]))).lfs.sha256
    head = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors", endpoint=hub.url), token=TOKEN)
    assert head.etag == advertised == sha256(seeded / "model.safetensors")
    assert Path(path).stat().st_size == head.size  # same length, different bytes
    assert sha256(path) != advertised
    hub.clear_faults()
    fresh = download(hub, "model.safetensors", tmp_path / "again")
    assert sha256(fresh) == advertised


def test_model_card_push_and_validate_yaml(hub: HubServer, hub_api: HfApi, monkeypatch):
    # ModelCard.validate/push_to_hub take no endpoint= and read the import-time default: point it here.
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    hub_api.create_repo(REPO)
    data = ModelCardData(license="apache-2.0", tags=["hubmerge", "averaged"], base_model=["org/a", "org/b"])
    ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# Averaged\n").push_to_hub(REPO, token=TOKEN)
    info = hub_api.model_info(REPO)
    assert info.card_data.license == "apache-2.0" and info.tags == ["hubmerge", "averaged"]

    for bad, expected in [
        ("tags: hubmerge", '"tags" must be a list of strings'),
        ("license: [mit]", '"license" must be a string'),
        ("base_model: 3", '"base_model" must be a string or a list of strings'),
        ("model-index:\n- results: 1", '"model-index[0].name" must be a string'),
        ("tags: [unclosed", "Invalid YAML"),
    ]:
        # upload_file sends README.md to validate-yaml verbatim, before uploading anything
        with pytest.raises(ValueError, match="Invalid metadata in README.md") as err:
            hub_api.upload_file(path_or_fileobj=f"---\n{bad}\n---\n".encode(), path_in_repo="README.md", repo_id=REPO)
        assert expected in str(err.value)
    # ModelCard normalises what it can parse (a str tag becomes a list) and sends the rest to the server
    with pytest.raises(ValueError, match='"license" must be a string'):
        ModelCard("---\nlicense: [mit]\n---\n# card\n").validate()
    good_index = (
        "model-index:\n- name: m\n  results:\n  - task: {type: text-generation}\n"
        "    dataset: {type: wikitext, name: WikiText}\n    metrics:\n    - {type: perplexity, value: 12.5}\n"
    )
    ModelCard(f"---\n{good_index}---\n# card\n").validate()


def test_an_oversized_or_malformed_body_is_refused_not_read(hub):
    """A Content-Length of 100 GB once ended in a MemoryError and a 500; it is 413, and nothing is allocated."""
    status, headers, body = raw(hub, "POST", "/api/repos/create", headers={"Content-Length": "99999999999"})
    assert status == 413 and "too large" in headers["X-Error-Message"]
    status, _, _ = raw(hub, "POST", "/api/repos/create", headers={"Content-Length": "lots"})
    assert status == 400
    assert raw(hub, "GET", "/api/whoami-v2")[0] == 200  # the server still answers


def test_hub_serve_restricts_tokens_from_the_command_line(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "hubmerge", "hub", "serve", "--root", str(tmp_path / "h"), "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--token", "hf_a", "--token", "hf_b", "-q"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        codes = {}
        for token in ("hf_a", "hf_b", "hf_other"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
            codes[token] = conn.getresponse().status
            conn.close()
        assert codes == {"hf_a": 200, "hf_b": 200, "hf_other": 401}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "one of the 2 token(s) given" in out and "hf_a" not in out  # tokens are never printed
