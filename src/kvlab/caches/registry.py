"""The cache-policy registry: one name per way of holding the KV cache.

A policy is a frozen dataclass whose fields are its parameters (kvpress style). It builds a
transformers `Cache` for a model, may install what it needs around a run in a `with` block
(hooks, an attention function) that always removes it, and says how its cache reads back as
full-precision K/V for a snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from kvlab.params import ParamError, build_params, registrar, render

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel

_POLICIES: dict[str, type["CachePolicy"]] = {}


class CachePolicy:
    """Base of every cache policy."""

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True  # same logits as the exact cache in float32

    def validate(self) -> None:
        """Cross-parameter checks; raise ValueError with a one-line reason."""

    def build(self, model: "PreTrainedModel", *, batch_size: int = 1, max_length: int | None = None) -> "Cache":
        raise NotImplementedError

    def session(self, model: "PreTrainedModel") -> contextlib.AbstractContextManager:
        """Context for a run with this policy's cache (hooks, attention); nothing by default."""
        return contextlib.nullcontext()

    def export(self, cache: "Cache") -> tuple[list[tuple["torch.Tensor", "torch.Tensor"]], dict[str, "torch.Tensor"]]:
        """K/V per layer as `[batch, kv_heads, seq, head_dim]` tensors, plus extra tensors to store.

        Quantized policies return the dequantized view and may add raw payloads
        (`layers.{i}.keys.q`, its parts `layers.{i}.keys.{part}`, the unquantized tail
        `layers.{i}.keys.hot`: docs/DESIGN.md, "Raw quantized payloads").
        """
        layers = []
        for layer in cache.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None:
                raise ValueError("a cache layer was never filled; was the model run with this cache?")
            layers.append((keys, values))
        return layers, {}

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}

    def spec(self) -> str:
        """The canonical string: `name` or `name:p=v,...` (parameters that are set)."""
        items = [f"{k}={render(v)}" for k, v in self.params().items() if v is not None]
        return self.name + (":" + ",".join(items) if items else "")

    def __str__(self) -> str:
        return self.spec()


register = registrar(_POLICIES, "cache policy")
"""Class decorator: `@register(name)` makes a CachePolicy dataclass available as `cache=name`."""


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def policy_class(name: str) -> type[CachePolicy]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise ParamError(f"cache={name}: unknown cache policy; allowed: {', '.join(policy_names())}") from None


def make_policy(name: str, items: list[str] | None = None) -> CachePolicy:
    """Build policy `name` from `p=v` strings, with one-line errors (ParamError)."""
    cls = policy_class(name)
    where = f"cache={name}"
    kwargs = build_params(cls, items or [], where)
    try:
        policy = cls(**kwargs)
        policy.validate()
    except (ValueError, TypeError) as err:
        raise ParamError(f"{where}: {err}") from None
    return policy


def parse_policy(text: str) -> CachePolicy:
    """`mixed:bits=4,hot=128` -> a validated policy."""
    name, _, rest = text.partition(":")
    items = [item for item in (part.strip() for part in rest.split(",")) if item]
    return make_policy(name.strip(), items)
