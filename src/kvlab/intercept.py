"""Interception: forward hooks and a swapped attention function, for one `with` block only.

Cache policies, taps, the trace recorder and fused prefill all reach into a model's forward
pass the same two ways transformers offers: forward (pre-)hooks with kwargs on modules, and an
attention function registered with `AttentionInterface` that the model is switched to. Both
must be undone whatever happens inside, or a later run on the same model would silently go
through a stale hook or kernel; `intercept` is the one place that installs and undoes them.
Blocks nest: each puts back what it found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kvlab.model_facts import apply_attention

# (module, hook) pairs; a pre-hook is hook(module, args, kwargs), a post hook hook(module, args, kwargs, output)
Hooks = Iterable[tuple[Any, Callable[..., Any]]]


def current_attention(model) -> str | None:
    """The name of the attention function the model calls now."""
    return getattr(model.config, "_attn_implementation", None)


@contextlib.contextmanager
def intercept(model, *, attention: str | None = None, pre: Hooks = (), post: Hooks = (),
              always_call: bool = False) -> Iterator[None]:
    """Switch `model` to the attention function `attention` and install the hooks, for the block.

    pre: forward pre-hooks, post: forward hooks, both with kwargs (`always_call`: post hooks run
    even when the module's forward raises). On exit, error or not, the hooks are removed and the
    model gets back the attention function it had on entry. `attention=None` leaves it as it is.
    """
    previous = current_attention(model) if attention is not None else None
    handles = []
    try:
        if attention is not None:
            apply_attention(model, attention)
        for module, hook in pre:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, hook in post:
            handles.append(module.register_forward_hook(hook, with_kwargs=True, always_call=always_call))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
        if attention is not None and previous is not None and current_attention(model) != previous:
            apply_attention(model, previous)


def register_attention(name: str, function: Callable[..., Any], mask: Callable[..., Any] | None = None) -> None:
    """Make `function` known to transformers as attention `name` (and `mask` as its mask builder).

    Idempotent: registering the same function again changes nothing.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if AttentionInterface._global_mapping.get(name) is not function:
        AttentionInterface.register(name, function)
    if mask is not None and AttentionMaskInterface._global_mapping.get(name) is not mask:
        AttentionMaskInterface.register(name, mask)
