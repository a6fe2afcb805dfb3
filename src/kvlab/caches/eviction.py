"""Eviction cache policies: keep some past tokens, drop the rest, keep true positions.

`cache=streaming:sink=4,window=W` (StreamingLLM): the first `sink` tokens and the last
`window` tokens stay; everything between is dropped as the sequence grows.
`cache=snapkv:capacity=C,kernel=5,pool=avg|max,window=32` (SnapKV): after the prompt, each KV
head keeps the `capacity - window` prompt tokens that the observation window (the last
`window` prompt tokens; in a fused prefill, the question) attends to most, pooled over
`kernel` neighbours, plus the window itself; decoding then appends.

Held tokens keep the keys and positions they were computed at, and the layer reports the true
sequence length, so new tokens get the positions they would have without eviction; the mask
lets them see every held token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvlab.caches.model_parts import attention_modules
from kvlab.caches.registry import CachePolicy, register
from kvlab.caches.taps import attention_taps, last_rows_attention


class EvictingLayer(DynamicLayer):
    """A DynamicLayer that holds a subset of the past; `positions[h]` are head h's held positions."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None  # [kv_heads, held] long

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.positions = torch.zeros(key_states.shape[1], 0, dtype=torch.long, device=key_states.device)

    @property
    def held(self) -> int:
        return 0 if not self.is_initialized else int(self.keys.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        new = torch.arange(self.seen, self.seen + n, device=self.positions.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new.expand(self.positions.shape[0], n)], dim=-1)
        self.seen += n
        out = self.keys, self.values
        self.after_update()
        return out

    def after_update(self) -> None:
        """Eviction that happens as the sequence grows (none by default)."""

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Held tokens sit at indices before the new ones; an offset of seen - held maps every
        # held index to a position before the first new token, and new ones to their own.
        return self.held + query_length, self.seen - self.held

    def keep(self, index: torch.Tensor) -> None:
        """Keep `index` `[kv_heads, m]` (or `[m]` for every head) of the held tokens, in that order."""
        if index.dim() == 1:
            index = index.expand(self.keys.shape[1], -1)
        index = index.to(self.keys.device)
        gather = index[None, :, :, None].expand(self.keys.shape[0], -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(1, index)

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("an evicting cache cannot be cropped")


class StreamingLayer(EvictingLayer):
    def __init__(self, sink: int, window: int) -> None:
        super().__init__()
        self.sink, self.window = sink, window

    def after_update(self) -> None:
        if self.held > self.sink + self.window:
            held = self.held
            index = torch.cat([torch.arange(self.sink), torch.arange(held - self.window, held)])
            self.keep(index)


class EvictionPolicy(CachePolicy):
    """A cache policy whose layers are EvictingLayers."""

    lossless = False
    observes = False  # needs the observation window's attention after the prompt

    def layer(self) -> EvictingLayer:
        raise NotImplementedError

    def build(self, model, *, batch_size: int = 1, max_length: int | None = None) -> Cache:
        n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        return Cache(layers=[self.layer() for _ in range(n_layers)])

    def reduce(self, probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
        """Observation attention `[heads, rows, keys]` -> one score per KV head and key `[kv, keys]`."""
        per_head = probs.sum(dim=1)
        return per_head.reshape(n_kv_heads, -1, per_head.shape[-1]).mean(dim=1)

    def compress(self, layer: EvictingLayer, scores: torch.Tensor | None, window: int) -> None:
        """Evict after a prompt whose last `window` tokens observed the rest with `scores` `[kv, held]`."""

    def adopt(self, cache: Cache, scores: dict[int, torch.Tensor] | None = None, window: int = 1) -> Cache:
        """This policy's cache holding `cache`'s K/V (positions 0..n-1), evicted after the prompt."""
        layers = []
        for index, source in enumerate(cache.layers):
            layer = self.layer()
            layer.update(source.keys, source.values)
            self.compress(layer, (scores or {}).get(index), window)
            layers.append(layer)
        return Cache(layers=layers)


@register("streaming")
@dataclass(frozen=True)
class StreamingPolicy(EvictionPolicy):
    """StreamingLLM: attention sinks plus a recent window."""

    sink: int = 4
    window: int = 256

    def validate(self) -> None:
        if self.sink < 0:
            raise ValueError(f"sink must be at least 0, got {self.sink}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")

    def layer(self) -> EvictingLayer:
        return StreamingLayer(self.sink, self.window)


@register("snapkv")
@dataclass(frozen=True)
class SnapKVPolicy(EvictionPolicy):
    """SnapKV: per KV head, the prompt tokens the observation window attends to most."""

    observes = True
    capacity: int = 1024
    kernel: int = 5
    pool: Literal["avg", "max"] = "avg"
    window: int = 32  # observation window of a plain run; a fused prefill observes with its question

    def validate(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd width of at least 1, got {self.kernel}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")

    def layer(self) -> EvictingLayer:
        return EvictingLayer()

    def keep_index(self, scores: torch.Tensor, window: int) -> torch.Tensor | None:
        """Held indices to keep `[kv, capacity]`, sorted by position; None when everything fits."""
        n_kv, held = scores.shape
        if held <= self.capacity:
            return None
        window = min(window, self.capacity)
        observed = held - window
        budget = self.capacity - window
        tail = torch.arange(observed, held).expand(n_kv, -1)
        if budget == 0:
            return tail
        s = scores[:, :observed].float()[:, None]
        pad = self.kernel // 2
        if self.pool == "avg":
            pooled = torch.nn.functional.avg_pool1d(s, self.kernel, stride=1, padding=pad, count_include_pad=False)
        else:
            pooled = torch.nn.functional.max_pool1d(s, self.kernel, stride=1, padding=pad)
        top = torch.topk(pooled[:, 0], budget, dim=-1).indices.sort(dim=-1).values
        return torch.cat([top.cpu(), tail], dim=-1)

    def compress(self, layer: EvictingLayer, scores: torch.Tensor | None, window: int) -> None:
        if layer.held <= self.capacity:
            return
        if scores is None:
            raise RuntimeError("snapkv needs the observation window's attention to evict")
        layer.keep(self.keep_index(scores, window))

    @contextlib.contextmanager
    def session(self, model):
        """Observe each layer's last `window` prompt queries, then evict right after its attention."""
        pending: dict[int, tuple[torch.Tensor, int]] = {}

        def tap(module, query, key, attention_mask, kwargs):
            if query.shape[-2] > 1:
                rows = min(self.window, query.shape[-2])
                probs = last_rows_attention(query, key, rows, kwargs.get("scaling"))
                pending[module.layer_idx] = (self.reduce(probs, key.shape[1]), rows)

        def after(module, args, kwargs, output):
            item = pending.pop(getattr(module, "layer_idx", -1), None)
            cache = kwargs.get("past_key_values")
            if item is not None and cache is not None:
                layer = cache.layers[module.layer_idx]
                if isinstance(layer, EvictingLayer):
                    self.compress(layer, item[0], item[1])

        modules = attention_modules(model)
        handles = [m.register_forward_hook(after, with_kwargs=True) for m in modules]
        try:
            with attention_taps(model, {i: tap for i in range(len(modules))}):
                yield
        finally:
            for handle in handles:
                handle.remove()
