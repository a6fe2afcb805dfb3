"""One torch thread for a test package (restored after): imported as an autouse fixture by the
conftests of packages whose tiny models' matrices are far too small to split across threads (on a
busy 2-core machine the second thread only adds waiting)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
