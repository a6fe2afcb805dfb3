"""`cache=offload`: transformers' own offloaded cache, the baseline the split caches must beat.

transformers' `DynamicCache(offloading=True)` keeps every layer's K/V on the host; before a
layer's update it prefetches the next layer's K/V to the device on a side stream, and after
the update it sends the layer's K/V (now one token longer) back to the host.

Its streams are CUDA streams: on a machine without CUDA it fails with "Torch not compiled with
CUDA enabled". On a CPU device the host *is* the device, so there is nothing to offload to;
kvlab then builds `HostOffloadedCache`, which runs the same schedule (copy the next layer in,
update, copy this layer out) with the transfers as plain copies: the same K/V and logits as
`dynamic`, plus the cost of the copies, so CPU runs of the decode benchmark compare like with
like. On CUDA the policy is transformers' cache, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvlab.caches.registry import CachePolicy, register


class HostOffloadedCache(DynamicCache):
    """transformers' offloading schedule with device == host: each transfer is one copy."""

    def __init__(self, config) -> None:
        super().__init__(config=config)
        self.bytes_copied = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        following = (layer_idx + 1) % len(self.layers)
        if following != layer_idx:
            self._copy(following)  # the prefetch of the next layer
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        self._copy(layer_idx)  # the offload of this layer
        return keys, values

    def _copy(self, index: int) -> None:
        layer = self.layers[index]
        if layer.is_initialized and layer.keys.numel():
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
            self.bytes_copied += 2 * layer.keys.numel() * layer.keys.element_size()

    def bytes_moved(self) -> int:
        return self.bytes_copied

    def device_bytes(self) -> int:
        """What the schedule keeps on a device: the layer computing and the one prefetched."""
        sizes = sorted((2 * layer.keys.numel() * layer.keys.element_size()
                        for layer in self.layers if layer.is_initialized), reverse=True)
        return sum(sizes[:2])


@register("offload")
@dataclass(frozen=True)
class OffloadPolicy(CachePolicy):
    """transformers' `DynamicCache(offloading=True)` on CUDA; on a CPU device, the same schedule
    with copies (`HostOffloadedCache`), since transformers' version needs CUDA streams."""

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None):
        if model.device.type == "cuda":
            return DynamicCache(config=model.config, offloading=True)
        return HostOffloadedCache(model.config)

    @staticmethod
    def note(device: torch.device | str) -> str:
        """What this policy runs on `device`, in one line."""
        if torch.device(device).type == "cuda":
            return "transformers DynamicCache(offloading=True)"
        return "transformers' offload schedule with device == host (copies; its own needs CUDA)"
