"""Fixtures for the cache-policy tests: torch on one thread (see tests/threads.py)."""

from __future__ import annotations

from tests.threads import one_thread  # noqa: F401  (autouse)
