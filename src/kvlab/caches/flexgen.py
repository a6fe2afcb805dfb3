"""`cache=flexgen`: each layer's K/V split by position, the first part resident on the device.

FlexGen (ICML 2023) places the KV cache partly on the accelerator and partly on the host or
disk. Here every layer keeps positions `[0, gpu_len)` on the compute device and the rest in
host memory (pinned on CUDA) or, with `tier=disk`, in a memory-mapped file; before the layer's
attention the far part lands in a device buffer (the next layer's on a side stream on CUDA)
and attention runs on the whole. Lossless: the same K/V, only stored elsewhere.

    cache=flexgen:gpu_ratio=0.5          half the positions resident
    cache=flexgen:gpu_len=1024,tier=disk
    cache=flexgen:auto,budget_gb=16      split from a device memory budget (cost model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from kvlab.caches.registry import register
from kvlab.caches.split import SplitCache, SplitLayer, SplitPolicy
from kvlab.errors import KvlabError
from kvlab.model_facts import model_shape
from kvlab.offload import costmodel
from kvlab.offload.hw import load_metrics

GIB = 2**30


class FlexGenLayer(SplitLayer):
    """Near part = K/V of `[0, split)` resident on the compute device, written in place into
    buffers of the split's length (or grown, when the cache's length is not known)."""

    near_holds_new = True

    def __init__(self, cache, index: int) -> None:
        super().__init__(cache, index)
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def near(self, count, landed):
        if self._keys is None:
            return self.empty_kv()
        return self._keys[:, :, :count], self._values[:, :, :count]

    def store_near(self, start, keys, values):
        end = start + keys.shape[-2]
        self._reserve(end, keys)
        self._keys[:, :, start:end].copy_(keys)
        self._values[:, :, start:end].copy_(values)

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        capacity = 0 if self._keys is None else self._keys.shape[-2]
        if need <= capacity:
            return
        known = self.cache.max_length
        grown = min(self.split, known) if known else min(self.split, max(need, int(capacity * 1.5), 64))
        shape = (*like.shape[:2], max(need, grown), like.shape[-1])
        keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        values = torch.empty_like(keys)
        if capacity:
            keys[:, :, :capacity].copy_(self._keys)
            values[:, :, :capacity].copy_(self._values)
        self._keys, self._values = keys, values

    def drop_near(self, length):
        pass  # rows past `length` are overwritten by the next store

    def reset(self) -> None:
        super().reset()
        self._keys = self._values = None

    @property
    def resident(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The resident K/V `[b, kv, n, d]` (views), or None before the first update."""
        if self._keys is None:
            return None
        count = min(self.split, self.length)
        return self._keys[:, :, :count], self._values[:, :, :count]

    @property
    def near_device_bytes(self) -> int:
        if self._keys is None:
            return 0
        return 2 * self._keys.numel() * self._keys.element_size()


class FlexGenCache(SplitCache):
    policy_name = "flexgen"

    def __init__(self, n_layers: int, **kwargs) -> None:
        super().__init__([FlexGenLayer(self, i) for i in range(n_layers)], **kwargs)


@register("flexgen")
@dataclass(frozen=True)
class FlexGenPolicy(SplitPolicy):
    """Positions `[0, gpu_len)` of every layer on the device, the rest on the host or disk.

    gpu_ratio: the resident share of the cache's full length (the `max_length` the cache was
        built for, else the prompt);
    gpu_len: the resident length in tokens;
    auto: the longest resident length that fits a device memory budget (`budget_gb`, else the
        device memory measured by `kvlab hw`), after weights, `reserve_gb` and staging;
    tier: where the far part lives; dir: the folder for tier=disk files (default: the temp folder).
    """

    gpu_ratio: float | None = None
    gpu_len: int | None = None
    auto: bool = False
    tier: Literal["host", "disk"] = "host"
    dir: str | None = None
    budget_gb: float | None = None
    reserve_gb: float | None = None

    def validate(self) -> None:
        given = [name for name, on in (("gpu_ratio", self.gpu_ratio is not None),
                                       ("gpu_len", self.gpu_len is not None), ("auto", self.auto)) if on]
        if len(given) != 1:
            raise ValueError("give exactly one of gpu_ratio=R, gpu_len=N or auto")
        if self.gpu_ratio is not None and not 0.0 <= self.gpu_ratio <= 1.0:
            raise ValueError(f"gpu_ratio={self.gpu_ratio} is not between 0 and 1")
        if self.gpu_len is not None and self.gpu_len < 0:
            raise ValueError(f"gpu_len={self.gpu_len} is negative")
        if self.dir is not None and self.tier != "disk":
            raise ValueError("dir= is the folder for tier=disk files; add tier=disk")
        if (self.budget_gb is not None or self.reserve_gb is not None) and not self.auto:
            raise ValueError("budget_gb and reserve_gb choose the auto split; add auto")
        for name in ("budget_gb", "reserve_gb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} is negative")

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None):
        rule = self._rule(model, batch_size, max_length)
        return FlexGenCache(model_shape(model.config)["n_layers"], device=model.device, rule=rule,
                            tier=self.tier, directory=self.dir, max_length=max_length)

    def _rule(self, model, batch_size: int, max_length: int | None):
        if self.gpu_len is not None:
            return lambda first: self.gpu_len
        if self.gpu_ratio is not None:
            return lambda first: math.floor(self.gpu_ratio * (max_length or first))

        shape = costmodel.ModelShape.from_model(model, batch=batch_size)
        budget = self._budget_bytes(model)
        reserve = int(self.reserve_gb * GIB) if self.reserve_gb is not None else costmodel.default_reserve(budget)
        weights = costmodel.weight_bytes(model)

        def rule(first: int):
            split = costmodel.flexgen_split(max_length or first, shape, budget=budget, weights=weights,
                                            reserve=reserve)
            return split.gpu_len, split.reason

        return rule

    def _budget_bytes(self, model) -> int:
        if self.budget_gb is not None:
            return int(self.budget_gb * GIB)

        metrics = load_metrics(str(model.device), need="device_memory_bytes", what="cache=flexgen:auto")
        budget = metrics.get("device_memory_bytes")
        if not budget:
            raise KvlabError("cache=flexgen:auto: no device memory figure; give budget_gb=")
        return int(budget)
