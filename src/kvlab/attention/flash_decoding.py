"""Flash-decoding over a cache split into parts: quantized blocks, then the hot window.

Each part gets its own partial softmax statistics (max score m, sum of exponentials l, and the
normalised output o), computed with the scale and the mask applied in that part; the parts
are merged with the log-sum-exp rule (REFERENCE "Flash-decoding"):
M = max m_c, L = sum l_c e^(m_c - M), out = sum e^(m_c - M) l_c o_c / L.
Only one part is dequantized at a time, so the working memory is one part, not the cache.

Transformers reaches it through `AttentionInterface` under the name `kvlab_split_k`:
`register()` makes it known, and a model runs it inside a `kvlab.intercept` block. A cache layer
that holds quantized blocks is `bind`-ed to an attention module for one forward call; for a
single-token query with a bound source, the keys and values handed over by the cache are the
hot window and the source yields the older parts. Anything else (prefill, an unbound module)
runs transformers' SDPA on what it is given. A source that offers `native_parts()` is read by
the compiled CPU kernel (`kvlab.attention.native`), which runs the same algorithm with each
block dequantized inside the loop; `flash_decode` below is the PyTorch path.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from kvlab.attention import native
from kvlab.intercept import register_attention

# transformers treats any kernel name containing "flash" as a flash-attention build to import
NAME = "kvlab_split_k"


class ColdSource(Protocol):
    """What a cache layer offers for the positions before its hot window."""

    def cold_parts(self, dtype: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) `[b, kv_heads, n, head_dim]` per part, in position order, from position 0."""
        ...

    def native_parts(self) -> "list[native.Part] | None":
        """The same parts as the compiled kernel reads them, or None to use `cold_parts`."""
        ...


@dataclass
class Partial:
    """Softmax statistics of one part, per (batch, KV head, query row): `[b, kv, rows, 1]` and o `[.., d]`."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the name the formulas use)
    o: torch.Tensor

    def merge(self, other: "Partial") -> "Partial":
        big = torch.maximum(self.m, other.m)
        safe = torch.where(torch.isinf(big), torch.zeros_like(big), big)  # both parts fully masked
        w_self = self.l * torch.exp(self.m - safe)
        w_other = other.l * torch.exp(other.m - safe)
        total = w_self + w_other
        denom = torch.where(total > 0, total, torch.ones_like(total))
        return Partial(big, total, (w_self * self.o + w_other * other.o) / denom)


def _group_query(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`[b, H, q, d]` -> `[b, kv, G*q, d]`: query head h reads KV head h // G (as repeat_kv)."""
    b, heads, q, d = query.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
    return query.reshape(b, kv_heads, (heads // kv_heads) * q, d)


def _group_mask(mask: torch.Tensor, heads: int, kv_heads: int, q: int) -> torch.Tensor:
    """A `[b|1, 1|H, q, n]` mask laid out like the grouped query: `[b|1, 1|kv, G*q, n]`."""
    groups = heads // kv_heads
    if mask.shape[1] == 1:
        return mask.expand(mask.shape[0], 1, q, mask.shape[-1]).repeat(1, 1, groups, 1)
    return mask.expand(mask.shape[0], heads, q, mask.shape[-1]).reshape(mask.shape[0], kv_heads, groups * q, -1)


def partial_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      mask: torch.Tensor | None) -> Partial:
    """Statistics of one part. `query` grouped `[b, kv, rows, d]`; mask bool (True = attend) or additive.

    On CPU this is PyTorch's fused attention kernel, which returns the part's output and its
    log-sum-exp (lse = m + log l, kept as m with l = 1); elsewhere the explicit formulas."""
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    if _FUSED_CPU is not None and query.device.type == "cpu":
        return _fused_partial(query, keys, values, scale, mask)
    return explicit_partial(query, keys, values, scale, mask)


def explicit_partial(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                     mask: torch.Tensor | None) -> Partial:
    """m = max score, l = sum exp(s - m), o = sum exp(s - m) v / l, written out."""
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -float("inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    m = scores.amax(dim=-1, keepdim=True)
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - safe)
    l = p.sum(dim=-1, keepdim=True)  # noqa: E741
    o = torch.matmul(p, values) / torch.where(l > 0, l, torch.ones_like(l))
    return Partial(m, l, o)


_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as added to the scores: bool True -> 0, False -> -inf; additive masks as they are."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -float("inf"))
    return mask.to(dtype)


def _fused_partial(query, keys, values, scale, mask) -> Partial:
    additive = None
    if mask is not None:
        additive = _additive(mask, query.dtype).expand(query.shape[0], keys.shape[1], query.shape[2], keys.shape[2])
    out, lse = _FUSED_CPU(query, keys, values, 0.0, False, attn_mask=additive, scale=scale)
    lse = lse.unsqueeze(-1).to(query.dtype)
    if additive is not None:  # a row with nothing to attend to reports lse 0: make it -inf
        lse = torch.where((additive == -float("inf")).all(dim=-1, keepdim=True), -float("inf"), lse)
    return Partial(lse, torch.ones_like(lse), out)


def flash_decode(query: torch.Tensor, parts: Iterable[tuple[torch.Tensor, torch.Tensor]], scale: float | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of `query` `[b, H, q, d]` over the concatenation of `parts` (`[b, kv, n_c, d]`
    each, in position order), one part at a time. `mask` covers all positions: `[b|1, 1|H, q, n]`,
    bool (True = attend) or additive. Returns `[b, H, q, d]` in the query's dtype; rows that
    attend to nothing come out as zeros."""
    b, heads, q_len, d = query.shape
    scale = d ** -0.5 if scale is None else scale
    work = torch.promote_types(query.dtype, torch.float32)
    merged: Partial | None = None
    start = 0
    grouped_query = grouped_mask = None
    for keys, values in parts:
        n = keys.shape[-2]
        if n == 0:
            continue
        if grouped_query is None:
            kv_heads = keys.shape[1]
            grouped_query = _group_query(query.to(work), kv_heads)
            if mask is not None:
                grouped_mask = _group_mask(mask, heads, kv_heads, q_len)
        start += n
        if mask is not None and start > mask.shape[-1]:
            raise ValueError(f"the mask covers {mask.shape[-1]} positions but the parts hold more")
        part_mask = None if grouped_mask is None else grouped_mask[..., start - n:start]
        if part_mask is not None and part_mask.dtype == torch.bool and not bool(part_mask.any()):
            continue  # fully masked part
        part = partial_attention(grouped_query, keys, values, scale, part_mask)
        merged = part if merged is None else merged.merge(part)
    if mask is not None and start != mask.shape[-1]:
        raise ValueError(f"the mask covers {mask.shape[-1]} positions but the parts hold {start}")
    if merged is None:
        return query.new_zeros(b, heads, q_len, d)
    return merged.o.reshape(b, heads, q_len, -1).to(query.dtype)


def native_flash_decode(query: torch.Tensor, cold: list[native.Part], keys: torch.Tensor, values: torch.Tensor,
                        scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`flash_decode` over the `cold` parts and then the full-precision `keys` / `values`, with the
    compiled kernel: one call per part, the softmax state carried from call to call."""
    b, heads, q_len, d = query.shape
    kv_heads = keys.shape[1]
    scale = d ** -0.5 if scale is None else scale
    state = native.State(query, kv_heads, scale)
    grouped = None
    if mask is not None:
        grouped = _additive(_group_mask(mask, heads, kv_heads, q_len), torch.float32)
    hot = native.Part(native.raw_role(keys), native.raw_role(values), keys.shape[-2], native.RAW_BLOCK)
    start = 0
    for part in [*cold, hot]:
        part_mask = None
        if grouped is not None:
            if start + part.tokens > grouped.shape[-1]:
                raise ValueError(f"the mask covers {grouped.shape[-1]} positions but the parts hold more")
            part_mask = grouped[..., start:start + part.tokens]
            if not bool((part_mask != 0).any()):
                part_mask = None  # attends everywhere: no mask to read
        start += part.tokens
        state.fold(part, part_mask)
    if grouped is not None and start != grouped.shape[-1]:
        raise ValueError(f"the mask covers {grouped.shape[-1]} positions but the parts hold {start}")
    return state.output().to(query.dtype)


def _native_cold(source: ColdSource, query: torch.Tensor, key: torch.Tensor) -> list[native.Part] | None:
    parts = getattr(source, "native_parts", None)
    if parts is None or query.dtype not in native.RAW or key.dtype not in native.RAW or query.device.type != "cpu":
        return None
    return parts()


# ---- transformers integration --------------------------------------------------------------

_SOURCES: "weakref.WeakKeyDictionary[torch.nn.Module, ColdSource]" = weakref.WeakKeyDictionary()


def bind(module: torch.nn.Module, source: ColdSource) -> None:
    """For the next call of `module`'s attention: the cache handed over only the hot window, and
    `source` holds the positions before it."""
    _SOURCES[module] = source


def unbind(module: torch.nn.Module) -> None:
    _SOURCES.pop(module, None)


def bound_source(module: torch.nn.Module, query: torch.Tensor) -> ColdSource | None:
    """The source this call of `module`'s attention reads its older positions from: the bound one
    for a single-token query, else None (the keys and values handed over are all there is)."""
    source = _SOURCES.get(module)
    return source if source is not None and query.shape[2] == 1 else None


def attended_kv(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All the keys and values this call attends to, in position order: the bound source's parts
    (dequantized as the kernel reads them), then `key` / `value`. What a trace records."""
    source = bound_source(module, query)
    parts = list(source.cold_parts(key.dtype)) if source is not None else []
    if not parts:
        return key, value
    return (torch.cat([k for k, _ in parts] + [key], dim=-2),
            torch.cat([v for _, v in parts] + [value], dim=-2))


def flash_decoding_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """The function registered with transformers' AttentionInterface."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    source = bound_source(module, query)
    if source is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or dropout:
        raise ValueError("flash-decoding supports neither softcap nor dropout")
    cold = _native_cold(source, query, key)
    if cold is not None:
        out = native_flash_decode(query, cold, key, value, scaling, attention_mask)
    else:
        out = flash_decode(query, itertools.chain(source.cold_parts(key.dtype), [(key, value)]), scaling, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `kvlab_split_k` known to transformers (idempotent); masks are built as for SDPA.

    A model runs it inside `kvlab.intercept.intercept(model, attention=NAME)`."""
    from transformers.masking_utils import sdpa_mask

    register_attention(NAME, flash_decoding_attention, sdpa_mask)
