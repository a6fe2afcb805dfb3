"""Which global KV head each tensor-parallel rank's local slots hold, for folding per-head scales.

vLLM's `kv_cache_scales.json` has one scale per (rank, layer); a per-head calibration becomes
that by taking, on each rank, the largest scale among the heads the rank holds.
"""

from __future__ import annotations


def heads_of_rank(tp: int, n_heads: int, n_kv_heads: int) -> list[list[int | None]]:
    """The KV head held by each local slot of each rank (None for a zero padding slot).

    Follows the `auto` choice of the NxDI rules (REFERENCE.md, "Tensor-parallel KV layouts"):
    MHA models are split contiguously, padded with zero heads up to a multiple of tp; otherwise
    `kv % tp == 0` -> contiguous, `tp % kv == 0` -> each KV head replicated on tp/kv ranks,
    else convert-to-MHA (KV heads repeated for their query heads, zero-padded, split evenly).

    This must agree with `kvlab.layouts` (strategy `auto`), which replaces it.
    """
    for label, value in (("tp", tp), ("heads", n_heads), ("KV heads", n_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} heads cannot share {n_kv_heads} KV heads evenly")
    if n_heads != n_kv_heads and n_kv_heads % tp == 0:
        per = n_kv_heads // tp
        return [list(range(r * per, (r + 1) * per)) for r in range(tp)]
    if n_heads != n_kv_heads and tp % n_kv_heads == 0:
        copies = tp // n_kv_heads
        return [[r // copies] for r in range(tp)]
    # MHA (padded when heads % tp != 0) and the convert-to-MHA fallback share one construction.
    group = n_heads // n_kv_heads
    slots: list[int | None] = [h for h in range(n_kv_heads) for _ in range(group)]
    padded = -(-n_heads // tp) * tp
    slots += [None] * (padded - n_heads)
    per = padded // tp
    return [slots[r * per:(r + 1) * per] for r in range(tp)]
