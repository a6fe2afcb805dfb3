"""What the engine tests share: skipping cleanly where llama-cpp-python is not installed."""

from __future__ import annotations

import pytest


def need_llama_cpp() -> None:
    """Skip (with the reason) unless `import llama_cpp` works here."""
    from kvlab.engines.llamacpp import EngineUnavailable, require

    try:
        require()
    except EngineUnavailable as err:
        pytest.skip(str(err))
