"""Fixtures for the offload tests: torch on one thread (see tests/threads.py), a temporary kvlab home."""

from __future__ import annotations

import pytest

from tests.threads import one_thread  # noqa: F401  (autouse)


@pytest.fixture
def hw_home(tmp_path, monkeypatch):
    """KVLAB_HOME in a temporary folder: hw_metrics.json is written and read there."""
    monkeypatch.setenv("KVLAB_HOME", str(tmp_path))
    return tmp_path
