"""Engines: other implementations of the same model, run through their own interfaces.

A run spec with `engine=NAME` is captured by that engine instead of transformers, into a normal
kvlab snapshot (K/V in transformers' layout, per-step logits, token ids), so `kvlab diff`
compares it with a transformers golden run like any other test run. Engines so far:

- `llama.cpp` (`kvlab.engines.llamacpp`, through llama-cpp-python's low-level bindings):
  cache types `f32`, `f16`, `q8_0`, `q4_0` (K and V alike), `fa=on|off`, `rope_base=X`.
- `vllm` (`kvlab.engines.vllm`, vLLM in its own virtual environment and process):
  `kv_cache_dtype=auto|fp8` (the engine's cache type), `scales=DIR` (fp8 KV scales).

This package's names are the engines as data (`kvlab.engines.settings`, what a run spec reads)
and `engine_run`; it imports no runner: `kvlab.runner` sends a run to its engine's module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvlab.engines.settings import (
    CACHE_KEY,
    LLAMA_CPP,
    VLLM,
    EngineCache,
    engine_cache,
    engine_names,
    engine_settings,
    own_arithmetic,
)
from kvlab.errors import KvlabError

if TYPE_CHECKING:
    from kvlab.runspec import RunSpec

__all__ = ["CACHE_KEY", "LLAMA_CPP", "VLLM", "EngineCache", "engine_cache", "engine_names", "engine_run",
           "engine_settings", "own_arithmetic"]


def engine_run(run: "RunSpec | None", engine: str) -> "RunSpec":
    """`run` checked to be a run of `engine` (None: the engine's default run)."""
    from kvlab.runspec import RunSpec

    spec = RunSpec(engine=engine) if run is None else run
    if spec.engine_name != engine:
        raise KvlabError(f"a {engine} capture needs engine={engine}, not engine={spec.engine_name}")
    return spec
