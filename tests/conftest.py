"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch

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
