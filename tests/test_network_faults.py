"""A stalled Hub, a Hub that dies mid-pull, a pull killed with -9: bounded time, one line, nothing lost.

The commands run as subprocesses (as a user runs them), against the dev Hub: in this process where the test
needs its request log, or as its own process where the test stops it with SIGSTOP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hubmerge.devhub import HubServer

REPO = "org/faulty"
WEIGHT_BYTES = 24 * 2**20  # over the client's 10 MiB write chunk, so a killed download leaves bytes


def env_for(hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUBMERGE_"))}
    env.update(
        HF_HOME=str(hf_home),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HUBMERGE_CACHE=str(hf_home / "hubmerge"),
        HF_TOKEN="hf_test",
        HF_HUB_DISABLE_TELEMETRY="1",
        **extra,
    )
    return env


def seed(url: str, root: Path, revisions: int = 2) -> list[str]:
    """Revisions of one 24 MiB float32 tensor (random, so nothing compresses), uploaded as branches."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token="hf_test")
    api.create_repo(REPO, exist_ok=True)
    names = []
    for i in range(revisions):
        folder = root / f"step{i + 1}"
        folder.mkdir(parents=True)
        gen = torch.Generator().manual_seed(i)
        save_file({"w": torch.randn(WEIGHT_BYTES // 4, generator=gen)}, folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "llama"}')
        name = f"step{(i + 1) * 1000}"
        api.create_branch(REPO, branch=name)
        api.upload_folder(repo_id=REPO, folder_path=folder, revision=name)
        names.append(name)
    return names


def hubmerge(*args: str, env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hubmerge", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def incomplete(hf_home: Path) -> list[Path]:
    return list((hf_home / "hub").rglob("*.incomplete"))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stalled_hub_gives_one_line_and_exit_5_within_the_stated_bound(tmp_path):
    """SIGSTOP keeps the listening socket: connections are accepted and never answered (the old 500 s hang)."""
    port = free_port()
    serve = ["hub", "serve", "--root", str(tmp_path / "store"), "--port", str(port), "-q"]
    server = subprocess.Popen(
        [sys.executable, "-m", "hubmerge", *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=url, token="hf_test")
        wait_for(lambda: _answers(api), 30, "the dev Hub to start")
        api.create_repo(REPO)
        api.create_branch(REPO, branch="step1000")
        server.send_signal(signal.SIGSTOP)
        # The README's bound: tries x (connect + read timeout) + 3 s of backoff; here 5 x (1 + 1) + 3 = 13 s.
        env = env_for(tmp_path / "hf", HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1")
        for args in (("revisions", REPO), ("pull", REPO, "--select", "{last: 1}", "-q")):
            start = time.monotonic()
            proc = hubmerge(*args, "--endpoint", url, env=env)
            out, err = proc.communicate(timeout=60)
            took = time.monotonic() - start
            assert proc.returncode == 5, (args, out, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: could not reach the Hub"), err
            assert "timed out" in lines[0]
            assert took < 13 + 10, f"{args[0]} took {took:.0f} s"  # + interpreter start-up on a busy machine
    finally:
        server.kill()  # works on a stopped process; a stopped one would first serve its backlog
        server.wait(timeout=10)


def _answers(api) -> bool:
    try:
        api.whoami()
        return True
    except Exception:
        return False


def test_a_hub_that_dies_mid_pull_gives_one_line_and_exit_5(tmp_path):
    with HubServer(tmp_path / "store", max_bandwidth=8e6) as hub:
        seed(hub.url, tmp_path / "ckpts")
        env = env_for(tmp_path / "hf", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
        proc = hubmerge("pull", REPO, "--select", "{last: 2}", "-q", "--endpoint", hub.url, env=env)
        wait_for(lambda: any(p.stat().st_size > 0 for p in incomplete(tmp_path / "hf")), 60, "the download")
        start = time.monotonic()
        hub.stop()  # open connections cut, new ones refused: as a killed server
        out, err = proc.communicate(timeout=300)
        took = time.monotonic() - start
    assert proc.returncode == 5, (out, err)
    print(f"gave up after {took:.0f} s")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert REPO in lines[0]
    assert "Traceback" not in err


def test_a_pull_killed_with_sigkill_is_resumed_from_its_partial_files_and_leaves_none(tmp_path):
    hf_home = tmp_path / "hf"
    with HubServer(tmp_path / "store", max_bandwidth=8e6) as hub:
        seed(hub.url, tmp_path / "ckpts")
        env = env_for(hf_home)
        proc = hubmerge("pull", REPO, "--select", "{last: 2}", "-q", "--endpoint", hub.url, env=env)
        wait_for(lambda: any(p.stat().st_size > 0 for p in incomplete(hf_home)), 60, "partial downloads")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        held = {p.name.split(".")[0]: p.stat().st_size for p in incomplete(hf_home)}
        assert held and any(size > 0 for size in held.values())
        hub.throttle = None
        hub.requests.clear()
        rerun = hubmerge("pull", REPO, "--select", "{last: 2}", "-q", "--endpoint", hub.url, env=env)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        gets = [r for r in hub.requests if r.method == "GET" and r.port != hub.port]
    assert incomplete(hf_home) == []
    # A blob whose leftover held bytes is fetched from where the leftover ended (besides the header probe).
    for sha, size in held.items():
        ranges = [r.range for r in gets if f"/lfs/{sha}" in r.path and r.range != "bytes=0-100000"]
        if size > 0:
            assert ranges and all(r and int(r.split("=")[1].split("-")[0]) >= size for r in ranges), (size, ranges)
    assert any(size > 0 for size in held.values())
    # The cache holds the exact bytes: the client's own offline lookup finds both and they load.
    from safetensors.torch import load_file

    for i, name in enumerate(("step1000", "step2000")):
        ref = (hf_home / "hub" / "models--org--faulty" / "refs" / name).read_text()
        tensor = load_file(hf_home / "hub" / "models--org--faulty" / "snapshots" / ref / "model.safetensors")["w"]
        assert torch.equal(tensor, torch.randn(WEIGHT_BYTES // 4, generator=torch.Generator().manual_seed(i)))


def test_a_corrupt_leftover_is_deleted_and_the_file_downloaded_afresh(tmp_path):
    hf_home = tmp_path / "hf"
    with HubServer(tmp_path / "store") as hub:
        seed(hub.url, tmp_path / "ckpts", revisions=1)
        from huggingface_hub import HfApi

        info = next(
            f
            for f in HfApi(endpoint=hub.url, token="hf_test").list_repo_tree(REPO, revision="step1000")
            if f.path == "model.safetensors"
        )
        blobs = hf_home / "hub" / "models--org--faulty" / "blobs"
        blobs.mkdir(parents=True)
        (blobs / f"{info.lfs.sha256}.deadbeef.incomplete").write_bytes(b"\0" * 1000)  # not the file's first bytes
        proc = hubmerge("pull", REPO, "--select", "{last: 1}", "-q", "--endpoint", hub.url, env=env_for(hf_home))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert incomplete(hf_home) == []
    assert (blobs / info.lfs.sha256).stat().st_size == info.size
