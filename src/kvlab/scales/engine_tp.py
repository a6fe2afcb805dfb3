"""Which tensor-parallel sizes the engines that read KV scales files can run a model at.

vLLM (and SGLang) give every rank the same number of query heads, and either split the KV
heads evenly or replicate each one to the same number of ranks. A scales file written for
another tp is valid JSON that no engine loads with the model, so kvlab says why.
"""

from __future__ import annotations


def _reason(tp: int, n_heads: int, n_kv_heads: int) -> str | None:
    if tp <= 1:
        return None
    if n_heads % tp:
        return f"tp must divide the {n_heads} attention heads ({n_heads} % {tp} = {n_heads % tp})"
    if n_kv_heads >= tp and n_kv_heads % tp:
        return f"tp must divide the {n_kv_heads} KV heads ({n_kv_heads} % {tp} = {n_kv_heads % tp})"
    if n_kv_heads < tp and tp % n_kv_heads:
        return f"with fewer KV heads than ranks each is replicated, so the {n_kv_heads} KV heads must divide tp"
    return None


def vllm_tp_sizes(n_heads: int, n_kv_heads: int) -> list[int]:
    """The tensor-parallel sizes vLLM runs a model of this geometry at."""
    return [tp for tp in range(1, n_heads + 1) if _reason(tp, n_heads, n_kv_heads) is None]


def vllm_tp_problem(tp: int, n_heads: int, n_kv_heads: int) -> str | None:
    """Why vLLM refuses to run a model of `n_heads` / `n_kv_heads` at tensor-parallel size `tp`, or None."""
    reason = _reason(tp, n_heads, n_kv_heads)
    if reason is None:
        return None
    sizes = ", ".join(map(str, vllm_tp_sizes(n_heads, n_kv_heads)))
    return f"vLLM refuses tp {tp} for this model: {reason}; it runs at tp {sizes}"
