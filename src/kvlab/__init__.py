"""kvlab: a workbench for the KV cache of transformer language models.

The package never talks to a model hub: everything it loads is on disk or built in memory.
"""

from __future__ import annotations

import os as _os

# Set before transformers or huggingface_hub is imported anywhere in the process.
_os.environ["HF_HUB_OFFLINE"] = "1"
_os.environ["TRANSFORMERS_OFFLINE"] = "1"
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

# Public names, imported lazily so that `kvlab --help` does not pay for torch.
_EXPORTS = {
    "KvlabError": "kvlab.errors",
    "RunSpec": "kvlab.runspec",
    "Snapshot": "kvlab.snapshot",
    "capture": "kvlab.capture",
    "load_model": "kvlab.models",
    "list_models": "kvlab.models",
    "LoadedModel": "kvlab.models",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
