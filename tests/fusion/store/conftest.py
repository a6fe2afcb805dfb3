"""Fixtures for the chunk-store tests: an empty store of every backend (Redis: the root conftest's server)."""

from __future__ import annotations

import pytest
import torch

BACKENDS = ["memory", "local", "redis", "redis-parts"]


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    """An empty store of each backend, by URL."""
    if request.param == "memory":
        return "memory://"
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "redis-parts":  # every chunk in parts of 256 bytes
        return request.getfixturevalue("fresh_redis") + "?part=256"
    return request.getfixturevalue("fresh_redis")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models compute faster on one thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
