"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUTS = ("hubmerge-results", "hubmerge-stability", "out")  # what commands write to the cwd by default

# Tests use tiny models: one torch thread is fastest, and on a busy 2-core machine a second thread's
# OpenMP spin-waits made them many times slower.
torch.set_num_threads(1)


@pytest.fixture
def hub(tmp_path):
    """A running local Hub (hubmerge.devhub) on a free loopback port, storing under tmp_path."""
    from hubmerge.devhub import HubServer

    with HubServer(tmp_path / "hub") as server:
        yield server


@pytest.fixture
def hub_api(hub):
    """The real client aimed at the local Hub; endpoint= is explicit because HF_ENDPOINT is read at import."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token="hf_test")


@pytest.fixture
def client(hub):
    """hubmerge's one Hub context, aimed at the local Hub with a token it accepts."""
    from hubmerge.hub.client import HubClient

    return HubClient(endpoint=hub.url, token="hf_test", offline=False)


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """A fresh, empty HF cache per test; huggingface_hub reads HF_HUB_CACHE once at import, so both are set."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "hubmerge-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def lm_hub(tmp_path_factory):
    """One dev Hub for the tests that build lm-eval output: tiny checkpoints as ``stepN`` branches."""
    from hubmerge.devhub import HubServer

    with HubServer(tmp_path_factory.mktemp("lm-hub")) as server:
        yield server


@pytest.fixture(scope="session")
def archive(tmp_path_factory, lm_hub):
    """lm-eval's own output for four revisions on ``lm_hub`` (see tests/lm_eval_archive.py); built once."""
    pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install 'hubmerge[lm-eval]'")
    from lm_eval_archive import build_archive

    return build_archive(tmp_path_factory.mktemp("lm-eval"), lm_hub.url)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """lm-eval loads task data through ``datasets``, which reads its cache folder at import: point it at tmp."""
    config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path / "datasets-cache"


@pytest.fixture(scope="session", autouse=True)
def no_outputs_in_the_checkout():
    """A test that forgets --results or --out writes into the checkout: fail the session rather than litter it."""
    before = {name for name in DEFAULT_OUTPUTS if (ROOT / name).exists()}
    yield
    left = sorted(name for name in DEFAULT_OUTPUTS if (ROOT / name).exists() and name not in before)
    assert not left, f"tests wrote {', '.join(left)} into {ROOT}; pass --results / --out under tmp_path"


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a test drops the files the workers' test-only fault hook looks for."""
    return tmp_path_factory.mktemp("ray-crash")


@pytest.fixture(scope="module")
def ray_cluster(crash_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One local Ray instance per test module, two CPUs (two worker processes at a time), whose workers see the
    fault hook's folder and have caches of their own (HF cache, hubmerge's hash cache), as a worker on another
    node would: what they need of the Hub they fetch themselves. Without the extra, the tests that need it are
    skipped (the one-line error without Ray is tested either way)."""
    ray = pytest.importorskip("ray")
    from hubmerge.io.cluster import CRASH_HOOK_ENV

    home = tmp_path_factory.mktemp("ray-worker-home")
    env = {
        CRASH_HOOK_ENV: str(crash_dir),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_CACHE": str(home / "hf" / "hub"),
        "HUBMERGE_CACHE": str(home / "hubmerge"),
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()
