"""kvlab: a workbench for the KV cache of transformer language models.

The package never talks to a model hub: everything it loads is on disk or built in memory.
"""

from __future__ import annotations

import os as _os

# Set before transformers or huggingface_hub is imported anywhere in the process.
_os.environ["HF_HUB_OFFLINE"] = "1"
_os.environ["TRANSFORMERS_OFFLINE"] = "1"
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# `capture` is both a submodule and the function it exports. Importing the submodule would
# bind the module over a lazily exported function, so the function is bound here, eagerly.
from kvlab.capture import capture  # noqa: E402
from kvlab.version import __version__  # noqa: E402

# Other public names are imported lazily.
_EXPORTS = {
    "KvlabError": "kvlab.errors",
    "RunSpec": "kvlab.runspec",
    "Snapshot": "kvlab.snapshot",
    "load_model": "kvlab.models",
    "list_models": "kvlab.models",
    "LoadedModel": "kvlab.model_facts",
}

__all__ = sorted([*_EXPORTS, "capture"]) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
