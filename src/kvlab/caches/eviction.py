"""Eviction cache policies: keep some past tokens, drop the rest, keep true positions.

`cache=streaming:sink=4,window=W` (StreamingLLM): the first `sink` tokens and the last
`window` tokens stay; everything between is dropped as the sequence grows.
`cache=snapkv:capacity=C,kernel=5,pool=avg|max,window=32,count_pad=false` (SnapKV): after the
prompt, each KV head keeps the `capacity - window` prompt tokens that the observation window
(the last `window` prompt tokens; in a fused prefill, the question) attends to most, pooled over
`kernel` neighbours, plus the window itself; decoding then appends. At the edges the average
leaves out the pooling's zero padding; `count_pad=true` counts it, as SnapKV's code and kvpress
do (`avg_pool1d`'s `count_include_pad=True`).

In a batch every row keeps what it would keep alone: SnapKV scores each row with its own
queries, and held positions have a batch axis. Rows must be of one length: a padded batch
(an attention mask with zeros) is refused, since eviction would treat padding as tokens.

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

from kvlab.caches.registry import CachePolicy, register
from kvlab.caches.taps import attention_taps, last_rows_attention
from kvlab.errors import KvlabError
from kvlab.intercept import intercept
from kvlab.model_facts import attention_modules


class EvictingLayer(DynamicLayer):
    """A DynamicLayer that holds a subset of the past; `positions[b, h]` are row b's head h's held positions."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.positions: torch.Tensor | None = None  # [batch, kv_heads, held] long

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=key_states.device)

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
        self.positions = torch.cat([self.positions, new.expand(*self.positions.shape[:2], n)], dim=-1)
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
        """Keep `index` of the held tokens, in that order: `[batch, kv_heads, m]` per row and head,
        `[kv_heads, m]` the same for every row, `[m]` the same for every row and head."""
        batch, heads = self.keys.shape[:2]
        index = index.to(self.keys.device)
        if index.dim() == 1:
            index = index.expand(heads, -1)
        if index.dim() == 2:
            index = index.expand(batch, -1, -1)
        if tuple(index.shape[:2]) != (batch, heads):
            raise ValueError(f"keep index of shape {tuple(index.shape)} does not fit {batch} rows of {heads} KV heads")
        gather = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(2, index)

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

    def session(self, model) -> contextlib.AbstractContextManager[None]:
        """Refuse a padded batch: eviction would count padding as tokens and keep it in place of them."""
        return intercept(model, pre=[(model, _refuse_padding)])

    def reduce(self, probs: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
        """Observation attention `[heads, rows, keys]` -> one score per KV head and key `[kv, keys]`."""
        per_head = probs.sum(dim=1)
        return per_head.reshape(n_kv_heads, -1, per_head.shape[-1]).mean(dim=1)

    def compress(self, layer: EvictingLayer, scores: torch.Tensor | None, window: int) -> None:
        """Evict after a prompt whose last `window` tokens observed the rest with `scores`
        `[batch, kv, held]` (or `[kv, held]` for a single row)."""

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
    """SnapKV: per batch row and KV head, the prompt tokens the observation window attends to most."""

    observes = True
    capacity: int = 1024
    kernel: int = 5
    pool: Literal["avg", "max"] = "avg"
    window: int = 32  # observation window of a plain run; a fused prefill observes with its question
    count_pad: bool = False  # pool=avg: count the zero padding at the edges (SnapKV's code, kvpress)

    def validate(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd width of at least 1, got {self.kernel}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.count_pad and self.pool != "avg":
            raise ValueError("count_pad applies to pool=avg only (max pooling never sees the padding)")

    def layer(self) -> EvictingLayer:
        return EvictingLayer()

    def pooled(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores `[rows, keys]` pooled over `kernel` neighbours, same shape."""
        s = scores.float()[:, None]
        pad = self.kernel // 2
        if self.pool == "avg":
            out = torch.nn.functional.avg_pool1d(s, self.kernel, stride=1, padding=pad,
                                                 count_include_pad=self.count_pad)
        else:
            out = torch.nn.functional.max_pool1d(s, self.kernel, stride=1, padding=pad)
        return out[:, 0]

    def keep_index(self, scores: torch.Tensor, window: int) -> torch.Tensor | None:
        """Held indices to keep, sorted by position: `[batch, kv, capacity]` for scores `[batch, kv, held]`
        (`[kv, capacity]` for `[kv, held]`); None when everything fits."""
        *lead, held = scores.shape
        if held <= self.capacity:
            return None
        window = min(window, self.capacity)
        observed = held - window
        budget = self.capacity - window
        tail = torch.arange(observed, held).expand(*lead, -1)
        if budget == 0:
            return tail
        pooled = self.pooled(scores[..., :observed].reshape(-1, observed)).reshape(*lead, observed)
        top = torch.topk(pooled, budget, dim=-1).indices.sort(dim=-1).values
        return torch.cat([top.cpu(), tail], dim=-1)

    def compress(self, layer: EvictingLayer, scores: torch.Tensor | None, window: int) -> None:
        if layer.held <= self.capacity:
            return
        if scores is None:
            raise RuntimeError("snapkv needs the observation window's attention to evict")
        if scores.dim() == 2:
            scores = scores.expand(layer.keys.shape[0], -1, -1)
        if scores.shape[0] != layer.keys.shape[0]:
            raise ValueError(f"scores for {scores.shape[0]} rows but the cache holds {layer.keys.shape[0]}")
        layer.keep(self.keep_index(scores, window))

    def row_scores(self, query: torch.Tensor, key: torch.Tensor, rows: int, scaling: float | None) -> torch.Tensor:
        """Each batch row's observation scores from its own last `rows` queries, `[batch, kv, keys]`."""
        return torch.stack([
            self.reduce(last_rows_attention(query[b:b + 1], key[b:b + 1], rows, scaling), key.shape[1])
            for b in range(query.shape[0])
        ])

    @contextlib.contextmanager
    def session(self, model):
        """Observe each layer's last `window` prompt queries, then evict right after its attention."""
        pending: dict[int, tuple[torch.Tensor, int]] = {}

        def tap(module, query, key, attention_mask, kwargs):
            if query.shape[-2] > 1:
                rows = min(self.window, query.shape[-2])
                pending[module.layer_idx] = (self.row_scores(query, key, rows, kwargs.get("scaling")), rows)

        def after(module, args, kwargs, output):
            item = pending.pop(getattr(module, "layer_idx", -1), None)
            cache = kwargs.get("past_key_values")
            if item is not None and cache is not None:
                layer = cache.layers[module.layer_idx]
                if isinstance(layer, EvictingLayer):
                    self.compress(layer, item[0], item[1])

        modules = attention_modules(model)
        with intercept(model, post=[(m, after) for m in modules]), super().session(model), \
                attention_taps(model, {i: tap for i in range(len(modules))}):
            yield


def _refuse_padding(module, args, kwargs) -> None:
    """A forward pre-hook: an attention mask with zeros means padded rows, which eviction cannot hold."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
        raise KvlabError("an evicting cache (streaming, snapkv) needs batch rows of one length: this batch is "
                         "padded (its attention mask has zeros); run rows of different lengths one at a time")
