"""Which global KV head each tensor-parallel rank's local slots hold, for folding per-head scales.

vLLM's `kv_cache_scales.json` has one scale per (rank, layer); a per-head calibration becomes
that by taking, on each rank, the largest scale among the heads the rank holds.
"""

from __future__ import annotations

from kvlab.layouts import make_layout


def heads_of_rank(tp: int, n_heads: int, n_kv_heads: int) -> list[list[int | None]]:
    """The KV head held by each local slot of each rank (None for a zero padding slot).

    Follows the `auto` choice of the NxDI rules (REFERENCE.md, "Tensor-parallel KV layouts").
    The rules live in `kvlab.layouts` (strategy `auto`); this is the view scales need of them.
    """
    for label, value in (("tp", tp), ("heads", n_heads), ("KV heads", n_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} heads cannot share {n_kv_heads} KV heads evenly")
    layout = make_layout("auto", tp, n_heads, n_kv_heads)
    return [list(layout.heads(rank)) for rank in range(tp)]
