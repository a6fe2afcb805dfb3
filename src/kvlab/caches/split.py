"""The skeleton FlexGen and KVPR caches share: each layer's positions split in two.

Positions `[0, split)` are held near the compute (FlexGen: resident K/V on the device; KVPR:
the layer's input activations, from which K/V are recomputed); positions `[split, s)` are K/V
rows in a `RowStore` (host memory or a memory-mapped file) that are brought into a device
landing buffer before the layer's attention. The cache fetches layer i+1 while layer i runs
(on a side stream on CUDA), checks that what landed is still what the layer holds, and hands
attention the whole: near part, landed far part, then the new rows.

The split is one length for every layer, fixed by the policy at the cache's first update.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from kvlab.caches.registry import CachePolicy
from kvlab.caches.staging import Landing, Mover
from kvlab.caches.tiers import RowStore, make_store
from kvlab.errors import KvlabError
from kvlab.params import render

# length of the first update -> split length, or (split length, why this length)
SplitRule = Callable[[int], "int | tuple[int, str]"]


class SplitLayer(CacheLayerMixin):
    """One layer: near part `[0, split)` (subclass), far K/V rows `[split, length)` in a store."""

    is_croppable = True
    is_sliding = False
    near_holds_new = False  # `near(n)` returns stored rows as they are (device views), new ones included

    def __init__(self, cache: "SplitCache", index: int) -> None:
        super().__init__()
        self.cache = cache
        self.index = index
        self.length = 0
        self.version = 0  # bumped when rows are dropped, so stale landings are never used
        self.far: RowStore | None = None
        self._landing: tuple[tuple[int, int, int], dict[str, Landing]] | None = None

    # ---- what a subclass provides ------------------------------------------------------
    def near(self, count: int, landed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[b, kv, count, d]` of positions `[0, count)` on the device."""
        raise NotImplementedError

    def store_near(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep new positions `[start, start + n)` (all below the split)."""
        raise NotImplementedError

    def near_plan(self) -> dict[str, torch.Tensor]:
        """Host rows the near part needs on the device each step (lane -> rows)."""
        return {}

    def drop_near(self, length: int) -> None:
        """Forget near positions from `length` on."""
        raise NotImplementedError

    @property
    def near_device_bytes(self) -> int:
        return 0

    def empty_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of no positions, shaped like this layer's."""
        batch, kv_heads, head_dim = self.far.row_shape[1:]
        empty = torch.empty((batch, kv_heads, 0, head_dim), dtype=self.dtype, device=self.device)
        return empty, empty

    def stores(self) -> list[RowStore | None]:
        """The host/disk stores this layer writes to."""
        return [self.far]

    # ---- transformers' layer contract ----------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, kv_heads, _, head_dim = key_states.shape
        self.far = self.cache.new_store((2, batch, kv_heads, head_dim), key_states.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.cache.resolve_split(key_states.shape[-2])
            self.lazy_initialization(key_states, value_states)
        start, new = self.length, key_states.shape[-2]
        end = start + new
        cut = max(0, min(self.split - start, new))  # new rows that belong to the near part
        if cut:
            self.store_near(start, key_states[:, :, :cut], value_states[:, :, :cut])
        if cut < new:
            rows = torch.stack((key_states[:, :, cut:], value_states[:, :, cut:])).permute(3, 0, 1, 2, 4)
            self.far.append(rows)
        if start == 0:
            keys, values = key_states, value_states
        elif end <= self.split and self.near_holds_new:
            keys, values = self.near(end, {})  # everything is near, new rows included: no copy
            self._landing = None
        else:
            # `length` is still `start` here: what landed is rows [0, start), whatever was just stored
            landed = self.take_landed()
            near_k, near_v = self.near(min(self.split, start), landed)
            far = landed.get("kv")
            parts_k, parts_v = [near_k], [near_v]
            if far is not None and far.shape[0]:
                parts_k.append(far[:, 0].permute(1, 2, 0, 3))
                parts_v.append(far[:, 1].permute(1, 2, 0, 3))
            keys = torch.cat([*parts_k, key_states], dim=-2)
            values = torch.cat([*parts_v, value_states], dim=-2)
        self.length = end
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.truncate(self.length + tokens_to_remove)

    def truncate(self, length: int) -> None:
        length = max(0, length)
        self.drop_near(min(length, self.split))
        self.far.truncate(max(0, length - self.split))
        self.length = min(self.length, length)
        self.version += 1

    def reset(self) -> None:
        if self.is_initialized:
            self.truncate(0)
        self.far = None
        self.is_initialized = False
        self._landing = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise KvlabError(f"cache={self.cache.policy_name} does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise KvlabError(f"cache={self.cache.policy_name} does not support repeating batch rows")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise KvlabError(f"cache={self.cache.policy_name} does not support selecting batch rows")

    # ---- fetching -----------------------------------------------------------------------
    @property
    def split(self) -> int:
        return self.cache.split

    def _tag(self) -> tuple[int, int, int]:
        return (self.version, self.length, self.split if self.cache.split is not None else -1)

    def fetch_plan(self) -> dict[str, torch.Tensor]:
        """Host rows to land before this layer's next attention: near-part inputs and far K/V."""
        if not self.is_initialized or self.length == 0:
            return {}
        plan = self.near_plan()
        if self.length > self.split:
            plan["kv"] = self.far.rows(0, self.length - self.split)
        return plan

    def start_fetch(self) -> None:
        """Queue this layer's rows into the next landing buffer, unless what landed is still current."""
        tag = self._tag()
        if self._landing is not None and self._landing[0] == tag:
            return
        plan = self.fetch_plan()
        mover = self.cache.mover
        slot = mover.next_slot() if plan else 0
        self._landing = (tag, {lane: mover.fetch(lane, slot, rows) for lane, rows in plan.items()})

    def take_landed(self) -> dict[str, torch.Tensor]:
        self.start_fetch()  # no-op when the prefetch is current
        _, landings = self._landing
        self._landing = None
        return {lane: self.cache.mover.ready(landing) for lane, landing in landings.items()}

    # ---- reading back -------------------------------------------------------------------
    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full K and V `[b, kv, length, d]` on the device, without touching the counters."""
        if not self.is_initialized:
            raise ValueError("a cache layer was never filled; was the model run with this cache?")
        self.far.sync()
        landed = {lane: rows.to(self.device) for lane, rows in self.near_plan().items()}
        near_k, near_v = self.near(min(self.split, self.length), landed)
        far = self.far.rows(0, max(0, self.length - self.split)).to(self.device)
        keys = torch.cat([near_k, far[:, 0].permute(1, 2, 0, 3)], dim=-2)
        values = torch.cat([near_v, far[:, 1].permute(1, 2, 0, 3)], dim=-2)
        return keys, values


class SplitCache(Cache):
    """A transformers `Cache` of `SplitLayer`s sharing one split, one mover and one tier."""

    policy_name = "split"

    def __init__(self, layers: list[SplitLayer], *, device: torch.device | str, rule: SplitRule,
                 tier: str = "host", directory: str | os.PathLike | None = None,
                 lanes: tuple[str, ...] = ("kv",), max_length: int | None = None) -> None:
        super().__init__(layers=layers)
        self.device = torch.device(device)
        self.mover = Mover(self.device, lanes)
        self.tier = tier
        self.directory = directory
        self.max_length = max_length
        self.split: int | None = None
        self.split_reason = ""
        self._rule = rule

    def resolve_split(self, first_length: int) -> int:
        """Fix the split at the first update (all layers share it)."""
        if self.split is None:
            chosen = self._rule(first_length)
            length, reason = chosen if isinstance(chosen, tuple) else (chosen, "")
            self.split, self.split_reason = max(0, int(length)), reason
        return self.split

    def new_store(self, row_shape: tuple[int, ...], dtype: torch.dtype, *, near: bool = False) -> RowStore:
        capacity = 0
        if self.max_length is not None and self.split is not None:
            capacity = min(self.split, self.max_length) if near else max(0, self.max_length - self.split)
        return make_store(self.tier, row_shape, dtype, device=self.device, directory=self.directory,
                          capacity=capacity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.start_fetch()
        following = (layer_idx + 1) % len(self.layers)
        if following != layer_idx:
            self.layers[following].start_fetch()  # lands while this layer computes
        return layer.update(key_states, value_states)

    def reset(self) -> None:
        super().reset()
        self.split = None

    # ---- figures --------------------------------------------------------------------------
    def bytes_moved(self) -> int:
        """Bytes that crossed between device and host (or disk) so far, both directions."""
        stores = [s for layer in self.layers for s in layer.stores() if s is not None]
        return self.mover.bytes_in + sum(s.bytes_in for s in stores)

    def device_bytes(self) -> int:
        """Device bytes this cache holds: the near parts kept there and the landing buffers."""
        return self.mover.nbytes + sum(layer.near_device_bytes for layer in self.layers)

    def export_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.materialize() for layer in self.layers]

    def close(self) -> None:
        """Drop every layer's rows (tier=disk files go at once) and the landing buffers."""
        self.reset()
        self.mover = Mover(self.device, self.mover.lanes)


class SplitPolicy(CachePolicy):
    """What the FlexGen and KVPR policies share: a `SplitCache` and a short spec."""

    def export(self, cache):
        return cache.export_layers(), {}

    def spec(self) -> str:
        """`name:p=v,...` with only the parameters that differ from their defaults, flags bare (`auto`)."""
        items = [f.name if value is True else f"{f.name}={render(value)}"
                 for f in dataclasses.fields(self)
                 if (value := getattr(self, f.name)) != f.default]
        return self.name + (":" + ",".join(items) if items else "")
