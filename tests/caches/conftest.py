"""Fixtures for the cache-policy tests.

The tiny models' matrices are far too small to split across threads: on a busy 2-core machine
the second thread only adds waiting, so these tests run torch on one thread (restored after).
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
