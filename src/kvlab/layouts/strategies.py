"""Named layout strategies: (tp, n_heads, n_kv_heads) -> which KV head each rank's slots hold.

A strategy is a function registered with `@strategy("name")` that returns the slots of each
rank (None for padding) or raises `NotApplicable` with the reason. `make_layout` adds the
modifiers (batch slices, sequence split, rank order) on top of any strategy, and names the
strategies that would apply when the chosen one does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvlab.layouts.layout import Layout, LayoutError

SlotList = list[list[int | None]]
StrategyFn = Callable[[int, int, int], SlotList]

_STRATEGIES: dict[str, StrategyFn] = {}


class NotApplicable(LayoutError):
    """The strategy cannot place these heads on these ranks."""


def strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Register `fn(tp, n_heads, n_kv_heads) -> slots per rank` as layout strategy `name`."""

    def wrap(fn: StrategyFn) -> StrategyFn:
        if name in _STRATEGIES and _STRATEGIES[name] is not fn:
            raise ValueError(f"layout strategy {name!r} registered twice")
        _STRATEGIES[name] = fn
        return fn

    return wrap


def strategy_names() -> list[str]:
    return list(_STRATEGIES)


def applicable(tp: int, n_heads: int, n_kv_heads: int) -> list[str]:
    """The registered strategies that can lay out these heads on `tp` ranks."""
    names = []
    for name, fn in _STRATEGIES.items():
        try:
            fn(tp, n_heads, n_kv_heads)
        except NotApplicable:
            continue
        names.append(name)
    return names


def make_layout(
    name: str,
    tp: int,
    n_heads: int,
    n_kv_heads: int,
    *,
    dp: int = 1,
    seq_split: bool = False,
    rank_order: Sequence[int] | None = None,
) -> Layout:
    """The layout strategy `name` gives for `tp` ranks, with the modifiers applied.

    With `dp` batch groups the strategy lays out the heads over `tp // dp` ranks and every
    group repeats that. `auto` resolves to the strategy NxDI would pick (see `auto`).
    """
    _check_counts(tp, n_heads, n_kv_heads, dp)
    if name not in _STRATEGIES:
        raise LayoutError(f"unknown layout {name!r}; known: {', '.join(strategy_names())}")
    inner = tp // dp
    try:
        slots = _STRATEGIES[name](inner, n_heads, n_kv_heads)
    except NotApplicable as err:
        others = [n for n in applicable(inner, n_heads, n_kv_heads) if n not in (name, "auto")]
        hint = f"; use {' or '.join(others)}" if others else ""
        hint += f" (auto picks {auto_choice(inner, n_heads, n_kv_heads)})"
        raise NotApplicable(f"layout {name} does not apply to tp={inner}, {n_heads} heads, "
                            f"{n_kv_heads} KV heads: {err}{hint}") from None
    resolved = auto_choice(inner, n_heads, n_kv_heads) if name == "auto" else name
    return Layout(
        name=resolved,
        n_kv_heads=n_kv_heads,
        slots=tuple(tuple(s) for s in slots) * dp,
        n_heads=n_heads,
        dp=dp,
        seq_split=seq_split,
        rank_order=tuple(rank_order) if rank_order is not None else None,
    )


def _check_counts(tp: int, n_heads: int, n_kv_heads: int, dp: int) -> None:
    for label, value in (("tp", tp), ("heads", n_heads), ("kv heads", n_kv_heads), ("dp", dp)):
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"{label} must be a positive integer, got {value!r}")
    if n_heads % n_kv_heads:
        raise LayoutError(f"{n_heads} heads cannot share {n_kv_heads} KV heads evenly (heads % kv_heads != 0)")
    if tp % dp:
        raise LayoutError(f"dp={dp} must divide tp={tp}")


def _padded(n_heads: int, tp: int) -> int:
    """Query heads rounded up to a multiple of tp (NxDI pads attention heads so)."""
    return -(-n_heads // tp) * tp


def _split(heads: list[int | None], tp: int) -> SlotList:
    per = len(heads) // tp
    return [heads[r * per:(r + 1) * per] for r in range(tp)]


# ---- built-in strategies -----------------------------------------------------------------
@strategy("contiguous")
def contiguous(tp: int, n_heads: int, n_kv_heads: int) -> SlotList:
    """Rank r holds KV heads [r*kv/tp, (r+1)*kv/tp): transformers' tp_plan, vLLM when kv % tp == 0."""
    if n_kv_heads % tp:
        raise NotApplicable(f"kv_heads % tp = {n_kv_heads % tp}, it must be 0")
    return _split(list(range(n_kv_heads)), tp)


@strategy("replicate")
def replicate(tp: int, n_heads: int, n_kv_heads: int) -> SlotList:
    """One KV head per rank, each replicated tp/kv times (NxDI REPLICATE_TO_TP_DEGREE, vLLM for tp > kv)."""
    if tp % n_kv_heads:
        raise NotApplicable(f"tp % kv_heads = {tp % n_kv_heads}, it must be 0")
    copies = tp // n_kv_heads
    return [[r // copies] for r in range(tp)]


@strategy("mha")
def mha(tp: int, n_heads: int, n_kv_heads: int) -> SlotList:
    """NxDI CONVERT_TO_MHA: each KV head repeated for its query heads, zero heads padding to a multiple of tp.

    Ranks take contiguous runs of the padded list, so a rank may straddle two groups and the
    last ranks may hold only padding.
    """
    group = n_heads // n_kv_heads
    heads: list[int | None] = [h for h in range(n_kv_heads) for _ in range(group)]
    heads += [None] * (_padded(n_heads, tp) - n_heads)
    return _split(heads, tp)


@strategy("padded-mha")
def padded_mha(tp: int, n_heads: int, n_kv_heads: int) -> SlotList:
    """MHA (heads == kv_heads) split contiguously with zero heads at the tail up to a multiple of tp."""
    if n_heads != n_kv_heads:
        raise NotApplicable(f"it is for MHA models (heads == kv_heads), not {n_heads}/{n_kv_heads}")
    return mha(tp, n_heads, n_kv_heads)


def auto_choice(tp: int, n_heads: int, n_kv_heads: int) -> str:
    """The strategy NxDI's GQA sharding picks (gqa.py):

    1. MHA (heads == kv_heads): heads % tp == 0 -> `contiguous`; fewer heads than ranks with
       tp % heads == 0 -> `replicate` (each head on tp/heads ranks, REPLICATE_TO_TP_DEGREE);
       otherwise pad the heads to a multiple of tp -> `padded-mha`;
    2. otherwise, kv_heads % tp == 0 -> `contiguous` (kv heads left as they are);
    3. otherwise, tp % kv_heads == 0 -> `replicate` (REPLICATE_TO_TP_DEGREE, kv < tp);
    4. otherwise -> `mha` (CONVERT_TO_MHA, its fallback that works for every tp).
    """
    if n_heads == n_kv_heads:
        if n_heads % tp == 0:
            return "contiguous"
        return "replicate" if n_kv_heads < tp and tp % n_kv_heads == 0 else "padded-mha"
    if n_kv_heads % tp == 0:
        return "contiguous"
    if tp % n_kv_heads == 0:
        return "replicate"
    return "mha"


@strategy("auto")
def auto(tp: int, n_heads: int, n_kv_heads: int) -> SlotList:
    """What NxDI would choose for (tp, heads, kv_heads); see `auto_choice` for the rule."""
    return _STRATEGIES[auto_choice(tp, n_heads, n_kv_heads)](tp, n_heads, n_kv_heads)
