"""RAG KV fusion: chunk caches computed once, stored, and fused into a prompt's cache.

    precompute("smollm2", "tasks.jsonl", "runs/chunks")     # each distinct chunk computed once
    store = open_store("runs/chunks")                        # or redis://host:port/db, memory://
    prompt = task_prompt(loaded, task)                       # prefix + chunks + question, as token ids
    reply = answer(loaded, prompt, make_strategy("a3", 0.15), store)   # text, TTFT, the prefill
    result = evaluate(loaded, tasks, expand(["a3", "cacheblend"], [0.15]), store)
    why = explain(loaded, prompt, task, make_strategy("a3", 0.15), store)

Names load on first use: opening a store needs neither transformers nor the model code that a
fused prefill runs.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_EXPORTS = {
    "ChunkStore": "kvlab.fusion.store",
    "open_store": "kvlab.fusion.store",
    "precompute": "kvlab.fusion.precompute",
    "FusionPrompt": "kvlab.fusion.prompt",
    "build_prompt": "kvlab.fusion.prompt",
    "task_prompt": "kvlab.fusion.prompt",
    "Strategy": "kvlab.fusion.strategies",
    "make_strategy": "kvlab.fusion.strategies",
    "strategy_names": "kvlab.fusion.strategies",
    "answer": "kvlab.fusion.fused",
    "prefill": "kvlab.fusion.fused",
    "evaluate": "kvlab.fusion.evaluate",
    "expand": "kvlab.fusion.evaluate",
    "make_tasks": "kvlab.fusion.evaluate",
    "write_report": "kvlab.fusion.report",
    "explain": "kvlab.fusion.explain",
    "write_explain_report": "kvlab.fusion.explain_report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(ModuleType):
    """Keeps `precompute`, `evaluate` and `explain` the functions after their modules are imported.

    Importing a submodule binds it on its package under its own name, which would hide the
    function of that name from `from kvlab.fusion import explain`. The module itself is
    `sys.modules["kvlab.fusion.explain"]`, what `from kvlab.fusion.explain import ...` reads.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _EXPORTS and isinstance(value, ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
