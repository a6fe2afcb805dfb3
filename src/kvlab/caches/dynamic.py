"""`cache=dynamic`: transformers' DynamicCache, the exact cache every other policy is checked against."""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.caches.registry import CachePolicy, register


@register("dynamic")
@dataclass(frozen=True)
class DynamicPolicy(CachePolicy):
    """What `model.generate` uses by default: full precision, grows by concatenation."""

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
