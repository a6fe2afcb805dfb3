"""Attention taps: see a layer's queries and keys without touching the model's code.

Some cache decisions need the queries of a forward pass (A^3 scores question-to-document
attention, SnapKV scores what the observation window attends to). The model's attention
modules call whatever function transformers' `AttentionInterface` names in the config; for the
length of a `with attention_taps(...)` block that name is a kvlab wrapper which calls the
layer's tap, then the kernel the model used before (sdpa or eager) — directly, or through the
layer's route, which may call the kernel on parts of the queries (a fused prefill runs the
selected rows in blocks, each with only the keys it can see). Blocks nest: an inner block's
tap runs after the outer one's, its route calls the outer route as its kernel, and each block
puts back what it found.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from kvlab.errors import KvlabError
from kvlab.intercept import current_attention, intercept, register_attention
from kvlab.model_facts import attention_modules, modeling_function

# tap(module, query, key, attention_mask, kwargs): query [b, heads, q, d], key [b, kv_heads, k, d]
Tap = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any, dict[str, Any]], None]
# route(kernel, module, query, key, value, attention_mask, **kwargs) -> (output [b, q, heads, d], weights)
Route = Callable[..., tuple[torch.Tensor, Any]]

TAPPABLE = ("sdpa", "eager")
_PREFIX = "kvlab_tap_"
_TAPS: "weakref.WeakKeyDictionary[torch.nn.Module, Tap]" = weakref.WeakKeyDictionary()
_ROUTES: "weakref.WeakKeyDictionary[torch.nn.Module, Route]" = weakref.WeakKeyDictionary()


@functools.cache
def _tapped(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        tap = _TAPS.get(module)
        if tap is not None:
            tap(module, query, key, attention_mask, kwargs)
        if inner == "eager":
            kernel = modeling_function(module, "eager_attention_forward")
            if kernel is None:
                raise KvlabError(f"{type(module).__name__}: its modeling file has no eager attention to wrap")
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[inner]
        route = _ROUTES.get(module)
        if route is not None:
            return route(kernel, module, query, key, value, attention_mask, **kwargs)
        return kernel(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register(inner: str) -> str:
    """Register the wrapper around `inner` (once) and return its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = _PREFIX + inner
    register_attention(name, _tapped(inner), ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def inner_attention(model) -> str:
    """The kernel the model runs (under a tap, the one the tap wraps)."""
    name = model.config._attn_implementation
    return name.removeprefix(_PREFIX)


@contextlib.contextmanager
def attention_taps(model, taps: Mapping[int, Tap], routes: Mapping[int, Route] | None = None) -> Iterator[None]:
    """Call `taps[layer]` with each attention call's query and key, and run the kernel through `routes[layer]`."""
    routes = routes or {}
    if not taps and not routes:
        yield
        return
    inner = inner_attention(model)
    if inner not in TAPPABLE:
        raise KvlabError(f"attn={inner} cannot be observed; use attn=sdpa or attn=eager for this run")
    modules = attention_modules(model)
    name = _register(inner)
    installed = []
    try:
        for registry, items in ((_TAPS, taps), (_ROUTES, routes)):
            for index, fn in items.items():
                module = modules[index]
                found = registry.get(module)
                registry[module] = fn if found is None else _nest(registry, found, fn)
                installed.append((registry, module, found))
        with intercept(model, attention=name):
            if current_attention(model) != name:
                raise KvlabError(f"{type(model).__name__} does not route attention through transformers' "
                                 "AttentionInterface")
            yield
    finally:
        for registry, module, found in reversed(installed):
            if found is None:
                registry.pop(module, None)
            else:
                registry[module] = found


def _nest(registry, outer: Callable, inner: Callable) -> Callable:
    """A block inside another on the same layer: both taps see the call; the inner route's kernel is the outer route."""
    if registry is _TAPS:
        def both(*args: Any) -> None:
            outer(*args)
            inner(*args)
        return both

    def through(kernel, *args: Any, **kwargs: Any):
        return inner(functools.partial(outer, kernel), *args, **kwargs)
    return through


def rows_attention(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                   scaling: float | None) -> torch.Tensor:
    """Softmax attention of query rows `rows` (at key positions `positions`) over every key, `[heads, rows, keys]`.

    Causal: a row sees the keys up to its own position. Computed in float32.
    """
    q = query[0][:, rows].float()
    k = key[0].float()
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    future = torch.arange(k.shape[-2], device=k.device)[None, :] > positions.to(k.device)[:, None]
    scores.masked_fill_(future, float("-inf"))
    return torch.softmax(scores, dim=-1)


def last_rows_attention(query: torch.Tensor, key: torch.Tensor, rows: int, scaling: float | None) -> torch.Tensor:
    """`rows_attention` of the last `rows` queries, which sit at the last `rows` key positions."""
    n_queries, n_keys = query.shape[-2], key.shape[-2]
    return rows_attention(query, key, torch.arange(n_queries - rows, n_queries), torch.arange(n_keys - rows, n_keys),
                          scaling)
