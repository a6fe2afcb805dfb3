"""The engines as plain data: their names, cache types and the run-spec keys each takes.

What a run spec needs to parse and print an engine run, and what a diff needs to judge one,
without the engine runners (which load models and capture under run specs): this module
imports nothing above the cache-policy registry, so `kvlab.runspec` can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvlab.caches.registry import CachePolicy
from kvlab.errors import KvlabError
from kvlab.params import ParamError

LLAMA_CPP = "llama.cpp"
VLLM = "vllm"
_CACHE_TYPES = {LLAMA_CPP: ("f16", "f32", "q8_0", "q4_0"), VLLM: ("auto", "fp8")}  # the first is the default
_LOSSLESS_TYPES = ("f32", "f16", "auto")  # rounding only: the tolerance follows their precision
_PRECISIONS = {"f32": "float32", "f16": "float16", "auto": "float32", "fp8": "float8_e4m3fn"}
# the run-spec keys each engine takes besides engine= (vLLM spells its cache type kv_cache_dtype=)
_SETTINGS = {LLAMA_CPP: ("cache", "fa", "rope_base"), VLLM: ("cache", "kv_cache_dtype", "scales")}
CACHE_KEY = {VLLM: "kv_cache_dtype"}  # how an engine's cache type is written in a run spec (default cache=)
# engines whose matmuls round beyond the run's dtype (llama.cpp: GGUF weights times 8-bit activations);
# vLLM runs the same float weights in the same dtype as transformers
_OWN_ARITHMETIC = (LLAMA_CPP,)


def engine_names() -> list[str]:
    return ["transformers", *_CACHE_TYPES]


@dataclass(frozen=True)
class EngineCache(CachePolicy):
    """An engine's cache type (`cache=q8_0` under `engine=llama.cpp`): a name, not a transformers cache."""

    engine: str = LLAMA_CPP
    type: str = "f16"

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        return self.type in _LOSSLESS_TYPES

    @property
    def precision(self) -> str | None:
        """The torch dtype its rows round to, for the diff's tolerance (None: quantized)."""
        return _PRECISIONS.get(self.type)

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None):
        raise KvlabError(f"cache={self.type} is a {self.engine} cache type: run it with engine={self.engine}")

    def params(self) -> dict[str, Any]:
        return {}

    def spec(self) -> str:
        return self.type


def own_arithmetic(engine: str) -> bool:
    """Whether `engine` computes with other numbers than transformers would in the same dtype."""
    return engine in _OWN_ARITHMETIC


def engine_settings(engine: str) -> tuple[str, ...]:
    """The run-spec keys `engine` takes besides engine= itself."""
    return _SETTINGS[engine]


def engine_cache(engine: str, name: str | None) -> EngineCache:
    """The cache type `name` of `engine` (its default when None); ParamError lists the allowed ones."""
    allowed = _CACHE_TYPES[engine]
    if name is None:
        return EngineCache(engine, allowed[0])
    if name not in allowed:
        key = CACHE_KEY.get(engine, "cache")
        raise ParamError(f"{key}={name} is not a {engine} cache type; allowed: {', '.join(allowed)}")
    return EngineCache(engine, name)
